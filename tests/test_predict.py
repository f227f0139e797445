"""python -m jaxad.predict: scores equal the Scorer's, labels at the threshold, overlays,
summary, new folders per run, clear errors; NIfTI volumes in and NIfTI maps out."""

import csv
import io
import json
import logging
import os
import re
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from PIL import Image

from conftest import snapshot
from jaxad import cli, files, overlays, predict, scorer, trainer
from jaxad.data import pipeline, sources
from jaxad.errors import ConfigError, DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBPROCESS_ENV = dict(os.environ, XLA_FLAGS="", TF_CPP_MIN_LOG_LEVEL="2",
                      JAX_COMPILATION_CACHE_DIR=os.path.join(tempfile.gettempdir(),
                                                             "jaxad-test-jax-cache"))


def _rows(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


class _Lines(logging.Handler):
  def __init__(self):
    super().__init__()
    self.lines = []

  def emit(self, record):
    self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A conv VAE on 8×8 images, and a folder of PNGs as a user has them: uint8, other
  sizes than the model's (the pipeline resizes), one RGB, one in a subfolder."""
  from conftest import tiny_config
  config = tiny_config(**{"train.num_steps": 4, "train.checkpoint_every_steps": 4,
                          "train.log_every_steps": 4, "eval.batch_size": 16,
                          "eval.num_samples": 2})
  root = tmp_path_factory.mktemp("predict")
  workdir = str(root / "wd")
  trainer.train_and_evaluate(config, workdir)
  folder = root / "scans"
  (folder / "sub").mkdir(parents=True)
  rng = np.random.default_rng(0)
  for i in range(7):
    shape = (10 + i, 12, 3) if i == 2 else (9 + 2 * i, 12)
    Image.fromarray(rng.integers(0, 256, shape).astype(np.uint8)).save(
        folder / ("sub" if i % 2 else "") / f"scan {i}.png")
  return workdir, config, str(folder)


def _direct(workdir, config, path, ndim=2):
  """The Scorer of the workdir called directly on the input's preprocessed images."""
  split = pipeline.Split(sources.unlabeled_source(path, ndim), np.array([0]))
  n = len(split.source)
  images = pipeline.preprocessed_images(split, config.data, np.arange(n))
  s = scorer.from_workdir(workdir, with_maps=True)
  scores, maps = s(images, np.arange(n))
  return s, list(split.source.ids), images, scores, maps


def test_without_thresholds_scores_are_written_with_a_warning(trained):
  workdir, _, folder = trained
  handler = _Lines()
  logging.getLogger("jaxad").addHandler(handler)
  try:
    result = predict.predict(folder, workdir=workdir, maps="none", top_k=3,
                             batch_size=8, progress=False)
  finally:
    logging.getLogger("jaxad").removeHandler(handler)
  rows = _rows(os.path.join(result["folder"], "predictions.csv"))
  assert len(rows) == 7 and {r["pred_label"] for r in rows} == {"n/a"}
  assert {r["threshold"] for r in rows} == {""} and rows[0]["score_name"] == "vae"
  assert not os.path.exists(os.path.join(result["folder"], "overlays"))
  warning = next(line for line in handler.lines if "no image-level threshold" in line)
  assert "python -m jaxad.evaluate" in warning and "--threshold" in warning
  assert result["num_predicted_anomalous"] is None
  assert "pred_label is n/a" in predict.summary_line(result)


@pytest.fixture(scope="module")
def predicted(trained):
  """thresholds.json written per the contract (image threshold between the scores,
  rec_error outlined at its median), then one predict run with overlays."""
  workdir, config, folder = trained
  s, ids, images, scores, maps = _direct(workdir, config, folder)
  t = float(np.median(scores["vae_rec"]))
  t_map = float(np.median(maps["rec_error"]))
  thresholds = {
      "step": s.meta["step"], "chosen_on": "validation split: 16 images, 0 anomalous",
      "default": {"score": "vae_rec", "rule": "n_sigma",
                  "why": "the family's first score; N-sigma: no validation anomaly"},
      "scores": {"vae_rec": {"n_sigma": {"threshold": t, "n_sigma": 3.0, "mean": 0.0,
                                         "std": t / 3},
                             "quantile": {"threshold": t + 1.0, "quantile": 0.95}},
                 "vae": {"quantile": {"threshold": 0.0, "quantile": 0.95}}},
      "maps": {"rec_error": {"n_sigma": {"threshold": t_map, "n_sigma": 3.0,
                                         "mean": 0.0, "std": t_map / 3}}}}
  files.write_json(os.path.join(workdir, "eval", "thresholds.json"), thresholds)
  result = predict.predict(folder, workdir=workdir, top_k=4, batch_size=8,
                           progress=False)
  return result, ids, images, scores, maps, t, t_map


def test_rows_scores_and_labels_equal_the_scorer(predicted):
  result, ids, _, scores, _, t, _ = predicted
  rows = _rows(os.path.join(result["folder"], "predictions.csv"))
  assert [r["id"] for r in rows] == ids and len(ids) == 7  # every image once, in order
  assert ids[1] == "scan 2.png" and "sub/scan 1.png" in ids
  for k, v in scores.items():  # the very numbers of the Scorer called directly
    np.testing.assert_array_equal(np.float32([r[k] for r in rows]), v)
  value = np.float32([r["score"] for r in rows])
  assert {r["score_name"] for r in rows} == {"vae_rec"}
  labels = [int(r["pred_label"]) for r in rows]
  assert labels == [int(x >= np.float32(t)) for x in scores["vae_rec"]]
  assert 0 < sum(labels) < len(labels) and np.all(value == scores["vae_rec"])
  assert result["num_predicted_anomalous"] == sum(labels) and result["num_images"] == 7
  saved = json.load(open(os.path.join(result["folder"], "run.json")))
  assert saved["threshold"]["rule"] == "n_sigma" and saved["threshold"]["value"] == t
  assert saved["threshold"]["chosen_on"].startswith("validation split")
  line = predict.summary_line(result)
  assert f"7 images, {sum(labels)} predicted anomalous at vae_rec >= " in line
  assert "(n_sigma, chosen on validation split" in line and result["folder"] in line


def test_overlays_show_the_map_outlined_at_its_threshold(predicted):
  result, ids, images, _, maps, _, t_map = predicted
  rows = _rows(os.path.join(result["folder"], "predictions.csv"))
  outlined = 0
  for i, row in enumerate(rows):
    assert row["overlay"] == os.path.join("overlays", "rec_error",
                                          ids[i].replace(" ", "_")[:-4] + ".png")
    picture = np.asarray(Image.open(os.path.join(result["folder"], row["overlay"])))
    assert picture.shape == (256, 256, 3)  # 8×8 upscaled 32 times
    want = overlays.overlay(images[i], maps["rec_error"][i], threshold=t_map)
    np.testing.assert_array_equal(picture, want)  # this image's own map
    outlined += np.all(picture == overlays.CONTOUR_RGB, axis=-1).any()
  assert outlined == len(rows)  # the median threshold leaves a region in every map


def test_summary_lists_the_top_k_in_descending_score_order(predicted):
  result, ids, _, scores, _, t, _ = predicted
  page = open(os.path.join(result["folder"], "summary.html")).read()
  listed = re.findall(r'<td class="num">\d+</td><td>([^<]+)</td>', page)
  order = np.argsort(-scores["vae_rec"], kind="stable")[:4]
  assert listed == [ids[i] for i in order]
  assert f"{result['num_predicted_anomalous']} predicted anomalous: vae_rec &gt;= " \
         f"{t:.6g} (n_sigma" in page
  assert page.count('alt="overlay"') == 4


def test_a_second_run_makes_a_new_folder_and_out_must_be_new(predicted, trained):
  workdir, _, folder = trained
  first, images = predicted[0]["folder"], predicted[2]
  before = snapshot(first)
  runs = len(os.listdir(os.path.join(workdir, "predict")))  # scans, scans-2, ...
  again = predict.predict(folder, workdir=workdir, maps="none", score="vae",
                          complexity=True, top_k=2, batch_size=8, progress=False)
  assert os.path.basename(again["folder"]) == f"scans-{runs + 1}"
  assert snapshot(first) == before
  rows = _rows(os.path.join(again["folder"], "predictions.csv"))
  assert {r["pred_label"] for r in rows} == {"1"}  # vae's quantile threshold is 0
  assert again["threshold"]["rule"] == "quantile" and again["complexity"]
  # Complexity (Serrà et al.): bpd of the 8-bit image minus the coder's bits per dim.
  d = images[0].size
  for image, r in zip(images, rows):
    bpd = (float(r["vae"]) - d * np.log(2 / 255)) / (d * np.log(2))
    png = Image.fromarray(np.rint((image[..., 0] + 1) * 127.5).astype(np.uint8))
    buffer = io.BytesIO()
    png.save(buffer, format="PNG", compress_level=9)
    assert float(r["png_bpd"]) == pytest.approx(8 * len(buffer.getvalue()) / d)
    assert float(r["vae_complexity_png"]) == pytest.approx(bpd - float(r["png_bpd"]))
    assert float(r["vae_complexity"]) == pytest.approx(bpd - float(r["jpegxl_bpd"]))
  with pytest.raises(ConfigError, match="already exists"):
    predict.predict(folder, workdir=workdir, out=first)
  with pytest.raises(ConfigError, match=r"no best_f1 threshold for vae_rec.*n_sigma"):
    predict.predict(folder, workdir=workdir, rule="best_f1")
  with pytest.raises(ConfigError, match="not a score of this model.*vae_kl"):
    predict.predict(folder, workdir=workdir, score="nope")
  with pytest.raises(ConfigError, match="complexity score: add --complexity"):
    predict.predict(folder, workdir=workdir, score="vae_complexity")
  assert snapshot(first) == before


def test_an_exported_scorer_predicts_like_its_workdir(predicted, trained, tmp_path):
  """--scorer: the preprocessing comes from scorer.json's config, the thresholds from
  scorer.json (the workdir's thresholds.json when it was exported)."""
  from jaxad import export
  workdir, _, folder = trained
  result, ids, _, scores, _, t, _ = predicted
  exported = export.export(workdir, str(tmp_path / "export"), platforms=("cpu",),
                           with_maps=False, try_platforms=())
  again = predict.predict(folder, scorer_dir=exported, out=str(tmp_path / "out"),
                          batch_size=8, progress=False)
  rows = _rows(tmp_path / "out" / "predictions.csv")
  assert [r["id"] for r in rows] == ids and again["model"]["scorer"] == exported
  for k, v in scores.items():  # another compilation of the same computation
    np.testing.assert_allclose(np.float32([r[k] for r in rows]), v, rtol=2e-6, atol=1e-6)
  assert again["threshold"]["value"] == t and again["threshold"]["rule"] == "n_sigma"
  assert [r["pred_label"] for r in rows] == [  # %.9g: exact for float32 values
      str(int(float(np.float32(r["score"])) >= t)) for r in rows]
  assert again["maps"] == [] and {r["overlay"] for r in rows} == {""}


def test_a_corrupt_png_is_one_error_line_and_leaves_no_folder(trained, tmp_path):
  workdir, _, folder = trained
  bad = tmp_path / "bad"
  bad.mkdir()
  Image.fromarray(np.zeros((9, 9), np.uint8)).save(bad / "fine.png")
  (bad / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
  with pytest.raises(DataError) as err:
    predict.predict(str(bad), workdir=workdir, progress=False)
  line = cli.error_message(err.value)
  assert "\n" not in line and "broken.png" in line and "remove or replace" in line
  assert not os.path.exists(os.path.join(workdir, "predict", "bad"))


def test_binary_on_an_npz_with_a_manual_threshold(trained, tmp_path):
  workdir, config, _ = trained
  images = np.random.default_rng(1).integers(0, 256, (5, 11, 11), np.uint8)
  np.savez(tmp_path / "new.npz", images=images)
  _, ids, _, scores, _ = _direct(workdir, config, str(tmp_path / "new.npz"))
  t = float(np.sort(scores["vae_kl"])[2])  # a float32 value: exact on the command line
  out = tmp_path / "out"
  run = subprocess.run(
      [sys.executable, "-m", "jaxad.predict", f"--workdir={workdir}",
       f"--input={tmp_path / 'new.npz'}", f"--out={out}", "--score=vae_kl",
       f"--threshold={t!r}", "--maps=none", "--batch_size=8"],
      cwd=ROOT, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=120)
  assert run.returncode == 0, run.stderr[-2000:]
  rows = _rows(out / "predictions.csv")
  assert [r["id"] for r in rows] == ids == [f"images/{i}" for i in range(5)]
  np.testing.assert_array_equal(np.float32([r["vae_kl"] for r in rows]), scores["vae_kl"])
  labels = [int(r["pred_label"]) for r in rows]
  assert labels == [int(x >= t) for x in scores["vae_kl"]] and sum(labels) == 3
  assert f"5 images, 3 predicted anomalous at vae_kl >= {t:.6g} (manual, --threshold)" \
      in run.stdout and f"results in {out}" in run.stdout
  assert "predict: 100%" in run.stderr and "5/5" in run.stderr  # progress bar, to stderr


def test_nifti_volumes_in_nifti_maps_out(tmp_path):
  """A 3-D VAE screens a folder of NIfTI volumes (other sizes, scaled voxels): each map
  is written as NIfTI on the input volume's grid, its hottest slice as an overlay."""
  nibabel = pytest.importorskip("nibabel")
  from conftest import tiny_config
  rng = np.random.default_rng(0)
  cubes = {f"{k}_images": rng.integers(0, 256, (n, 8, 8, 8), np.uint8)
           for k, n in (("train", 8), ("val", 2), ("test", 2))}
  np.savez(tmp_path / "cubes.npz", **cubes, **{f"{k}_labels": np.zeros(n, np.int64)
                                               for k, n in (("train", 8), ("val", 2),
                                                            ("test", 2))})
  config = tiny_config(**{
      "data.source": "npz", "data.path": str(tmp_path / "cubes.npz"), "data.ndim": 3,
      "data.normal_classes": (0,), "data.val_split": "", "data.val_fraction": 0.0,
      "data.depth": 8, "train.num_steps": 1, "train.checkpoint_every_steps": 1,
      "train.batch_size": 8, "eval.batch_size": 8, "eval.num_samples": 2})
  workdir = str(tmp_path / "wd")
  trainer.train_and_evaluate(config, workdir)
  (tmp_path / "mri").mkdir()
  affine = np.diag([2.0, 2.0, 3.0, 1.0])
  for i in range(3):
    nibabel.save(nibabel.Nifti1Image(rng.integers(0, 255, (10, 9, 7 + i)).astype(
        np.uint8), affine), tmp_path / "mri" / f"v{i}.nii.gz")
  result = predict.predict(str(tmp_path / "mri"), workdir=workdir, top_k=2, progress=False)
  _, ids, images, scores, maps = _direct(workdir, config, str(tmp_path / "mri"), ndim=3)
  rows = _rows(os.path.join(result["folder"], "predictions.csv"))
  np.testing.assert_array_equal(np.float32([r["vae"] for r in rows]), scores["vae"])
  for i, image_id in enumerate(ids):
    saved = nibabel.load(os.path.join(result["folder"], "maps", "rec_error",
                                      image_id))  # id v0.nii.gz: stem v0
    np.testing.assert_array_equal(np.asarray(saved.dataobj).transpose(2, 1, 0),
                                  maps["rec_error"][i])  # (x, y, z) on disk
    np.testing.assert_allclose(saved.affine, overlays.resized_affine(
        affine, (10, 9, 7 + i), (8, 8, 8)), atol=1e-5)
    z = overlays.hottest_slice(maps["rec_error"][i])
    picture = np.asarray(Image.open(os.path.join(result["folder"], rows[i]["overlay"])))
    np.testing.assert_array_equal(picture, overlays.overlay(images[i][z],
                                                            maps["rec_error"][i][z]))
  page = open(os.path.join(result["folder"], "summary.html")).read()
  assert page.count("slice ") == 2 and result["files"]["nifti_maps"]


# ----------------------------------------------------------------------------------
# Overlays and NIfTI, checked on arrays against brute-force references


def test_overlay_contour_and_colours_against_a_brute_force_reference():
  rng = np.random.default_rng(0)
  image = rng.uniform(-1, 1, (5, 6, 3)).astype(np.float32)
  heat = rng.uniform(0, 2, (5, 6)).astype(np.float32)
  picture = overlays.overlay(image, heat, threshold=1.0, factor=2)
  assert picture.shape == (10, 12, 3)
  mask = np.repeat(np.repeat(heat >= 1.0, 2, 0), 2, 1)
  for y in range(10):
    for x in range(12):
      inside = [mask[y + dy, x + dx] if 0 <= y + dy < 10 and 0 <= x + dx < 12 else False
                for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1))]
      edge = bool(mask[y, x] and not all(inside))
      assert np.all(picture[y, x] == overlays.CONTOUR_RGB) == edge, (y, x)
  # No heat: the grey image itself (RGB's channel mean), nothing blended over it.
  zero = overlays.overlay(image, np.zeros((5, 6)), threshold=1.0, factor=1)
  grey = np.clip((image.astype(np.float64).mean(-1) + 1) / 2, 0, 1) * 255
  assert np.all(zero == zero[..., :1]) and np.abs(zero[..., 0] - grey).max() <= 0.51
  # Without a threshold the colour scale tops out at the map's maximum: full heat there.
  top = overlays.overlay(image, heat, factor=1)
  peak = np.unravel_index(np.argmax(heat), heat.shape)
  colour = np.asarray(overlays.matplotlib.colormaps[overlays.COLORMAP](1.0)[:3]) * 255
  want = (1 - overlays.ALPHA) * grey[peak] + overlays.ALPHA * colour
  assert np.abs(top[peak] - want).max() <= 1.0


def test_unlabeled_nifti_folder_and_map_geometry(tmp_path):
  nibabel = pytest.importorskip("nibabel")
  affine = np.array([[0, 0, 1.5, -10], [2.0, 0, 0, 4], [0, 3.0, 0, 7], [0, 0, 0, 1]])
  rng = np.random.default_rng(0)
  (tmp_path / "vols" / "a").mkdir(parents=True)
  xyz = rng.integers(0, 255, (10, 9, 7)).astype(np.uint8)
  nibabel.save(nibabel.Nifti1Image(xyz, affine), tmp_path / "vols" / "a" / "s0.nii.gz")
  nibabel.save(nibabel.Nifti1Image(xyz[:6], affine), tmp_path / "vols" / "s1.nii")
  source = sources.unlabeled_source(str(tmp_path / "vols"))
  assert source.spatial_ndim == 3 and list(source.ids) == ["a/s0.nii.gz", "s1.nii"]
  np.testing.assert_array_equal(source.read(0)[0][..., 0], xyz.transpose(2, 1, 0))
  with pytest.raises(DataError, match="no images under"):
    sources.unlabeled_source(str(tmp_path / "vols"), 2)  # a 2-D model's input
  Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "vols" / "x.png")
  with pytest.raises(DataError, match="both images"):
    sources.unlabeled_source(str(tmp_path / "vols"))
  # The map's affine: each new voxel lands where tf's resize took its value from. A
  # volume holding its own x, y, z indices, resized, says that place (bilinear is exact
  # on a linear ramp, away from the clamped border voxels).
  new = (4, 5, 3)  # (x, y, z) after resizing (10, 9, 7)
  ramp = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in (10, 9, 7)],
                              indexing="ij"), -1)
  import tensorflow as tf
  moved = pipeline._resize(tf.constant(ramp.transpose(2, 1, 0, 3)), (3, 5, 4, 3),
                           "bilinear").numpy().transpose(2, 1, 0, 3)
  got = overlays.resized_affine(affine, (10, 9, 7), new)
  for idx in np.ndindex(*new):
    if all(0 < i < n - 1 for i, n in zip(idx, new)):
      np.testing.assert_allclose(got @ [*idx, 1], affine @ [*moved[idx], 1], atol=1e-4)
  volume = rng.random((3, 5, 4)).astype(np.float32)  # (D, H, W)
  overlays.write_nifti(str(tmp_path / "m.nii.gz"), volume, got)
  back = nibabel.load(tmp_path / "m.nii.gz")
  np.testing.assert_array_equal(np.asarray(back.dataobj).transpose(2, 1, 0), volume)
  np.testing.assert_allclose(back.affine, got, atol=1e-5)


def test_output_stems_are_unique_and_safe():
  ids = ["a/x.png", "a/x.jpg", "b/../y z.nii.gz", "images/3", ".hidden.png"]
  stems = predict.output_stems(ids)
  assert stems == ["a/x__0", "a/x__1", "b/_/y_z", "images/3", "hidden"]


def test_memory_stays_flat_on_a_large_input(trained, tmp_path):
  """1000 images of 512×512 (250 MiB of pixels, resized to the model's 8×8): predict
  streams them, writing each image's row and overlay as it goes, so the peak grows by
  tf.data's buffers and one batch, not by the input (reading it whole would)."""
  if not os.access("/proc/self/clear_refs", os.W_OK):
    pytest.skip("measuring the peak needs Linux's /proc/self/clear_refs")
  workdir, _, folder = trained
  side, n = 512, 1000
  row = np.broadcast_to(np.arange(side, dtype=np.uint8), (side, side))
  np.savez(tmp_path / "large.npz", images=np.broadcast_to(row, (n, side, side)))
  code = ("import re; from jaxad import predict\n"
          "kib = lambda k: int(re.search(k + r':\\s+(\\d+)', "
          "open('/proc/self/status').read()).group(1))\n"
          f"predict.predict({folder!r}, workdir={workdir!r}, out={str(tmp_path / 'w')!r}, "
          "progress=False, batch_size=64)\n"
          "open('/proc/self/clear_refs', 'w').write('5')  # VmHWM := VmRSS\n"
          "before = kib('VmRSS')\n"
          f"r = predict.predict({str(tmp_path / 'large.npz')!r}, workdir={workdir!r}, "
          f"out={str(tmp_path / 'large')!r}, progress=False, batch_size=64)\n"
          "print(r['num_images'], kib('VmHWM') - before)")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=SUBPROCESS_ENV,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  num_images, growth = map(int, out.stdout.split()[-2:])
  assert num_images == n and len(_rows(tmp_path / "large" / "predictions.csv")) == n
  assert len(os.listdir(tmp_path / "large" / "overlays" / "rec_error" / "images")) == n
  whole = n * side * side // 1024
  assert growth < whole // 4, (growth, whole)  # measured: 22 MiB of the input's 250
