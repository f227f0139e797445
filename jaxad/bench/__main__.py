"""`python -m jaxad.bench [--case=...] [--quick] [--out=bench.json]`: see jaxad.bench."""

from absl import flags

from jaxad import cli

flags.DEFINE_multi_string(
    "case", [], "Model, case (prefix ok) or model/case; comma lists; repeatable. "
    "Default: every case.")
flags.DEFINE_bool("quick", False, "Fewer warm-up calls and repeats (same shapes).")
flags.DEFINE_bool("list", False, "Print the case ids and exit.")
flags.DEFINE_string("out", "bench.json", "Results JSON (written atomically).")
flags.DEFINE_list("torch_json", [],
                  "Results JSON files of ../shared/bench/peer_torch.py and "
                  "peer_torch_gan.py (comma list): adds their images/s and the ratio.")
flags.DEFINE_string("grid_config", "",
                    "Grid config file whose first group (8 members) grid/runs8 trains "
                    "(\"\" = the built-in copy of configs/grid_digits.py).")
FLAGS = flags.FLAGS


def main(argv):
  cli.check_no_args(argv)
  from jaxad.bench import cases, e2e, grid, suite, timing
  if FLAGS.list:
    print("\n".join(cases.CASE_IDS))
    print("\n".join(f"# {cid} (--case=grid)" for cid in grid.GRID_CASE_IDS))
    print("\n".join(f"# {cid} (--case=e2e)" for cid in e2e.E2E_CASE_IDS))
    return
  with cli.session():
    try:
      cases.select_cases(e2e.select_e2e_cases(grid.select_grid_cases(FLAGS.case)[1])[1])
    except ValueError as e:
      raise SystemExit(cli.error_message(e)) from None
    suite.run(FLAGS.case, timing.QUICK if FLAGS.quick else timing.FULL, out=FLAGS.out,
              torch_json=FLAGS.torch_json, grid_config=FLAGS.grid_config)


if __name__ == "__main__":
  cli.run(main)
