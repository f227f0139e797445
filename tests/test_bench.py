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

from jaxad.bench import cases, e2e, grid, reference, suite, timing
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
  assert "# e2e/mnist_npz (--case=e2e)" in out


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


# --------------------------------------------------------------------------
# e2e: the trainer and the eval binary on generated datasets
# --------------------------------------------------------------------------
_SMALL = (("model.latent_dim", 4), ("train.batch_size", 16), ("eval.batch_size", 16),
          ("eval.num_samples", 2), ("eval.bootstrap", 0))
# Datasets at their shipping shapes, few examples; models shrunk (inputs resized to 8).
TINY_E2E = {
    "mnist_npz": e2e.Sizes(train=200, val=20, test=40, epochs=2, pipeline_s=0.0,
                           overrides=_SMALL + (("data.image_size", 8),
                                               ("model.widths", (8,)))),
    "oct_png": e2e.Sizes(train=96, val=8, test=16, epochs=2, pipeline_s=0.0, eval=False,
                         overrides=_SMALL + (("data.image_size", 8),
                                             ("model.widths", (8,)))),
    "nodules_npz": e2e.Sizes(train=64, val=8, test=8, epochs=2, pipeline_s=0.0, eval=False,
                             overrides=_SMALL + (("data.image_size", 8), ("data.depth", 8),
                                                 ("model.widths", (4,)))),
}


def test_e2e_configs_are_the_shipped_ones():
  # The cases build their configs in the package; they must stay what configs/ builds.
  from jaxad import config as config_lib
  from jaxad.grid import axes as grid_axes
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for name, (path, build) in e2e.SHIPPED.items():
    shipped = grid_axes.load_experiment(os.path.join(root, path))
    assert config_lib.to_dict(build()) == config_lib.to_dict(shipped), path


def test_e2e_cases_are_selected_by_name():
  assert e2e.select_e2e_cases([]) == ([], [])
  assert e2e.select_e2e_cases(["e2e", "conv64"]) == (list(e2e.E2E_CASE_IDS), ["conv64"])
  assert e2e.select_e2e_cases(["e2e/oct"]) == (["e2e/oct_png"], [])
  with pytest.raises(ValueError, match="e2e cases are"):
    e2e.select_e2e_cases(["e2e/nope"])


@pytest.mark.parametrize("name, spatial, train_shape", [
    ("mnist_npz", (28, 28), (16, 8, 8, 1)),
    ("oct_png", (128, 128), (16, 8, 8, 1)),
    ("nodules_npz", (32, 32, 32), (16, 8, 8, 8, 1)),
])
def test_e2e_datasets_load_as_they_ship(tmp_path, name, spatial, train_shape):
  from jaxad.data import pipeline
  sizes = TINY_E2E[name]
  path = e2e.write_dataset(name, str(tmp_path), sizes)
  if path.endswith(".npz"):  # the MedMNIST layout, compressed as MedMNIST ships
    import zipfile
    with zipfile.ZipFile(path) as zf:
      assert all(i.compress_type == zipfile.ZIP_DEFLATED for i in zf.infolist())
    with np.load(path) as f:
      for split in ("train", "val", "test"):
        n = getattr(sizes, split)
        assert f[f"{split}_images"].dtype == np.uint8 and f[f"{split}_labels"].dtype == np.uint8
        assert f[f"{split}_images"].shape == (n, *spatial)
        assert f[f"{split}_labels"].shape == (n, 1)
  else:  # ROOT/<split>/<class>/*.png
    assert sorted(os.listdir(path)) == ["test", "train", "val"]
    assert sorted(os.listdir(os.path.join(path, "train"))) == sorted(e2e.OCT_CLASSES)
  # Through jaxad's sources: the shipped config's preprocessing reads every split.
  shipped = e2e.bench_config(name, path, e2e.Sizes(1, 1, 1))
  for role in ("train", "val", "test"):
    split = pipeline.load_split(shipped.data, role)
    image, mask = split.source.read(0)
    assert image.dtype == np.uint8 and image.shape == (*spatial, 1) and mask is None
    assert split.source.spatial_ndim == len(spatial)
    assert len(split.normal_indices) > 0
  assert len(split.source) == sizes.test and 0 < split.anomalous.sum() < sizes.test
  # The bench's (shrunk) config: batches of the model's input shape, in [-1, 1].
  config = e2e.bench_config(name, path, sizes)
  split = pipeline.load_split(config.data, "train")
  batch = next(pipeline.train_batches(split, config.data, seed=0, global_batch=16))
  assert batch["image"].shape == train_shape and batch["image"].dtype == np.float32
  assert -1 <= batch["image"].min() < batch["image"].max() <= 1


def test_e2e_cases_measure_every_rate(tmp_path):
  out = tmp_path / "bench.json"
  results = suite.run(["e2e"], TINY, out=str(out), peak_sizes=(128,), e2e_sizes=TINY_E2E,
                      verbose=False)
  assert results["cases"] == {} and list(results["e2e"]) == list(e2e.E2E_CASE_IDS)
  assert json.loads(out.read_text())["e2e"].keys() == results["e2e"].keys()
  assert len(results["meta"]["load_avg"]) == 3
  for cid, r in results["e2e"].items():
    sizes = TINY_E2E[cid.split("/")[1]]
    assert r["step_only_images_per_s"] > 0 and r["pipeline_images_per_s"] > 0
    assert r["step_only"]["flops_per_image"] > 0 and r["step_only"]["cpu_ms_per_image"] > 0
    assert set(r["runs"]) == {"streamed", "device"}
    for run in r["runs"].values():
      assert run["images_per_s"] > 0 and run["gflops"] > 0
      assert run["ratio"] == pytest.approx(run["images_per_s"] / run["step_only_images_per_s"])
      assert run["window_steps"] == r["steps_per_epoch"] * (sizes.epochs - 1)
      assert run["steps"] == r["steps_per_epoch"] * sizes.epochs
      assert run["val_s"] > 0 and run["train_only_images_per_s"] >= run["images_per_s"]
      assert run["train_step_compilations"] == 1 and run["pipeline_wait_s"] >= 0
    if sizes.eval:
      ev = r["eval"]
      assert ev["test_images"] == sizes.test and ev["images_per_s"] > 0
      assert ev["score_only_images_per_s"] > 0 and ev["phases"]["test_pass_s"] > 0
      assert len(ev["runs"]) == e2e.EVAL_RUNS and ev["first_run_s"] > 0
    else:
      assert "eval" not in r
  import logging
  assert not [h for h in logging.getLogger("jaxad").handlers
              if "jaxad_bench_e2e_" in getattr(h, "baseFilename", "")]  # closed with the runs
  table = e2e.e2e_table(results["e2e"]).splitlines()
  assert len(table) == 2 + 2 * 3 + 1 and "| — | — |" in table[2]
  assert table[2].startswith("| e2e/mnist_npz train, streamed |")
