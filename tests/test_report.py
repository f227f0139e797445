"""Report: the HTML holds the tables and links only existing, valid PNG figures."""

import os
import re

import numpy as np
from PIL import Image
import pytest

from jaxad import metrics as metrics_lib
from jaxad import report
from jaxad.errors import DataError

CLASSES = ("NORMAL", "CNV", "DME")
SCORES = ("vae", "iwae_rec", "Recon MSE/2")  # the last one needs a sanitised file name


def fake_scores(seed=0, n=200):
  """(class_names, anomalous, scores): anomalous classes score higher, with some ties."""
  rng = np.random.default_rng(seed)
  class_names = np.array(CLASSES)[rng.choice(3, size=n, p=[0.4, 0.3, 0.3])]
  anomalous = (class_names != "NORMAL").astype(int)
  shift = np.select([class_names == "CNV", class_names == "DME"], [1.5, 0.7], 0.0)
  scores = {"vae": rng.normal(size=n) + shift,
            "iwae_rec": np.round(rng.gamma(2.0, size=n) + shift, 1),
            "Recon MSE/2": rng.normal(size=n) + 0.3 * shift}
  return class_names, anomalous, scores


def fake_metrics(class_names, anomalous, scores, pixel=True):
  """A metrics.json-like dict computed with jaxad.metrics."""
  out = {"num_images": len(class_names), "split": "test",
         "sample": metrics_lib.per_class_table(CLASSES, class_names, scores, ["NORMAL"]),
         "logistic_regression": {  # its layout, without fitting (sklearn is slow to load)
             name: {"auroc": 0.7 + 0.01 * i, "auroc_std": 0.04, "folds": [0.7] * 5}
             for i, name in enumerate(scores)},
         "bootstrap": {"vae": metrics_lib.bootstrap(
             metrics_lib.auroc, anomalous, scores["vae"], num_resamples=10,
             stratify=anomalous)}}
  labels = np.asarray(anomalous, bool)
  out["image_thresholds"] = {  # the layout jaxad.evaluation writes
      "chosen_on": "validation split: 50 images, 5 anomalous",
      "evaluated_on": f"test split: {len(labels)} images, {int(labels.sum())} anomalous",
      "default": {"score": "vae", "rule": "best_f1", "why": "best validation AUROC"},
      "scores": {name: {rule: {**extra, **metrics_lib.binary_metrics(labels, values, t)}
                        for rule, t, extra in (("best_f1", 0.4, {"val_f1": 0.61}),
                                               ("n_sigma", 2.5, {"n_sigma": 3.0}))}
                 for name, values in scores.items()}}
  out["image_thresholds"]["scores"]["broken"] = {"error": "no threshold for broken: NaN"}
  if pixel:
    out["pixel"] = {  # the layout jaxad.evaluation writes
        name: {"auroc": 0.81234, "auprc": 0.4, "clipped_pixels": 0,
               "dice": {"calibrated": 0.31, "nsigma": None},
               "thresholds": {
                   "calibrated": {"threshold": 0.05, "dice": 0.31, "iou": 0.2,
                                  "chosen_on": "calibration split: a random 0.2 of the "
                                               "images (40); Dice/IoU on the rest"},
                   "n_sigma": {"threshold": 0.07, "dice": 0.25, "n_sigma": 3.0,
                               "chosen_on": f"healthy validation images of {name} only"}}}
        for name in ("residual", "grad_elbo")}
  return out


def fake_examples(k=4, size=16, depth=None, channels=1, seed=0):
  """Images in [-1, 1], reconstructions, two maps and masks; (K, D, ...) with depth."""
  rng = np.random.default_rng(seed)
  spatial = (k, size, size) if depth is None else (k, depth, size, size)
  images = np.tanh(rng.normal(size=(*spatial, channels))).astype(np.float32)
  masks = np.zeros(spatial, np.float32)
  masks[1:, ..., 4:9, 5:10] = 1  # the first example has no lesion
  return {"ids": [f"img_{i:03d}" for i in range(k)], "images": images,
          "reconstructions": np.clip(images + 0.1 * rng.normal(size=images.shape), -1, 1),
          "maps": {"residual": rng.random(spatial) + masks,
                   "grad_elbo": rng.random(spatial) + 2 * masks},
          "masks": masks}


def image_sources(page: str) -> list[str]:
  return re.findall(r"<img src=\"([^\"]+)\"", page)


def check_report(path: str) -> str:
  """Asserts the common invariants; returns the HTML text."""
  assert os.path.basename(path) == "report.html" and os.path.isfile(path)
  with open(path, encoding="utf-8") as f:
    page = f.read()
  assert "http" not in page.lower()
  assert "<script" not in page.lower()
  folder = os.path.dirname(path)
  sources = image_sources(page)
  assert sources
  for src in sources:
    assert re.fullmatch(r"figures/[a-z0-9_]+\.png", src), src
    with Image.open(os.path.join(folder, src)) as image:
      assert image.format == "PNG"
      assert image.size[0] > 100 and image.size[1] > 100
      image.verify()
  assert not [f for f in os.listdir(folder) + os.listdir(os.path.join(folder, "figures"))
              if f.endswith(".tmp")]  # no temporary files left behind
  return page


def test_full_report(tmp_path):
  class_names, anomalous, scores = fake_scores()
  metrics = fake_metrics(class_names, anomalous, scores)
  path = report.write_report(str(tmp_path), title="OCT VAE <test>", metrics=metrics,
                             scores=scores, class_names=class_names, anomalous=anomalous,
                             examples=fake_examples())
  assert path == os.path.join(str(tmp_path), "report.html")
  page = check_report(path)
  assert "OCT VAE &lt;test&gt;" in page
  for name in (*SCORES, *CLASSES, "residual", "grad_elbo", "dice.calibrated"):
    assert name in page, name
  for row in metrics["sample"].values():
    for cell in row.values():
      assert f"{cell['auroc']:.3f}" in page and f"{cell['auprc']:.3f}" in page
  assert "0.812" in page and "—" in page  # pixel AUROC rounded, None as a dash
  assert "<th>thresholds.calibrated.dice</th>" in page
  assert page.count("calibration split: a random 0.2") == 1  # long text: once, under it
  assert "grad_elbo, thresholds.n_sigma.chosen_on" in page
  assert not re.search(r"<td>[^<]*chosen|<td>[^<]*calibration split", page)
  assert f"{metrics['logistic_regression']['vae']['auroc']:.3f}" in page
  # Image thresholds: one row per score and rule, the default starred, errors listed.
  assert "Image-level thresholds" in page and "validation split: 50 images" in page
  assert page.count("★ vae / best_f1") == 1 and "<th>Recon MSE/2 / n_sigma</th>" in page
  row = metrics["image_thresholds"]["scores"]["iwae_rec"]["best_f1"]
  cells = re.search(r"<th>iwae_rec / best_f1</th>(.*?)</tr>", page).group(1)
  assert re.findall(r"<td>(.*?)</td>", cells) == [
      report.format_value(row[k]) for k, _ in report.THRESHOLD_COLUMNS]
  assert "no threshold for broken: NaN" in page
  sources = image_sources(page)
  assert len(sources) == 2 * len(SCORES) + 2  # ROC + density per score, 2 example grids
  assert "figures/roc_recon_mse_2.png" in sources
  assert {"figures/examples_maps.png", "figures/examples_reconstructions.png"} <= set(sources)


@pytest.mark.parametrize("depth,channels", [(6, 1), (None, 3), (5, 3)],
                         ids=["3d_gray", "2d_rgb", "3d_rgb"])
def test_example_layouts(tmp_path, depth, channels):
  class_names, anomalous, scores = fake_scores()
  page = check_report(report.write_report(
      str(tmp_path), title="layouts", metrics={}, scores={"vae": scores["vae"]},
      class_names=class_names, anomalous=anomalous,
      examples=fake_examples(depth=depth, channels=channels)))
  assert {"figures/examples_maps.png", "figures/examples_reconstructions.png"} <= set(
      image_sources(page))
  if depth:
    assert "middle slice" in page


def test_report_without_examples_or_pixel_metrics(tmp_path):
  class_names, anomalous, scores = fake_scores(seed=1)
  metrics = fake_metrics(class_names, anomalous, scores, pixel=False)
  path = report.write_report(str(tmp_path / "out"), title="no examples", metrics=metrics,
                             scores=scores, class_names=class_names, anomalous=anomalous)
  page = check_report(path)
  assert "Pixel-level" not in page and "examples_" not in page
  assert len(image_sources(page)) == 2 * len(SCORES)


def test_examples_with_maps_only(tmp_path):
  class_names, anomalous, scores = fake_scores(seed=2)
  examples = fake_examples()
  del examples["reconstructions"], examples["masks"]
  page = check_report(report.write_report(
      str(tmp_path), title="maps only", metrics={}, scores=scores,
      class_names=class_names, anomalous=anomalous, examples=examples))
  assert "figures/examples_maps.png" in image_sources(page)
  assert "examples_reconstructions" not in page


def test_only_normal_images_skips_roc(tmp_path):
  class_names = np.array(["NORMAL"] * 50)
  page = check_report(report.write_report(
      str(tmp_path), title="healthy", metrics={}, scores={"vae": np.arange(50.0)},
      class_names=class_names, anomalous=np.zeros(50, int)))
  assert image_sources(page) == ["figures/density_vae.png"]
  assert "No ROC curve for vae" in page


def test_roc_points_area_is_auroc():
  class_names, anomalous, scores = fake_scores(seed=3)
  for values in scores.values():  # iwae_rec has ties: they step diagonally
    fpr, tpr = report.roc_points(anomalous, values)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    area = np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)
    assert area == pytest.approx(metrics_lib.auroc(anomalous, values), abs=1e-12)


def test_format_value():
  assert report.format_value(None) == "—"
  assert report.format_value(0.98765) == "0.988"
  assert report.format_value(np.float32(0.5)) == "0.500"
  assert report.format_value(np.int64(60)) == "60"
  assert report.format_value([0.1, 0.25]) == "0.100, 0.250"
  assert report.format_value(list(range(20))) == "(20 values)"


def test_bad_inputs_raise_data_error(tmp_path):
  class_names, anomalous, scores = fake_scores()
  with pytest.raises(DataError, match="one score per image|one per"):
    report.write_report(str(tmp_path), title="t", metrics={}, class_names=class_names,
                        anomalous=anomalous, scores={"vae": scores["vae"][:-1]})
  with pytest.raises(DataError, match="NaN"):
    report.write_report(str(tmp_path), title="t", metrics={}, class_names=class_names,
                        anomalous=anomalous, scores={"vae": np.full(200, np.nan)})
  examples = fake_examples()
  examples["maps"]["residual"] = examples["maps"]["residual"][:, :8]
  with pytest.raises(DataError, match="residual"):
    report.write_report(str(tmp_path), title="t", metrics={}, class_names=class_names,
                        anomalous=anomalous, scores=scores, examples=examples)
  assert not os.path.exists(tmp_path / "report.html")  # nothing half-written


def test_report_files_honour_the_umask(tmp_path):
  old = os.umask(0o077)
  try:
    page = check_report(report.write_report(
        str(tmp_path), title="private", metrics={}, scores={"vae": np.arange(50.0)},
        class_names=np.array(["NORMAL"] * 50), anomalous=np.zeros(50, int)))
  finally:
    os.umask(old)
  written = [tmp_path / "report.html"] + [tmp_path / src for src in image_sources(page)]
  assert {oct(os.stat(p).st_mode & 0o777) for p in written} == {"0o600"}
