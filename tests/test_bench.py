"""Tests for jaxad.bench: case ids, selection, records and JSON (no speed assertions)."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxad.bench import cases, grid, reference, suite, timing
from jaxad.models import unet
from conftest import numpy_variables

# One timed call per case, a tiny peak matmul: only the plumbing is under test.
TINY = timing.Timing(rounds=1, warmup=0, min_repeats=1, max_repeats=1, budget_s=0.0,
                    min_repeat_s=0.0, peak_repeats=1, peak_min_s=0.0)
MODELS = ("conv128", "conv64", "mlp28")
CASES = ("train_step", "score_elbo", "score_iwae_L15", "pixel_grads")
SCORE_IDS = ("score64/train_step", "score64/score_map", "gan/train_step",
             "gan/latent_search")
RECORD_FIELDS = (
    "sec_per_call_median", "sec_per_call_min", "sec_per_call_max", "sec_per_call_iqr",
    "sec_per_call_round_medians", "repeats", "calls_per_repeat", "rounds", "batch",
    "description", "compile_s", "images_per_s", "flops_per_call", "flops_per_image",
    "gflops", "fraction_of_peak", "reference_mflop_per_image", "gflops_reference_count")


def test_case_ids_are_the_reference_cases():
  assert cases.CASE_IDS == tuple(f"{m}/{c}" for m in MODELS for c in CASES) + SCORE_IDS
  # peer_torch_gan.py reports no FLOPs: every other case has the reference's count.
  assert set(reference.REFERENCE_MFLOP) == set(cases.CASE_IDS) - {"gan/train_step",
                                                              "gan/latent_search"}
  assert reference.torch_case_id("gan/train_step") == "dcgan28/train_step"
  assert reference.torch_case_id("conv64/score_iwae_L15") == "conv64/score_iwae_L15_batched"


def test_list_flag_prints_every_case_id():
  out = subprocess.run([sys.executable, "-m", "jaxad.bench", "--list"], check=True,
                       capture_output=True, text=True).stdout
  ids = [line for line in out.splitlines() if line and not line.startswith("#")]
  assert ids == list(cases.CASE_IDS)
  assert "# grid/runs8 (--case=grid)" in out


@pytest.mark.parametrize("selectors, expected", [
    ([], list(cases.CASE_IDS)),
    (["score64"], list(SCORE_IDS[:2])),
    (["gan"], ["gan/train_step", "gan/latent_search"]),
    (["score_map"], ["score64/score_map"]),
    (["conv64"], [f"conv64/{c}" for c in CASES]),
    (["train_step"], [f"{m}/train_step" for m in MODELS]
     + ["score64/train_step", "gan/train_step"]),
    (["mlp28/pixel_grads"], ["mlp28/pixel_grads"]),
    (["score_iwae"], [f"{m}/score_iwae_L15" for m in MODELS]),
    (["mlp28/score_elbo, conv128", "conv64/train_step"],
     [f"conv128/{c}" for c in CASES] + ["conv64/train_step", "mlp28/score_elbo"]),
])
def test_select_cases(selectors, expected):
  assert cases.select_cases(selectors) == expected


def test_unknown_case_names_it_and_lists_the_valid_ones():
  with pytest.raises(ValueError) as e:
    cases.select_cases(["conv64/train", "mlp28,nope"])  # a case prefix is fine
  head, valid = str(e.value).split(";", 1)
  assert head == "unknown --case ['nope']"
  for name in (*MODELS, *CASES, *cases.CASE_IDS):
    assert repr(name) in valid


def test_run_one_case_writes_the_promised_json(tmp_path):
  out = tmp_path / "sub" / "bench.json"
  results = suite.run(["mlp28/score_elbo"], TINY, out=str(out), peak_sizes=(128,),
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
  setup = cases.make_setup("mlp28")
  runner = cases.make_runner("train_step", setup)
  first = runner()[1]
  second = runner()[1]
  assert int(runner.args[0][3]) == 2  # the step count, fed back after each call
  assert float(first) != float(second)
  # The donated state is a copy: the variables the eval cases share are intact.
  assert all(not leaf.is_deleted() for leaf in jax.tree.leaves(setup.variables))


def _tiny_score_setup():
  model = unet.UNet(out_channels=3, base_width=8, channel_mult=(1, 2), num_res_blocks=1,
                    attention_resolutions=(4,), dropout=0.0, groups=4)
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 8, 8, 3)), jnp.float32)
  variables = numpy_variables(model, (8, 8, 3), extra_inputs=[(1,)])
  return cases.Setup(model, variables, x, None)


def test_score_map_is_the_mean_abs_score_at_small_t():
  setup = _tiny_score_setup()
  got = cases.make_runner("score_map", setup)()
  label = jnp.full((4,), 999 * 1e-3)
  apply = jax.jit(setup.model.apply, static_argnames="train")
  eps = np.asarray(apply(setup.variables, setup.x, label, train=False), np.float64)
  # σ(t)² = 1 − exp(−(t²(β1 − β0)/2 + t·β0)) of the continuous VP-SDE, in float64.
  t = 1e-3
  sigma = np.sqrt(-np.expm1(-(0.5 * t * t * (20.0 - 0.1) + t * 0.1)))
  np.testing.assert_allclose(got, np.abs(eps / sigma).mean(-1), rtol=1e-4)
  assert got.shape == (4, 8, 8)


def test_score_train_step_lowers_the_dsm_loss_and_carries_its_state():
  runner = cases.make_runner("train_step", _tiny_score_setup())
  losses = [float(runner()[1]) for _ in range(30)]
  assert int(runner.args[0][3]) == 30
  assert np.mean(losses[-5:]) < np.mean(losses[:5])


def test_latent_search_case_is_the_gan_familys_score():
  setup = cases.make_setup("gan", batch=2)
  assert setup.model.latent_steps == cases.GAN_STEPS == 100
  # 4 steps here (the unrolled search compiles in time linear in its steps): the FLOPs
  # of 4 steps lie between those of 2 and 8, each step counted.
  flops = {}
  for steps in (2, 4, 8):
    short = cases.Setup(dataclasses.replace(setup.model, latent_steps=steps),
                        setup.variables, setup.x, None)
    flops[steps] = suite.prepare("gan/latent_search", short, TINY).flops_per_call
  assert 0 < flops[2] < flops[4] < flops[8]
  assert flops[8] - flops[4] == pytest.approx(2 * (flops[4] - flops[2]), rel=0.05)
  scores, maps = cases.make_runner("latent_search", short)()
  assert set(scores) == {"gan", "gan_residual", "gan_feature"}
  assert maps["gan_residual"].shape == (2, 28, 28)
  np.testing.assert_allclose(scores["gan"], 0.5 * scores["gan_residual"]
                             + 0.5 * scores["gan_feature"], rtol=1e-5)


def test_gan_train_step_is_the_familys_update_on_64_images():
  assert cases.case_batch("gan/train_step") == 64 and cases.case_batch("gan/latent_search") == 32
  setup = cases.make_setup("gan", batch=cases.case_batch("gan/train_step"))
  runner = cases.make_runner("train_step", setup)
  losses = [float(runner()[1]) for _ in range(2)]
  params, _, opt_state, count = runner.args[0]
  assert setup.x.shape == (64, 28, 28, 1) and int(count) == 2 and losses[0] != losses[1]
  # One Adam update per network per call, with the reference's β1 = 0.5.
  for net in ("generator", "discriminator"):
    assert int(opt_state[net][0].count) == 2
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), params,
                         setup.variables["params"])
  assert all(jax.tree.leaves(changed))


def test_torch_json_reads_both_reference_files(tmp_path):
  main = {"meta": {"torch": "2.13.0"}, "peak_gflops_reference": 220.0,
          "cases": {"conv64/train_step": {"images_per_s": 360.0}}}
  (tmp_path / "main.json").write_text(json.dumps(main))
  (tmp_path / "gan.json").write_text(json.dumps({"dcgan28/train_step": 412.0,
                                                 "dcgan28/latent_search": 11.6}))
  merged = reference.load_torch_results([str(tmp_path / "main.json"), str(tmp_path / "gan.json")])
  assert merged["meta"] == main["meta"] and merged["peak_gflops_reference"] == 220.0
  assert merged["cases"] == {"conv64/train_step": {"images_per_s": 360.0},
                             "dcgan28/train_step": {"images_per_s": 412.0},
                             "dcgan28/latent_search": {"images_per_s": 11.6}}
  results = {"cases": {"gan/train_step": {"images_per_s": 824.0}}}
  reference.add_torch(results, merged)
  assert results["cases"]["gan/train_step"]["jax_over_torch"] == pytest.approx(2.0)
  (tmp_path / "bad.json").write_text(json.dumps({"train_step": "fast"}))
  with pytest.raises(ValueError, match="bad keys \\['train_step'\\]"):
    reference.load_torch_results([str(tmp_path / "bad.json")])


def test_torch_results_add_a_ratio_column():
  record = {"images_per_s": 200.0, "compile_s": 1.0, "flops_per_image": 2.1e7,
            "gflops": 4.0, "fraction_of_peak": 0.1, "reference_mflop_per_image": 20.5}
  results = {"cases": {"mlp28/score_iwae_L15": dict(record),
                       "mlp28/score_elbo": dict(record)}}
  torch = {"meta": {"torch": "2.13.0"}, "peak_gflops_reference": 220.0,
           "cases": {"mlp28/score_iwae_L15_batched": {"images_per_s": 100.0,
                                                      "flops_per_image": 2.0e7}}}
  reference.add_torch(results, torch)
  iwae = results["cases"]["mlp28/score_iwae_L15"]
  assert iwae["torch_images_per_s"] == 100.0 and iwae["jax_over_torch"] == 2.0
  assert iwae["reference_mflop_per_image"] == 20.0
  assert "torch_images_per_s" not in results["cases"]["mlp28/score_elbo"]
  table = suite.markdown_table(results)
  assert "| jaxad/torch |" in table.splitlines()[0]
  assert "| 100.0 | 2.00 |" in table


def test_grid_cases_are_selected_by_name_and_timed(tmp_path):
  assert grid.select_grid_cases([]) == ([], [])
  chosen, rest = grid.select_grid_cases(["grid/mlp28", "conv64"])
  assert chosen == ["grid/mlp28_vmapped8", "grid/mlp28_sequential8"] and rest == ["conv64"]
  with pytest.raises(ValueError, match="grid cases are"):
    grid.select_grid_cases(["grid/nope"])
  out = tmp_path / "bench.json"
  results = suite.run(["grid/conv16"], TINY, out=str(out), peak_sizes=(128,), verbose=False)
  assert results["cases"] == {} and set(results["grid"]) == {
      "grid/conv16_vmapped8", "grid/conv16_sequential8"}
  vmapped = results["grid"]["grid/conv16_vmapped8"]
  assert vmapped["members"] == 8 and vmapped["images_per_s_per_member"] > 0
  assert vmapped["images_per_s"] == pytest.approx(8 * vmapped["images_per_s_per_member"])
  assert vmapped["speedup_over_sequential"] > 0 and vmapped["flops_per_call"] > 0
  assert json.loads(out.read_text())["grid"].keys() == results["grid"].keys()


def test_conv_profile_times_a_shape():
  from jaxad.bench import convs
  f_ms, f_rate, b_ms, b_rate = convs.conv_rates(8, 4, 8, 3, 1, repeats=1)
  assert min(f_ms, f_rate, b_ms, b_rate) > 0
  flops = 2.0 * 32 * 8 * 8 * 4 * 8 * 9  # batch 32, 8², 4→8, 3×3, stride 1
  assert f_rate == pytest.approx(flops / (f_ms / 1e3) / 1e9)
  assert b_rate == pytest.approx(3 * flops / (b_ms / 1e3) / 1e9)


def test_bench_grid_config_is_configs_grid_digits():
  # The grid case builds its config in the package; it must stay what the shipped
  # configs/grid_digits.py builds, or the benchmark would quietly measure another grid.
  from jaxad import config as config_lib
  from jaxad.grid import axes as grid_axes
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  shipped = grid_axes.load_experiment(os.path.join(root, "configs", "grid_digits.py"))
  assert config_lib.to_dict(grid.digits_grid_config()) == config_lib.to_dict(shipped)
