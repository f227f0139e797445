"""The eval binary: every image once, every score, metrics, maps, report, batch scoring."""

import csv
import json
import os
import subprocess
import sys
import tempfile

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import snapshot
from jaxad import evaluation, files, metrics, scoring, trainer
from jaxad.grid import data as grid_data
from jaxad.grid import evaluate as grid_eval
from jaxad.data import lesions, pipeline
from jaxad.errors import CheckpointError, ConfigError
from jaxad.scores import pixel, sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Subprocesses share compiled programs, so each one does not recompile the score function.
SUBPROCESS_ENV = dict(os.environ, XLA_FLAGS="", TF_CPP_MIN_LOG_LEVEL="2",
                      JAX_COMPILATION_CACHE_DIR=os.path.join(tempfile.gettempdir(),
                                                             "jaxad-test-jax-cache"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A conv VAE trained on 16×16 synthetic images (test split has lesions and masks)."""
  from conftest import tiny_config
  config = tiny_config(**{"data.image_size": 16, "data.synthetic.image_size": 16,
                          "data.synthetic.num_examples": 96, "model.widths": (8, 16),
                          "model.latent_dim": 8, "train.num_steps": 150,
                          "train.log_every_steps": 50, "train.checkpoint_every_steps": 150,
                          "eval.batch_size": 40, "eval.num_samples": 5,
                          "eval.bootstrap": 10})
  workdir = str(tmp_path_factory.mktemp("trained"))
  trainer.train_and_evaluate(config, workdir)
  return workdir, config


def _rows(path):
  with open(path) as f:
    return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def evaluated(trained):
  """One evaluation on all 8 devices, maps saved; its files are read by several tests."""
  workdir, config = trained
  config = config.copy_and_resolve_references()
  config.eval.save_maps = True
  result = evaluation.evaluate(workdir, config=config)
  rows = _rows(os.path.join(workdir, "eval", "test", "scores.csv"))
  return workdir, config, result, rows


def test_every_image_scored_once_on_1_and_8_devices(evaluated):
  workdir, config, eight, rows_eight = evaluated
  n = len(pipeline.load_split(config.data, "test").source)
  assert n % config.eval.batch_size  # the last batch is padded
  assert len(rows_eight) == n == eight["num_images"]
  assert [int(r["index"]) for r in rows_eight] == list(range(n))  # once each, in order
  assert set(rows_eight[0]) >= {"id", "class", "anomalous", *sample.SAMPLE_SCORES}
  # One device and another eval.batch_size: keys are per image, so the same numbers.
  config = config.copy_and_resolve_references()
  config.eval.batch_size = 16
  one = evaluation.evaluate(workdir, config=config, split="test", devices=jax.devices()[:1])
  rows_one = _rows(os.path.join(workdir, "eval", "test", "scores.csv"))
  assert len(rows_one) == one["num_images"] == n
  # The second pass over the same test images takes their code lengths from the cache.
  first, second = eight["throughput"], one["throughput"]
  assert first["images"] == second["images"] == n and second["images_per_s"] > 0
  assert second["coder_cache_hits"] >= n  # (the first may find them too: one cache per worker)
  assert "from the cache" in evaluation.headline_table(one).splitlines()[-1]
  for a, b in zip(rows_one, rows_eight):
    assert a["index"] == b["index"]
    for k in sample.SAMPLE_SCORES:
      assert float(a[k]) == pytest.approx(float(b[k]), rel=1e-5, abs=1e-4)


def test_metrics_json_has_every_section(evaluated):
  workdir, config, result, _ = evaluated
  saved = json.load(open(os.path.join(workdir, "eval", "metrics.json")))["test"]
  corrected = {f"{k}_complexity{c}" for k in ("vae", "iwae") for c in ("", "_png")}
  assert set(saved["sample"]) == {*sample.SAMPLE_SCORES, "jpegxl_bpd", "png_bpd", *corrected}
  ranking = saved["ranking"]  # the synthetic validation split has no anomalies: said so
  assert ranking["by"] == "test AUROC" and "optimistic" in ranking["note"]
  assert ranking["best"] == ranking["order"][0]
  assert ranking["auroc"][ranking["best"]] == max(r["all"]["auroc"]
                                                  for r in saved["sample"].values())
  assert set(saved["sample"]["vae"]) == {"anomalous", "all"}
  assert set(saved["pixel"]) == set(pixel.PIXEL_MAPS)
  for m in saved["pixel"].values():
    assert set(m["thresholds"]) == {"calibrated", "pr_operating_point", "n_sigma"}
    assert "healthy validation" in m["thresholds"]["n_sigma"]["chosen_on"]
    assert "calibration" in m["thresholds"]["calibrated"]["chosen_on"]
  for k in sample.SAMPLE_SCORES:
    ci = saved["bootstrap"][k]
    assert ci["low"] <= ci["estimate"] <= ci["high"]
  for m in saved["pixel"].values():  # intervals of the very statistic reported
    ci = m["bootstrap"]
    assert ci["bins"] == config.eval.pixel_bins
    assert ci["auroc"]["estimate"] == m["auroc"] and ci["auprc"]["estimate"] == m["auprc"]
    assert ci["auroc"]["low"] <= m["auroc"] <= ci["auroc"]["high"]
  # The synthetic lesions are bright ellipses: reconstruction-based maps find them.
  assert result["pixel"]["rec_error"]["auroc"] > 0.75
  assert result["pixel"]["combi"]["auroc"] > 0.7
  assert result["sample"]["vae_rec"]["all"]["auroc"] > 0.6
  for m in saved["pixel"].values():  # an ellipse per lesioned image: a region or more
    assert 0.0 <= m["aupro"] <= 1.0 and m["lesion_regions"] >= saved["num_anomalous"]
    for t in m["thresholds"].values():
      assert 0 < t["dice_per_image"]["num_images"] <= saved["num_anomalous"]
  assert result["pixel"]["rec_error"]["aupro"] > 0.5
  # Image thresholds: the validation split has no anomaly, so no best F1, and the
  # default is the family's first score at N sigma of the healthy validation scores.
  section = saved["image_thresholds"]
  num_val = len(pipeline.load_split(config.data, "val").source)
  assert section["chosen_on"] == f"validation split: {num_val} images, 0 anomalous"
  assert section["default"]["score"] == "vae" and section["default"]["rule"] == "n_sigma"
  assert set(section["scores"]) == set(saved["sample"])
  for rules in section["scores"].values():
    assert set(rules) == {"n_sigma", "quantile"}
    assert rules["quantile"]["tn"] + rules["quantile"]["fp"] == \
        saved["num_images"] - saved["num_anomalous"]
  chosen = json.load(open(os.path.join(workdir, "eval", "thresholds.json")))
  assert chosen["default"] == section["default"] and chosen["step"] == saved["step"]
  assert chosen["scores"]["vae"]["n_sigma"]["threshold"] == \
      section["scores"]["vae"]["n_sigma"]["threshold"]
  assert set(chosen["maps"]) == set(pixel.PIXEL_MAPS)
  table = evaluation.headline_table(result)
  assert "pxAUPRO" in table and "image threshold: vae >= " in table
  print(table)


def test_report_files_are_valid(evaluated):
  workdir = evaluated[0]
  html = open(os.path.join(workdir, "eval", "test", "report.html")).read()
  assert "vae_rec" in html and "http" not in html.lower().replace("http-equiv", "")
  figures = os.path.join(workdir, "eval", "test", "figures")
  pngs = [f for f in os.listdir(figures) if f.endswith(".png")]
  assert len(pngs) >= 2 * len(sample.SAMPLE_SCORES)
  for f in pngs:
    with Image.open(os.path.join(figures, f)) as im:
      im.verify()


def test_saved_maps_and_streaming_pixel_auroc_match_exact(evaluated):
  workdir, config, result, _ = evaluated
  with np.load(os.path.join(workdir, "eval", "test", "maps.npz")) as f:
    maps = {k: f[k] for k in pixel.PIXEL_MAPS}
    index = f["index"]
  split = pipeline.load_split(config.data, "test")
  masks = np.stack([split.source.read(int(i))[1][..., 0] for i in index])
  assert maps["rec_error"].shape == masks.shape == (len(index), 16, 16)
  for k in pixel.PIXEL_MAPS:
    exact = metrics.auroc(masks.reshape(-1), maps[k].reshape(-1))
    assert result["pixel"][k]["auroc"] == pytest.approx(exact, abs=1e-3)


def _lesioned_by_index(split, config, batch_size, processes):
  """{index: (image, mask, anomalous)} from `processes` simulated processes' batches."""
  config = config.copy_and_resolve_references()
  config.eval.batch_size = batch_size
  spec = lesions.spec_from_config(config.data.synthetic_lesions)
  streams = [scoring.lesioned_batches(split, config, spec, process_index=p,
                                         process_count=processes)
             for p in range(processes)]
  out = {}
  for parts in zip(*streams):
    for part in parts:
      for j in np.flatnonzero(part["valid"] > 0):
        out[int(part["index"][j])] = (part["image"][j], part["mask"][j],
                                      int(part["anomalous"][j]))
  return out


def test_lesions_do_not_depend_on_batch_size_processes_or_the_grid(make_config):
  config = make_config(**{"data.synthetic_lesions.enabled": True,
                          "data.synthetic_lesions.fraction": 0.8})
  split = pipeline.load_split(config.data, "test")
  spec = lesions.spec_from_config(config.data.synthetic_lesions)
  reference = _lesioned_by_index(split, config, 16, 1)
  assert sorted(reference) == split.normal_indices.tolist()
  # Patch donors outside the image's batch of 8: what used to make lesions batch-bound.
  plans = {i: lesions.plan(i, spec, len(split.source)) for i in reference}
  position = {i: p for p, i in enumerate(split.normal_indices)}
  assert any(kind == "patch" and position.get(donor, -8) // 8 != position[i] // 8
             for i, (kind, donor) in plans.items())
  assert 0 < sum(a for _, _, a in reference.values()) < len(reference)
  for batch_size, processes in ((8, 1), (8, 2), (16, 4)):
    got = _lesioned_by_index(split, config, batch_size, processes)
    assert sorted(got) == sorted(reference)
    for i, (image, mask, anomalous) in reference.items():
      np.testing.assert_array_equal(got[i][0], image)
      np.testing.assert_array_equal(got[i][1], mask)
      assert got[i][2] == anomalous
  # The grid lesions the whole preprocessed split at once: the same images and masks.
  images, masks = grid_eval.lesioned(grid_data.preprocess(split, config.data)["image"],
                                     spec)
  for i, (image, mask, _) in reference.items():
    np.testing.assert_array_equal(images[i], image)
    np.testing.assert_array_equal(masks[i], mask)


def test_synthetic_lesions_give_pixel_metrics_without_masks(trained, tmp_path):
  workdir, config = trained
  config = config.copy_and_resolve_references()
  config.data.source = "digits"
  config.data.normal_classes = ()
  config.data.anomalous_classes = (9,)
  config.data.image_size = 16
  # The digits model is not trained: only the machinery (lesions → masks → curves) counts.
  config.data.synthetic_lesions.enabled = True
  config.eval.save_maps = True
  result = evaluation.evaluate(workdir, config=config)  # 8 devices, batches of 40
  assert result["synthetic_lesions"] and 0 < result["num_anomalous"] < result["num_images"]
  assert set(result["pixel"]) == set(pixel.PIXEL_MAPS)
  # The masks it scored are the lesions of batches of 16 on 2 processes.
  with np.load(os.path.join(workdir, "eval", "test", "maps.npz")) as f:
    saved, index = f["mask"], f["index"]
  split = pipeline.load_split(config.data, "test")
  expected = _lesioned_by_index(split, config, 16, 2)
  assert index.tolist() == sorted(expected)
  np.testing.assert_array_equal(saved, np.stack([expected[i][1][..., 0] for i in index]))
  rows = _rows(os.path.join(workdir, "eval", "test", "scores.csv"))
  assert [int(r["anomalous"]) for r in rows] == [expected[i][2] for i in index]


def test_patients_stay_on_one_side_of_validation_and_calibration(trained, tmp_path,
                                                                 monkeypatch):
  # A CSV data set with a patient column: the held-out validation images (the healthy
  # maps) and the Dice calibration part are drawn by patient.
  from test_splits import SIZES, _data_config, _groups, _one_side, _write_dataset
  workdir, config = trained
  groups = _groups()
  _write_dataset(tmp_path, "train", groups)
  _write_dataset(tmp_path, "test", groups, lesion=set(range(0, len(groups), 2)))
  config = config.copy_and_resolve_references()
  config.data = _data_config(tmp_path, mask_dir=str(tmp_path / "masks"))
  config.eval.bootstrap = 0
  seen = []
  real = evaluation.calibration_images
  monkeypatch.setattr(evaluation, "calibration_images",
                      lambda n, g, *a: seen.append(g) or real(n, g, *a))
  result = evaluation.evaluate(workdir, config=config)
  rows = _rows(os.path.join(workdir, "eval", "test", "scores.csv"))
  (passed,) = seen  # one patient id per scored image, in scoring order
  np.testing.assert_array_equal(passed, groups[[int(r["index"]) for r in rows]])
  for m in result["pixel"].values():
    assert "of the patients" in m["thresholds"]["calibrated"]["chosen_on"]
  train = pipeline.load_split(config.data, "train").source
  val = pipeline.load_split(config.data, "val").source
  assert len(train) + len(val) == sum(SIZES) and not set(train.groups) & set(val.groups)
  assert _one_side(groups, real(len(groups), groups, 0.2, config.seed)[0].nonzero()[0])


def test_minus_infinity_threshold_is_written_as_null_with_a_note(tmp_path):
  # A map that ranks no lesion pixel above a normal one: every pixel sits in the bottom
  # bin, so the best F1 flags everything, at the bottom bin's edge, −inf.
  curve = metrics.PixelCurve(10, (0.0, 1.0))
  masks = np.zeros((2, 4, 4), bool)
  masks[0, :2] = True  # 8 lesion pixels of 32
  curve.update(np.zeros((2, 4, 4), np.float32), masks)
  t, _ = curve.best_f1_threshold()
  assert t == -np.inf
  entry = evaluation.overlap_at(curve, t)
  assert entry["dice"] == pytest.approx(2 * 8 / (2 * 8 + 24))  # TP 8, FP 24, FN 0
  path = str(tmp_path / "metrics.json")
  files.write_json(path, {"pr_operating_point": entry})
  text = open(path).read()
  assert "Infinity" not in text
  saved = json.loads(text)["pr_operating_point"]
  assert saved["threshold"] is None and saved["threshold_note"].startswith("-inf, written as null")
  assert "threshold_note" not in evaluation.overlap_at(curve, 0.5)


def test_eval_batch_size_error_names_the_eval_key(make_config, tmp_path):
  config = make_config(**{"eval.batch_size": 12})  # 8 simulated devices
  with pytest.raises(ConfigError, match=r"^eval\.batch_size=12 is not divisible by the 8 "
                     r"devices.*--config\.eval\.batch_size to a multiple of 8"):
    evaluation.evaluate(str(tmp_path), config=config)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(CheckpointError, match="not a training workdir"):
    evaluation.evaluate(str(tmp_path))


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "jaxad.evaluate", *args], cwd=ROOT,
                        env=SUBPROCESS_ENV,
                        capture_output=True, text=True, timeout=300)


def _memory_growth_kib(workdir, warm_up, measured):
  """Scores `warm_up`, then `measured`, in one fresh process; returns how far scoring
  `measured` raised the peak resident memory above the memory held before it (KiB).

  The warm-up takes the one-off costs (imports, restore, compilation) and Linux's peak
  counter (VmHWM) is reset before the measured run, so the number is that run's own.
  """
  code = ("import re; from jaxad import evaluation\n"
          "kib = lambda k: int(re.search(k + r':\\s+(\\d+)', "
          "open('/proc/self/status').read()).group(1))\n"
          f"evaluation.evaluate({workdir!r}, input_path={warm_up!r})\n"
          "open('/proc/self/clear_refs', 'w').write('5')  # VmHWM := VmRSS\n"
          "before = kib('VmRSS')\n"
          f"evaluation.evaluate({workdir!r}, input_path={measured!r})\n"
          "print(kib('VmHWM') - before)")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=SUBPROCESS_ENV,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  return int(out.stdout.strip().splitlines()[-1])


def test_batch_scoring_cli_and_flat_memory(trained, tmp_path):
  workdir, _ = trained
  # 512×512 images (the pipeline resizes them to 16×16): the large file holds 250 MiB
  # of pixels, so reading it whole would raise the peak far above the bound (streamed,
  # the peak rises by tf.data's buffers, about 20-30 MiB).
  side, sizes = 512, {"small": 8, "large": 1000}
  row = np.broadcast_to(np.arange(side, dtype=np.uint8), (side, side))
  for name, n in sizes.items():
    np.savez(tmp_path / f"{name}.npz", images=np.broadcast_to(row, (n, side, side)))
  run = _cli(f"--workdir={workdir}", f"--input={tmp_path / 'small.npz'}")  # warms the cache
  assert run.returncode == 0, run.stderr[-2000:]
  rows = _rows(os.path.join(workdir, "eval", "input", "small", "scores.csv"))
  assert [r["id"] for r in rows] == [f"images/{i}" for i in range(sizes["small"])]
  if not os.access("/proc/self/clear_refs", os.W_OK):
    pytest.skip("measuring the peak needs Linux's /proc/self/clear_refs")
  folder = tmp_path / "folder"
  (folder / "sub").mkdir(parents=True)
  for i in range(6):
    Image.fromarray(np.full((16, 16), 20 * i, np.uint8)).save(
        folder / ("sub" if i % 2 else "") / f"{i}.png")
  growth = _memory_growth_kib(workdir, str(folder), str(tmp_path / "large.npz"))
  rows = _rows(os.path.join(workdir, "eval", "input", "large", "scores.csv"))
  assert len(rows) == sizes["large"] and all(np.isfinite(float(r["vae"])) for r in rows)
  whole = sizes["large"] * side * side // 1024
  assert growth < whole // 4, (growth, whole)  # flat memory


def test_cli_rejects_unknown_override(trained):
  workdir, _ = trained
  bad = _cli(f"--workdir={workdir}", "--config.eval.num_smaples=3")
  assert bad.returncode != 0 and "num_smaples" in bad.stderr


def _nan_scores(monkeypatch, purpose, score_index=None, map_index=None):
  """Makes the pass with `purpose`'s key give NaN `vae` scores to image `score_index`
  and an infinite rec_error map to image `map_index` (a diverged model's scores)."""
  from jaxad import keys
  import jax.numpy as jnp
  real = scoring.make_score_fn

  def make(family, with_maps):
    fn = real(family, with_maps)

    def scored(variables, images, index, key):
      out, maps = fn(variables, images, index, key)
      wanted = jax.random.key_data(keys.purpose_key(0, purpose))
      if np.array_equal(jax.random.key_data(key), wanted):
        if score_index is not None:
          out = {**out, "vae": jnp.where(index == score_index, jnp.nan, out["vae"])}
        if map_index is not None and maps:
          bad = (index == map_index)[:, None, None]
          maps = {**maps, "rec_error": jnp.where(bad, jnp.inf, maps["rec_error"])}
      return out, maps
    return scored

  monkeypatch.setattr(scoring, "make_score_fn", make)


def test_non_finite_scores_write_nothing_and_name_the_images(evaluated, monkeypatch):
  # The scores files used to be written before the check: NaN results, then a crash.
  from jaxad import keys
  workdir, config, _, _ = evaluated
  assert config.seed == 0
  before = snapshot(os.path.join(workdir, "eval"))
  ids = pipeline.load_split(config.data, "test").source.ids
  _nan_scores(monkeypatch, keys.EVAL, score_index=3, map_index=5)
  with pytest.raises(FloatingPointError) as err:
    evaluation.evaluate(workdir, config=config)
  message = str(err.value)
  assert message.startswith("the checkpoint at step 150 in ")
  assert (f"checkpoints gives non-finite scores for 2 of {len(ids)} images ({ids[3]}, "
         f"{ids[5]}): rec_error map, vae, vae_complexity, vae_complexity_png; no result "
         "file was written (the previous ones are kept)") in message
  assert "learning_rate" in message
  assert snapshot(os.path.join(workdir, "eval")) == before  # nothing new, nothing changed
  # Non-finite healthy maps (the N-sigma thresholds) stop it before the scoring pass.
  _nan_scores(monkeypatch, keys.HEALTHY, map_index=0)
  with pytest.raises(FloatingPointError, match=r"step 150 in .* gives non-finite rec_error "
                     r"maps on the healthy validation images"):
    evaluation.evaluate(workdir, config=config)
  assert snapshot(os.path.join(workdir, "eval")) == before


def test_each_split_keeps_its_own_report_and_stale_scratch_is_removed(evaluated):
  workdir, config, _, _ = evaluated
  test_dir, val_dir = (os.path.join(workdir, "eval", s) for s in ("test", "val"))
  report_before = snapshot(test_dir)
  # Scratch of killed evaluations of this split (old name; a dead process's; this
  # process's, not in use) is removed; a live process's is left alone.
  host = __import__("socket").gethostname()
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True).stdout.strip()
  stale = [".maps.k2x9q_1", f".maps.{host}.{dead}.abc", f".maps.{host}.{os.getpid()}.def"]
  live = f".maps.{host}.{os.getppid()}.ghi"
  for name in (*stale, live):
    os.makedirs(os.path.join(val_dir, name))
    open(os.path.join(val_dir, name, "rec_error.npy"), "wb").close()
  os.utime(os.path.join(val_dir, stale[0]), (0, 0))
  config = config.copy_and_resolve_references()
  config.eval.pixel_maps = False  # the validation masks are all empty: no pixel curve
  val = evaluation.evaluate(workdir, config=config, split="val")
  assert val["folder"] == os.path.join("eval", "val")
  assert sorted(f for f in os.listdir(val_dir) if f.startswith(".")) == [live]
  assert {"report.html", "scores.csv", "figures"} <= set(os.listdir(val_dir))
  html = open(os.path.join(val_dir, "report.html")).read()
  assert "val split" in html
  # The test split's report and figures are untouched; metrics.json keeps both splits.
  assert {k: v for k, v in snapshot(test_dir).items() if k in report_before} == \
      report_before
  assert "test split" in open(os.path.join(test_dir, "report.html")).read()
  saved = json.load(open(os.path.join(workdir, "eval", "metrics.json")))
  assert {"test", "val"} <= set(saved) and saved["val"]["num_images"] == val["num_images"]


def test_each_input_run_gets_a_new_folder(trained, tmp_path):
  workdir, config = trained
  images = np.random.default_rng(0).integers(0, 256, (5, 16, 16), np.uint8)
  path = tmp_path / "mine.npz"
  np.savez(path, images=images)
  first = evaluation.evaluate(workdir, config=config, input_path=str(path))
  kept = snapshot(os.path.join(workdir, first["folder"]))
  second = evaluation.evaluate(workdir, config=config, input_path=str(path))
  assert (first["folder"], second["folder"]) == (os.path.join("eval", "input", "mine"),
                                                 os.path.join("eval", "input", "mine-2"))
  assert snapshot(os.path.join(workdir, first["folder"])) == kept  # not overwritten
  for result in (first, second):
    folder = os.path.join(workdir, result["folder"])
    # maps saved by default: small, and what an --input run computes them for
    assert sorted(os.listdir(folder)) == ["maps.npz", "metrics.json", "scores.csv",
                                          "scores.npz"]
    saved = json.load(open(os.path.join(folder, "metrics.json")))
    assert saved["num_images"] == 5 and saved["maps"].startswith("saved in maps.npz")
    assert np.load(os.path.join(folder, "maps.npz"))["rec_error"].shape == (5, 16, 16)
    assert result["input"] == str(path)
  metrics_path = os.path.join(workdir, "eval", "metrics.json")
  assert not os.path.exists(metrics_path) or "input" not in json.load(open(metrics_path))


def test_maps_are_saved_by_default_when_cheap():
  """Maps computed for the pixel metrics cost only disk to save; an --input run computes
  them to save them; nothing beyond eval.max_saved_maps_mb; no maps without masks."""
  from jaxad import defaults
  e = defaults.get_config().eval
  names = ("rec_error", "kl_grad")
  plan = lambda n, **kw: evaluation.maps_plan(e, n, (64, 64), names, **kw)
  assert plan(100, for_metrics=True, is_input=False)[:2] == (True, True)
  assert plan(100, for_metrics=False, is_input=True)[:2] == (True, True)
  assert plan(100, for_metrics=False, is_input=False)[:2] == (False, False)
  too_many = int(e.max_saved_maps_mb * 2**20 / (64 * 64 * 2 * 4)) + 1
  computed, saved, why = plan(too_many, for_metrics=True, is_input=False)
  assert (computed, saved) == (True, False) and "max_saved_maps_mb" in why
  assert plan(too_many, for_metrics=False, is_input=True)[:2] == (False, False)
  e.save_maps = False
  assert plan(100, for_metrics=True, is_input=False)[:2] == (True, False)
