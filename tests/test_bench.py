"""Tests for jaxad.bench: case ids, selection, records and JSON (no speed assertions)."""

import json
import subprocess
import sys

import jax
import pytest

from jaxad import bench

# One timed call per case, a tiny peak matmul: only the plumbing is under test.
TINY = bench.Timing(rounds=1, warmup=0, min_repeats=1, max_repeats=1, budget_s=0.0,
                    min_repeat_s=0.0, peak_repeats=1, peak_min_s=0.0)
MODELS = ("conv128", "conv64", "mlp28")
CASES = ("train_step", "score_elbo", "score_iwae_L15", "pixel_grads")
RECORD_FIELDS = (
    "sec_per_call_median", "sec_per_call_min", "sec_per_call_max", "sec_per_call_iqr",
    "sec_per_call_round_medians", "repeats", "calls_per_repeat", "rounds", "batch",
    "description", "compile_s", "images_per_s", "flops_per_call", "flops_per_image",
    "gflops", "fraction_of_peak", "reference_mflop_per_image", "gflops_reference_count")


def test_case_ids_are_the_twelve_reference_cases():
  assert bench.CASE_IDS == tuple(f"{m}/{c}" for m in MODELS for c in CASES)
  assert set(bench.REFERENCE_MFLOP) == set(bench.CASE_IDS)


def test_list_flag_prints_every_case_id():
  out = subprocess.run([sys.executable, "-m", "jaxad.bench", "--list"], check=True,
                       capture_output=True, text=True).stdout
  ids = [line for line in out.splitlines() if line and not line.startswith("#")]
  assert ids == list(bench.CASE_IDS)
  assert "score64/score_map: not available yet" in out


@pytest.mark.parametrize("selectors, expected", [
    ([], list(bench.CASE_IDS)),
    (["conv64"], [f"conv64/{c}" for c in CASES]),
    (["train_step"], [f"{m}/train_step" for m in MODELS]),
    (["mlp28/pixel_grads"], ["mlp28/pixel_grads"]),
    (["score_iwae"], [f"{m}/score_iwae_L15" for m in MODELS]),
    (["mlp28/score_elbo, conv128", "conv64/train_step"],
     [f"conv128/{c}" for c in CASES] + ["conv64/train_step", "mlp28/score_elbo"]),
])
def test_select_cases(selectors, expected):
  chosen, _ = bench.select_cases(selectors)
  assert chosen == expected


def test_select_cases_reports_later_cases_apart():
  chosen, later = bench.select_cases(["score64", "mlp28/train_step"])
  assert chosen == ["mlp28/train_step"]
  assert later == ["score64/train_step", "score64/score_map"]
  assert bench.select_cases([])[1] == list(bench.NOT_YET)


def test_unknown_case_names_it_and_lists_the_valid_ones():
  with pytest.raises(ValueError) as e:
    bench.select_cases(["conv64/train", "mlp28,nope"])  # a case prefix is fine
  head, valid = str(e.value).split(";", 1)
  assert head == "unknown --case ['nope']"
  for name in (*MODELS, *CASES, *bench.CASE_IDS):
    assert repr(name) in valid


def test_run_one_case_writes_the_promised_json(tmp_path):
  out = tmp_path / "sub" / "bench.json"
  results = bench.run(["mlp28/score_elbo"], TINY, out=str(out), peak_sizes=(128,),
                      verbose=False)
  written = json.loads(out.read_text())
  assert written == json.loads(json.dumps(results))
  assert list(written["cases"]) == ["mlp28/score_elbo"]
  record = written["cases"]["mlp28/score_elbo"]
  assert set(RECORD_FIELDS) <= set(record)
  assert record["images_per_s"] > 0 and record["flops_per_image"] > 0
  assert record["compile_s"] > 0 and record["gflops"] > 0 and record["fraction_of_peak"] > 0
  assert record["batch"] == 32 and record["repeats"] == 1
  assert record["images_per_s"] == pytest.approx(32 / record["sec_per_call_median"])
  assert written["peak_gflops"] == written["peak"]["xla_sgemm_128"]["median"] > 0
  meta = written["meta"]
  assert meta["jax"] == jax.__version__ and meta["device_kind"]
  assert meta["batch"] == 32 and meta["iwae_L"] == 15 and meta["quick"] is False


def test_train_step_carries_its_state():
  setup = bench.make_setup("mlp28")
  runner = bench.make_runner("train_step", setup)
  first = runner()[1]
  second = runner()[1]
  assert int(runner.args[0][3]) == 2  # the step count, fed back after each call
  assert float(first) != float(second)
  # The donated state is a copy: the variables the eval cases share are intact.
  assert all(not leaf.is_deleted() for leaf in jax.tree.leaves(setup.variables))


def test_torch_results_add_a_ratio_column():
  record = {"images_per_s": 200.0, "compile_s": 1.0, "flops_per_image": 2.1e7,
            "gflops": 4.0, "fraction_of_peak": 0.1, "reference_mflop_per_image": 20.5}
  results = {"cases": {"mlp28/score_iwae_L15": dict(record),
                       "mlp28/score_elbo": dict(record)}}
  torch = {"meta": {"torch": "2.13.0"}, "peak_gflops_reference": 220.0,
           "cases": {"mlp28/score_iwae_L15_batched": {"images_per_s": 100.0,
                                                      "flops_per_image": 2.0e7}}}
  bench.add_torch(results, torch)
  iwae = results["cases"]["mlp28/score_iwae_L15"]
  assert iwae["torch_images_per_s"] == 100.0 and iwae["jax_over_torch"] == 2.0
  assert iwae["reference_mflop_per_image"] == 20.0
  assert "torch_images_per_s" not in results["cases"]["mlp28/score_elbo"]
  table = bench.markdown_table(results)
  assert "| jaxad/torch |" in table.splitlines()[0]
  assert "| 100.0 | 2.00 |" in table
