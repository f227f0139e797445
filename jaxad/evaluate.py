"""Evaluates a trained workdir: `python -m jaxad.evaluate --workdir=DIR [--split=test]`.

Loads DIR/config.json and the latest checkpoint, computes every sample-wise score and,
when masks or synthetic lesions exist, every pixel map; writes DIR/eval/<split>/
(scores.csv and .npz, report.html, figures/) and the split's entry of
DIR/eval/metrics.json, and prints the headline table. Nothing is written unless every
score is finite. Eval settings, data paths, splits and lesions can be overridden
(`--config.eval.num_samples=100`, `--config.data.synthetic_lesions.enabled=True`); an
override of what the model was trained with (model, preprocessing, classes) is refused.
`--input=PATH` scores an unlabelled image folder or .npz instead (batch scoring, flat
memory) into a new folder DIR/eval/input/<name>[-N] per run. Multi-process: run the
same command in every process (with `--coordinator_address`, `--num_processes`,
`--process_id` where the cluster does not provide them); each scores its shard of every
batch and process 0 writes the files."""

import os
import sys

from absl import flags
from ml_collections import config_flags

from jaxad import cli, parallel

flags.DEFINE_string("workdir", None, "A training workdir (holds config.json and checkpoints/).")
flags.DEFINE_string("split", "test", "Which split to evaluate: train, val or test.")
flags.DEFINE_string("input", None, "Score the unlabelled images in this folder or .npz "
                    "instead (results in a new DIR/eval/input/<name>[-N] each run).")
parallel.define_flags()
FLAGS = flags.FLAGS


def _workdir_from_argv(argv) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith("--workdir="):
      return arg.split("=", 1)[1]
    if arg == "--workdir" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _define_config_flag(argv) -> None:
  """`--config.*` overrides apply to the workdir's own config, so load it first.

  Help needs no workdir: it lists the flag over the default config.
  """
  workdir = _workdir_from_argv(argv)
  if workdir is None:
    if not cli.help_requested(argv):
      sys.exit("error: --workdir is required (a folder made by python -m jaxad.train)")
    from jaxad import defaults
    config = defaults.get_config()
  else:
    from jaxad import config as config_lib
    with cli.exit_on_error():
      config = config_lib.load_workdir_config(workdir)
  config_flags.DEFINE_config_dict(
      "config", config, "The workdir's config; override a value with --config.a.b=value.",
      lock_config=True)


def main(argv):
  cli.check_no_args(argv)
  from jaxad import config as config_lib
  from jaxad import evaluation, files
  with cli.session():
    saved = files.read_json(os.path.join(FLAGS.workdir, "config.json"))
    config_lib.check_eval_overrides(saved, FLAGS.config, FLAGS.workdir)
    result = evaluation.evaluate(FLAGS.workdir, split=FLAGS.split, input_path=FLAGS.input,
                                 config=FLAGS.config)
  if not parallel.is_main_process():
    return
  print(evaluation.headline_table(result))
  print(f"results in {os.path.join(FLAGS.workdir, result['folder'])}")


if __name__ == "__main__":
  _define_config_flag(sys.argv)
  cli.run(main)
