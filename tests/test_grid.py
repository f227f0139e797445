"""Hyperparameter grids: members equal single runs, own data streams, tables, resume."""

import csv
import io
import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from jaxad import evaluation, keys, metrics, parallel, scoring, trainer
from jaxad import files as files_lib
from jaxad import state as state_lib
from jaxad.grid import axes as grid_axes
from jaxad.grid import data as grid_data
from jaxad.grid import evaluate as grid_eval
from jaxad.grid import report as grid_report
from jaxad.grid import run as grid
from jaxad.grid import train as grid_train
from jaxad.data import lesions, pipeline
from jaxad.errors import ConfigError


def _grid_config(make_config, axes, **overrides):
  config = grid_axes.with_grid(make_config(**overrides))
  config.grid.axes = ml_collections.ConfigDict(axes)
  return config


def _digits(make_config, **overrides):
  return make_config(**{"data.source": "digits", "data.normal_classes": (),
                        "data.anomalous_classes": (9,), "train.batch_size": 32,
                        **overrides})


def _member_params(state, k):
  return [np.asarray(x[k]) for x in jax.tree.leaves((state.params, state.model_state))]


def _params(state):
  return [np.asarray(x) for x in jax.tree.leaves((state.params, state.model_state))]


def test_members_equal_single_runs_with_plateau_and_early_stopping(make_config, tmp_path):
  # 8 members (one per device): seeds × β × min_delta; min_delta = 1e6 never counts as
  # an improvement, so those members stop after epoch 2 while the others run 3 epochs.
  config = _grid_config(make_config, {
      "seed": (0, 1), "beta": (0.01, 1.0), "train__min_delta": (0.0, 1e6)},
      **{"train.num_steps": 12, "data.val_split": "val", "train.plateau_patience": 1,
         "train.early_stop_patience": 1})
  (group,) = grid_axes.plan(config)
  assert len(group.members) == 8
  state, summary = grid_train.train_group(group, str(tmp_path / "grid"), parallel.make_mesh(),
                                          progress=False)
  steps = [m["steps"] for m in summary["members"]]
  assert steps == [12, 8] * 4  # members stopped at different epochs
  assert summary["finished"]
  lrs = np.asarray(state.opt_state.hyperparams["learning_rate"])
  for k in (1, 6):  # seed 0, β 0.01, stops early; seed 1, β 1, runs to the end
    member = group.members[k]
    alone, info = trainer.train_and_evaluate(member.config, str(tmp_path / f"alone{k}"),
                                             devices=jax.devices()[:1])
    assert int(alone.step) == steps[k] and info["stopped_early"] == (k == 1)
    assert float(alone.best_val) == pytest.approx(float(state.best_val[k]), rel=1e-6)
    assert float(alone.opt_state.hyperparams["learning_rate"]) == pytest.approx(lrs[k])
    for a, b in zip(_params(alone), _member_params(state, k)):
      np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)
  # The same grid on one device: the member axis unsharded, same numbers.
  one, _ = grid_train.train_group(group, str(tmp_path / "one"),
                                  parallel.make_mesh(jax.devices()[:1]), progress=False)
  for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6)


def test_left_out_classes_give_each_member_its_own_data(make_config, tmp_path):
  config = _grid_config(make_config, {"left_out_class": (3, 5)},
                        **{"data.source": "digits", "data.normal_classes": (),
                           "train.batch_size": 32, "train.num_steps": 12})
  (group,) = grid_axes.plan(config)
  data = grid_data.load_data(group)
  streams = grid_data.Streams(data.train_splits, [0, 0], 32)
  # Each member's stream is exactly the single-model pipeline's, pixels included.
  for k, member in enumerate(group.members):
    batches = pipeline.train_batches(data.train_splits[k], member.config.data, seed=0,
                                     global_batch=32)
    for step in range(2):
      batch = next(batches)
      np.testing.assert_array_equal(streams.indices(step)[k], batch["index"])
      np.testing.assert_array_equal(data.train["image"][batch["index"]], batch["image"])
  assert not np.array_equal(streams.indices(0)[0], streams.indices(0)[1])
  _, summary = grid_train.train_group(group, str(tmp_path), parallel.make_mesh(),
                                      data=data, progress=False)
  seen = [m["labels_seen"] for m in summary["members"]]
  assert "3" not in seen[0] and "5" in seen[0]
  assert "5" not in seen[1] and "3" in seen[1]
  assert sum(seen[0].values()) == sum(seen[1].values()) == 12 * 32


def _small_grid(make_config, **overrides):
  return _grid_config(make_config, {"seed": (0, 1), "latent_dim": (2, 4)}, **{
      "train.num_steps": 4, "train.checkpoint_every_steps": 2, "eval.num_samples": 2,
      "eval.batch_size": 32, "data.synthetic_lesions.enabled": True, **overrides})


@pytest.fixture(scope="module")
def full_grid(tmp_path_factory):
  from conftest import tiny_config
  workdir = str(tmp_path_factory.mktemp("grid"))
  return workdir, grid.run_grid(_small_grid(lambda **o: tiny_config(**o)), workdir)


def test_grid_writes_one_row_per_member_and_score(full_grid):
  workdir, results = full_grid
  assert results["complete"]
  assert results["member_axes"] == ["seed"] and results["group_axes"] == ["latent_dim"]
  assert [len(g["members"]) for g in results["groups"]] == [2, 2]
  with open(os.path.join(workdir, "grid.csv")) as f:
    table = list(csv.DictReader(f))
  assert list(table[0]) == ["group", "member", "seed", "latent_dim", "score", "kind",
                            "auroc", "auprc"]
  # 4 members × (6 sample scores + 2 code lengths + 4 complexity-corrected scores
  # + 5 pixel maps), each once.
  keys = {(r["group"], r["member"], r["score"]) for r in table}
  assert len(table) == len(keys) == 4 * 17 == results["num_rows"]
  assert {"vae_complexity", "iwae_complexity_png", "jpegxl_bpd"} <= {r["score"] for r in table}
  assert {r["kind"] for r in table} == {"sample", "pixel"}
  assert all(0.0 <= float(r["auroc"]) <= 1.0 for r in table)
  saved = json.load(open(os.path.join(workdir, "grid.json")))
  for m in (m for g in saved["groups"] for m in g["members"]):
    assert all(p["clipped_pixels"] >= 0 and p["value_range"][0] == 0.0
               for p in m["pixel"].values())
  for name in ("grid.json", "grid.html", "figures/auroc_vs_latent_dim.png",
               "groups/g000.json", "groups/g001.json"):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert not os.path.exists(os.path.join(workdir, "groups/g000/checkpoints"))


def _numbers(results):
  return [(m["steps"], m["param_norm"], m["last_loss"],
           {k: v["auroc"] for k, v in {**m["sample"], **m["pixel"]}.items()})
          for g in results["groups"] for m in g["members"]]


def test_interrupted_grid_resumes_bit_identically(make_config, full_grid, tmp_path):
  _, full = full_grid
  config = _small_grid(make_config)
  # Killed in the second group after step 3 (its checkpoint is step 2).
  part = grid.run_grid(config, str(tmp_path), stop_at=(1, 3))
  assert not part["complete"] and len(part["groups"]) == 1
  assert os.listdir(tmp_path / "groups" / "g001" / "checkpoints") == ["2"]
  resumed = grid.run_grid(config, str(tmp_path))
  assert [g["trained_now"] for g in resumed["groups"]] == [False, True]
  assert _numbers(resumed) == _numbers(full)
  again = grid.run_grid(config, str(tmp_path))
  assert [g["trained_now"] for g in again["groups"]] == [False, False]
  with pytest.raises(Exception, match="holds another grid"):
    grid.run_grid(_small_grid(make_config, **{"train.num_steps": 5}), str(tmp_path))


@pytest.mark.parametrize("axes, message", [
    ({"latnet_dim": (2, 4)}, "grid.axes.latnet_dim: 'latnet_dim' is not a config key"),
    ({"seed": ()}, "grid.axes.seed=.* must be a non-empty tuple"),
    ({"seed": (0, 0)}, "repeats a value"),
    ({"c": (1.0,), "beta": (2.0,)}, "sets both c and beta"),
    ({"latent_dim": ("big",)}, "grid.axes.latent_dim: cannot set model.latent_dim"),
    ({"beta": (-1.0,)}, "model.beta"),
])
def test_bad_axes_name_the_key(make_config, axes, message):
  with pytest.raises(ConfigError, match=message):
    grid_axes.plan(_grid_config(make_config, axes))


def test_c_needs_a_gaussian_decoder_and_sets_beta(make_config):
  (group,) = grid_axes.plan(_grid_config(make_config, {"c": (0.5, 1)}))
  assert [m.config.model.beta for m in group.members] == [1.0, 2.0]
  with pytest.raises(ConfigError, match="grid.axes.c needs model.likelihood='gaussian'"):
    grid_axes.plan(_grid_config(make_config, {"c": (1.0,)},
                                **{"model.likelihood": "bernoulli"}))


def test_grid_pixel_range_is_the_eval_binarys_and_counts_clipped_pixels(
    make_config, tmp_path, monkeypatch):
  # A narrow range (RANGE_FACTOR 0.5) so that test maps exceed it: the old grid took
  # its range from the first test batch and clipped later values without a word.
  monkeypatch.setattr(scoring, "RANGE_FACTOR", 0.5)
  config = _grid_config(make_config, {"seed": (0, 1)}, **{
      "train.num_steps": 4, "eval.batch_size": 16, "data.synthetic_lesions.enabled": True})
  (group,) = grid_axes.plan(config)
  mesh = parallel.make_mesh()
  data = grid_data.load_data(group)
  state, _ = grid_train.train_group(group, str(tmp_path), mesh, data=data, progress=False)
  results = grid_eval.evaluate_group(group, state, data, mesh, progress=False)
  spec = lesions.spec_from_config(config.data.synthetic_lesions)
  images, masks = grid_eval.lesioned(data.test["image"], spec)
  for k, member in enumerate(group.members):
    # The eval binary's own functions on this member: its healthy maximum and maps.
    c = member.config
    family, _ = state_lib.build(c, 2)
    score_fn = scoring.make_score_fn(family, True)
    variables = jax.tree.map(lambda x: x[k], {"params": state.params, **state.model_state})
    stats = scoring.healthy_map_stats(score_fn, variables, data.val_splits[k], c, mesh,
                                         c.seed)
    normal = data.test_split.normal_indices
    padded = np.r_[normal, np.full(-len(normal) % 16, normal[0])].reshape(-1, 16)
    maps = {}
    for rows in padded:  # image i keyed by fold_in(purpose_key(seed, EVAL), i)
      _, out = score_fn(variables, *parallel.put_batch((images[rows], rows.astype(np.int32)),
                                                       mesh),
                        keys.purpose_key(c.seed, keys.EVAL))
      for name, v in out.items():
        maps.setdefault(name, []).append(np.asarray(v))
    for name, got in results[k]["pixel"].items():
      hi = 0.5 * stats[name]["max"]
      assert got["value_range"] == pytest.approx([0.0, hi], rel=1e-5), name
      values = np.concatenate(maps[name])[:len(normal)]
      above = np.count_nonzero(values >= hi)
      assert above > 0 and got["clipped_pixels"] == pytest.approx(above, abs=2), name
      reference = metrics.PixelCurve(c.eval.pixel_bins, (0.0, hi))
      reference.update(values, masks[normal][..., 0])
      assert got["auroc"] == pytest.approx(reference.auroc(), abs=1e-3), name


def test_grid_trains_background_models_and_scores_as_the_eval_binary(make_config, tmp_path):
  """Each member's background model (Ren et al.) is trained in the same vmapped way;
  its likelihood ratio and the complexity scores are the eval binary's numbers."""
  config = _grid_config(make_config, {"seed": (0, 1)}, **{
      "train.num_steps": 6, "eval.batch_size": 16, "eval.num_samples": 2,
      "eval.pixel_maps": False, "eval.bootstrap": 0, "background.enabled": True})
  results = grid.run_grid(config, str(tmp_path / "grid"), progress=False)
  members = results["groups"][0]["members"]
  assert [m["background"]["steps"] for m in members] == [6, 6]
  (group,) = grid_axes.plan(config)
  member = group.members[1]
  alone = str(tmp_path / "alone")
  trainer.train_and_evaluate(member.config, alone, devices=jax.devices()[:1])
  single = evaluation.evaluate(alone, config=member.config, devices=jax.devices()[:1])
  got = members[1]["sample"]
  for name in ("vae", "vae_llr", "iwae_llr", "vae_complexity", "iwae_complexity_png"):
    assert got[name]["auroc"] == pytest.approx(single["sample"][name]["all"]["auroc"],
                                               abs=0.02), name
  # The ratio is not the model's own score: the background model changes the ranking.
  assert got["vae_llr"]["auroc"] != got["vae"]["auroc"]


def test_test_images_are_coded_once_per_data_config(make_config):
  from jaxad.scores import complexity
  config = _grid_config(make_config, {"latent_dim": (2, 4)})
  first, second = grid_axes.plan(config)
  cache = {}
  a, b = grid_data.load_data(first, cache), grid_data.load_data(second, cache)
  assert a.test_lengths is b.test_lengths  # one coding for both groups
  want = complexity.lengths(a.test["image"], int(config.data.bit_depth))
  for k, v in a.test_lengths.result().items():
    np.testing.assert_array_equal(v, want[k])
  config.eval.complexity = False
  assert grid_data.load_data(grid_axes.plan(config)[0]).test_lengths is None


def _fake_group(name, latent_dim):
  """A group record as _run_group makes it: scores in scoring order (derived last)."""
  sample_names = ("vae", "vae_kl", "vae_rec", "iwae", "iwae_kl", "iwae_rec",
                  "vae_complexity", "iwae_complexity", "jpegxl_bpd")
  members = [{"member": k, "values": {"seed": k, "latent_dim": latent_dim},
              "sample": {n: {"auroc": 0.5 + 0.01 * i + 0.1 * k, "auprc": 0.5}
                         for i, n in enumerate(sample_names)},
              "pixel": {"rec_error": {"auroc": 0.7, "auprc": 0.2}}} for k in (0, 1)]
  return {"name": name, "values": {"latent_dim": latent_dim}, "members": members}


def test_grid_csv_rows_do_not_depend_on_which_groups_were_read_back(tmp_path):
  # A resumed grid reads finished groups back from JSON, written with sorted keys: the
  # derived scores then came in another order, and the row order followed the first
  # group's dicts.
  def results(groups):
    return {"axes": {"seed": [0, 1], "latent_dim": [2, 4]}, "groups": groups}

  fresh = [_fake_group("g000", 2), _fake_group("g001", 4)]
  files_lib.write_json(str(tmp_path / "g000.json"), fresh[0])
  read_back = [files_lib.read_json(str(tmp_path / "g000.json")), _fake_group("g001", 4)]
  assert list(read_back[0]["members"][0]["sample"]) != list(fresh[0]["members"][0]["sample"])
  texts = []
  for i, groups in enumerate((fresh, read_back, read_back[::-1])):
    grid_report.write_csv(str(tmp_path / f"{i}.csv"), results(groups))
    texts.append((tmp_path / f"{i}.csv").read_text())
  assert texts[0] == texts[1] == texts[2]
  table = list(csv.DictReader(io.StringIO(texts[0])))
  assert [(r["group"], r["member"]) for r in table[::10]] == [
      ("g000", "0"), ("g000", "1"), ("g001", "0"), ("g001", "1")]
  assert [r["score"] for r in table[:10]] == [
      *grid_report.KINDS["sample"], "iwae_complexity", "jpegxl_bpd", "vae_complexity",
      "rec_error"]
