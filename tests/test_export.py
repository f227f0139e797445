"""The exported scorer (jax.export) and jaxad.scorer.from_workdir against the eval binary.

One tiny conv VAE with a background model (so the `*_llr` scores are exported too) is
trained and evaluated once; the export is loaded in a fresh process where flax, optax
and TensorFlow cannot be imported, through the runtime copied into the export folder.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from jaxad import evaluation, export, export_runtime, files, scorer, trainer
from jaxad.data import pipeline
from jaxad.errors import CheckpointError, ConfigError

# The eval binary's float32 numbers and the scorers' differ only by float32 rounding
# (other XLA kernels, batch shapes; the exported llr is a float32 difference where the
# eval binary's is float64): scores within 2e-6 relative here, maps see `close`.
RTOL = ATOL = 1e-5


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A conv VAE and its background model on 8×8 synthetic images (the test split has
  lesions with masks), evaluated on the test split with its maps saved."""
  from conftest import tiny_config
  config = tiny_config(**{"background.enabled": True, "train.num_steps": 4,
                          "train.checkpoint_every_steps": 4, "eval.batch_size": 16,
                          "eval.num_samples": 3, "eval.bootstrap": 0,
                          "eval.complexity": False, "eval.pixel_bins": 100,
                          "eval.num_examples": 2})
  workdir = str(tmp_path_factory.mktemp("trained"))
  trainer.train_and_evaluate(config, workdir)
  config = config.copy_and_resolve_references()
  config.eval.save_maps = True
  evaluation.evaluate(workdir, split="test", config=config)
  with np.load(os.path.join(workdir, "eval", "test", "scores.npz")) as f:
    scores = {k: f[k] for k in f.files}
  with np.load(os.path.join(workdir, "eval", "test", "maps.npz")) as f:
    maps = {k: f[k] for k in f.files}
  return workdir, config, scores, maps


@pytest.fixture(scope="module")
def split_images(trained):
  """The test split's preprocessed images and their indices, in reversed order (rows
  are matched to the eval binary's by index, not by position)."""
  _, config, _, _ = trained
  split = pipeline.load_split(config.data, "test")
  images, index = [], []
  for batch in pipeline.eval_batches(split, config.data, global_batch=32):
    valid = batch["valid"] > 0
    images.append(batch["image"][valid])
    index.append(batch["index"][valid])
  return np.concatenate(images)[::-1].copy(), np.concatenate(index)[::-1].copy()


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
  workdir = trained[0]
  return export.export(workdir, str(tmp_path_factory.mktemp("out") / "scorer"),
                       platforms=("cpu", "cuda"))


def close(got, expected, name, *, is_map=False):
  """Equal to float32 precision: within 1e-5 relative (or absolute); a map within 1e-5
  of its largest value over the split as well (gradient maps are small differences of
  large terms, so a pixel's last bits depend on the kernels and the batch shape)."""
  scale = float(np.max(np.abs(expected))) if is_map else 1.0
  np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL * max(scale, 1.0),
                             err_msg=name)


def assert_equal_to_eval(got_scores, got_maps, index, trained, score_names, map_names):
  """Scores and maps equal the eval binary's files, rows matched by index."""
  _, _, scores, maps = trained
  assert set(score_names) == set(scores) - {"id", "index", "class_name", "anomalous"}
  assert set(map_names) == set(maps) - {"id", "index", "mask"}
  assert any(k.endswith("_llr") for k in score_names)
  rows = {int(i): r for r, i in enumerate(scores["index"])}
  take = np.array([rows[int(i)] for i in index])
  map_rows = {int(i): r for r, i in enumerate(maps["index"])}
  take_maps = np.array([map_rows[int(i)] for i in index])
  for k in score_names:
    assert got_scores[k].dtype == np.float32 and got_scores[k].shape == (len(index),)
    close(got_scores[k], scores[k][take], k)
  for k in map_names:
    assert got_maps[k].shape == maps[k][take_maps].shape
    close(got_maps[k], maps[k][take_maps], k, is_map=True)


def in_batches(score, images, index, sizes):
  """Scores the images in consecutive batches of the given sizes, concatenated."""
  got_scores, got_maps, start = {}, {}, 0
  for size in sizes:
    s, m = score(images[start:start + size], index[start:start + size])
    for out, part in ((got_scores, s), (got_maps, m)):
      for k, v in part.items():
        out.setdefault(k, []).append(v)
    start += size
  assert start == len(images)
  return ({k: np.concatenate(v) for k, v in got_scores.items()},
          {k: np.concatenate(v) for k, v in got_maps.items()})


_FRESH_PROCESS = """
import json, sys
for name in ("flax", "optax", "tensorflow", "jaxad"):  # importing them fails here
  sys.modules[name] = None
folder, data, out = sys.argv[1:]
sys.path.insert(0, folder)
import numpy as np
import jaxad_scorer
scorer = jaxad_scorer.load(folder)
with np.load(data) as f:
  images, index = f["image"], f["index"]
results = {}
for start in range(0, len(images), 5):  # batches of 5, the last one ragged
  scores, maps = scorer(images[start:start + 5], index[start:start + 5])
  for k, v in {**scores, **{"map_" + k: v for k, v in maps.items()}}.items():
    results.setdefault(k, []).append(v)
np.savez(out, **{k: np.concatenate(v) for k, v in results.items()})
print(json.dumps({"score_names": scorer.score_names, "map_names": scorer.map_names,
                  "image_shape": scorer.image_shape, "thresholds": scorer.thresholds}))
"""


def test_exported_scorer_in_a_fresh_process_equals_the_eval_binary(trained, split_images,
                                                                    exported, tmp_path):
  images, index = split_images
  assert len(images) % 5  # a ragged last batch
  data, out = str(tmp_path / "images.npz"), str(tmp_path / "out.npz")
  np.savez(data, image=images, index=index)
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", TF_CPP_MIN_LOG_LEVEL="2",
             JAX_COMPILATION_CACHE_DIR=os.path.join(tempfile.gettempdir(),
                                                    "jaxad-test-jax-cache"))
  run = subprocess.run([sys.executable, "-c", _FRESH_PROCESS, exported, data, out],
                       capture_output=True, text=True, env=env, cwd=str(tmp_path),
                       timeout=120)
  assert run.returncode == 0, run.stderr[-3000:]
  info = json.loads(run.stdout.strip().splitlines()[-1])
  assert tuple(info["image_shape"]) == images.shape[1:]
  with np.load(out) as f:
    got = {k: f[k] for k in f.files}
  maps = {k[len("map_"):]: got.pop(k) for k in list(got) if k.startswith("map_")}
  assert_equal_to_eval(got, maps, index, trained, info["score_names"], info["map_names"])
  meta = files.read_json(os.path.join(exported, export_runtime.META_FILE))
  assert info["thresholds"] == meta["thresholds"]


def test_scorer_json_describes_the_export(trained, exported):
  workdir, config, _, _ = trained
  meta = files.read_json(os.path.join(exported, export_runtime.META_FILE))
  assert meta["format"] == export_runtime.FORMAT and meta["family"] == "vae"
  assert meta["image_shape"] == [8, 8, 1] and meta["spatial_ndim"] == 2
  assert {"cpu", "cuda"} <= set(meta["platforms"])
  assert "tpu" in meta["platforms"] or "tpu" in meta["platforms_not_exported"]
  assert meta["preprocessing"]["image_size"] == 8
  assert meta["preprocessing"]["bit_depth"] == 8
  assert meta["config"]["model"]["widths"] == list(config.model.widths)
  assert meta["step"] == config.train.num_steps and meta["background"]["step"] == 4
  assert set(meta["versions"]) == {"jaxad", "jax", "jaxlib"}
  # The eval binary's thresholds of this checkpoint, copied as they are.
  saved = files.read_json(os.path.join(workdir, "eval", "thresholds.json"))
  assert saved["step"] == meta["step"] and "vae_llr" in saved["scores"]
  assert meta["thresholds"] == saved and "thresholds_note" not in meta
  with np.load(os.path.join(exported, export_runtime.VARIABLES_FILE)) as f:
    assert len(f.files) == meta["serialization"]["num_variables"]
  assert sorted(os.listdir(exported)) == sorted(
      [export_runtime.META_FILE, export_runtime.FUNCTION_FILE,
       export_runtime.VARIABLES_FILE, export_runtime.RUNTIME_FILE])
  assert not [f for f in os.listdir(os.path.dirname(exported)) if f.startswith(".")]


def test_from_workdir_scores_equal_the_eval_binary(trained, split_images):
  workdir, config, _, _ = trained
  s = scorer.from_workdir(workdir, config=config)
  images, index = split_images
  assert s.image_shape == images.shape[1:]
  # 16 = the eval batch (its compiled program), 13 and 3: not multiples of 8 devices.
  got, maps = in_batches(s, images, index, [16, 16, 16, 13, 3])
  assert_equal_to_eval(got, maps, index, trained, s.score_names, s.map_names)
  plain = scorer.from_workdir(workdir, config=config, with_maps=False)
  assert plain.map_names == () and plain(images[:0])[0]["vae"].shape == (0,)


def test_thresholds_are_taken_only_for_the_scored_step(tmp_path):
  workdir = str(tmp_path)
  found, note = scorer.thresholds(workdir, 12)
  assert found == {} and "no eval/thresholds.json" in note
  saved = {"step": 12, "default": {"score": "vae", "rule": "n_sigma"}, "scores": {}}
  files.write_json(os.path.join(workdir, "eval", "thresholds.json"), saved)
  assert scorer.thresholds(workdir, 12) == (saved, None)
  found, note = scorer.thresholds(workdir, 30)
  assert found == {} and "step 12, not 30" in note


def _broken_copy(exported, tmp_path, name):
  folder = str(tmp_path / name)
  shutil.copytree(exported, folder)
  return folder


def _edit_meta(folder, **changes):
  path = os.path.join(folder, export_runtime.META_FILE)
  meta = files.read_json(path)
  meta.update(changes)
  files.write_json(path, meta)


def test_load_refuses_what_it_cannot_run(exported, tmp_path):
  def refused(folder, *words):
    with pytest.raises(CheckpointError) as e:
      export.load(folder)
    assert isinstance(e.value, export_runtime.ScorerError)
    for w in words:
      assert w in str(e.value)

  future = _broken_copy(exported, tmp_path, "future")
  _edit_meta(future, format=export_runtime.FORMAT + 1)
  refused(future, f"format {export_runtime.FORMAT + 1}", "export the workdir again")
  tpu = _broken_copy(exported, tmp_path, "tpu")
  _edit_meta(tpu, platforms=["tpu"])
  refused(tpu, "exported for tpu", "runs on cpu", "--platforms=tpu,cpu")
  newer = _broken_copy(exported, tmp_path, "newer")
  _edit_meta(newer, serialization={"calling_convention_version": 99},
             versions={"jax": "9.9.9"})
  refused(newer, "jax 9.9.9", "version 99", "pip install jax==9.9.9")
  garbled = _broken_copy(exported, tmp_path, "garbled")
  with open(os.path.join(garbled, export_runtime.FUNCTION_FILE), "wb") as f:
    f.write(b"\0" * 64)
  refused(garbled, "cannot read", export_runtime.FUNCTION_FILE)
  for name in (export_runtime.VARIABLES_FILE, export_runtime.META_FILE):
    missing = _broken_copy(exported, tmp_path, "missing_" + name)
    os.remove(os.path.join(missing, name))
    refused(missing, name, "is missing", "copy the whole export folder")
  refused(str(tmp_path / "nowhere"), "is not a folder")


def test_scorer_checks_its_inputs(exported):
  s = export_runtime.Scorer(files.read_json(os.path.join(exported, "scorer.json")),
                            lambda images, index: None)
  with pytest.raises(export_runtime.ScorerError, match="leading batch axis"):
    s(np.zeros((8, 8, 1), np.float32))
  with pytest.raises(export_runtime.ScorerError, match="raw pixel values"):
    s(np.zeros((2, 8, 8, 1), np.uint8))
  with pytest.raises(export_runtime.ScorerError, match="one integer position per image"):
    s(np.zeros((2, 8, 8, 1), np.float32), np.zeros(3, np.int32))


def test_an_existing_export_is_never_overwritten(trained, exported):
  before = {f: os.path.getmtime(os.path.join(exported, f)) for f in os.listdir(exported)}
  with pytest.raises(ConfigError, match="never overwritten"):
    export.export(trained[0], exported)
  assert before == {f: os.path.getmtime(os.path.join(exported, f))
                    for f in os.listdir(exported)}
  with pytest.raises(ConfigError, match="unknown platform"):
    export.export(trained[0], exported + "-2", platforms=("cpu", "tpuu"))
  assert not os.path.exists(exported + "-2")


def test_platforms_that_do_not_lower_are_left_out_or_refused():
  import jax
  import jax.numpy as jnp

  def cpu_only(x):  # XLA has a Schur decomposition on the CPU alone
    return jax.lax.linalg.schur(jnp.outer(x, x))[0]

  specs = [jax.ShapeDtypeStruct((3,), jnp.float32)]
  exported, left_out = export.lower(cpu_only, specs, ("cpu",), ("tpu",))
  assert exported.platforms == ("cpu",) and "schur" in left_out["tpu"]
  with pytest.raises(ConfigError, match="drop the platform that fails"):
    export.lower(cpu_only, specs, ("cpu", "cuda"), ())
