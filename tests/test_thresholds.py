"""Image thresholds, AUPRO and per-image Dice through the eval binary's library call.

One tiny conv VAE on an npz of 8×8 images whose validation split has anomalies and whose
test split has lesion masks (one or two bright squares); every number is checked
against a brute-force float64 NumPy computation from the files the evaluation wrote.
"""

import json
import os

import numpy as np
import pytest

from jaxad import evaluation, trainer
from jaxad.errors import ConfigError

from test_metrics import _brute_aupro  # the brute-force sweep over every pixel value

RULES = ("best_f1", "n_sigma", "quantile")


def _squares(rng, n, anomalous):
  """n uint8 8×8 images (smooth noise) and masks: anomalous ones get 1-2 bright squares."""
  yy, xx = np.mgrid[:8, :8]
  images = np.zeros((n, 8, 8), np.uint8)
  masks = np.zeros((n, 8, 8), np.uint8)
  for i in range(n):
    cy, cx = rng.uniform(0, 8, 2)
    images[i] = 40 + 60 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 18) + \
        rng.integers(0, 12, (8, 8))
    for _ in range(rng.integers(1, 3) if anomalous else 0):
      y, x = rng.integers(0, 6, 2)
      masks[i, y:y + 2, x:x + 2] = 1
  images[masks > 0] = 250
  return images, masks


def _write_npz(path):
  rng = np.random.default_rng(0)
  arrays = {}
  for split, normal, anomalous in (("train", 64, 0), ("val", 24, 8), ("test", 24, 24)):
    a, ma = _squares(rng, normal, False)
    b, mb = _squares(rng, anomalous, True)
    arrays[f"{split}_images"] = np.concatenate([a, b])
    arrays[f"{split}_labels"] = np.repeat(np.arange(2, dtype=np.uint8), [normal, anomalous])
    if split == "test":
      arrays["test_masks"] = np.concatenate([ma, mb])
  np.savez(path, **arrays)


def _npz(path):
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
  """The test split evaluated (thresholds.json as it wrote it), then the val split."""
  from conftest import tiny_config
  root = tmp_path_factory.mktemp("thresholds")
  _write_npz(root / "data.npz")
  config = tiny_config(**{
      "data.source": "npz", "data.path": str(root / "data.npz"),
      "data.normal_classes": (), "data.anomalous_classes": (1,), "train.num_steps": 20,
      "train.checkpoint_every_steps": 20, "eval.batch_size": 16, "eval.num_samples": 3,
      "eval.bootstrap": 0, "eval.complexity": False, "eval.save_maps": True,
      "eval.pixel_bins": 1000})
  workdir = str(root / "run")
  trainer.train_and_evaluate(config, workdir)
  test = evaluation.evaluate(workdir, config=config)
  chosen = json.load(open(os.path.join(workdir, "eval", "thresholds.json")))
  val = evaluation.evaluate(workdir, config=config, split="val")
  return workdir, config, test, chosen, val


def _brute_best_f1(labels, scores):
  """(threshold, F1): every distinct score tried, the highest of the best kept."""
  best = (None, -1.0)
  for t in np.unique(scores):
    pred = scores >= t
    tp = np.sum(pred & labels)
    f1 = 2 * tp / (2 * tp + np.sum(pred & ~labels) + np.sum(~pred & labels))
    if f1 >= best[1]:
      best = (t, f1)
  return best


def test_thresholds_are_chosen_on_validation_scores(evaluated):
  workdir, config, test, chosen, val = evaluated
  saved = _npz(os.path.join(workdir, "eval", "val", "scores.npz"))  # the same pass
  labels = saved["anomalous"] > 0
  assert chosen["step"] == test["step"] == 20
  assert chosen["chosen_on"] == "validation split: 32 images, 8 anomalous"
  assert set(chosen["scores"]) == set(test["sample"])
  for k, rules in chosen["scores"].items():
    v = saved[k].astype(np.float64)
    assert tuple(rules) == RULES
    t, f1 = _brute_best_f1(labels, v)
    assert rules["best_f1"]["threshold"] == pytest.approx(t, rel=1e-6)
    assert rules["best_f1"]["val_f1"] == pytest.approx(f1, rel=1e-6)
    healthy = np.sort(v[~labels])
    mean, std = healthy.mean(), np.sqrt(np.mean((healthy - healthy.mean()) ** 2))
    assert rules["n_sigma"] == pytest.approx(
        {"threshold": mean + 3 * std, "n_sigma": 3.0, "mean": mean, "std": std}, rel=1e-6)
    position = 0.95 * (len(healthy) - 1)
    low = int(position)
    q = healthy[low] + (position - low) * (healthy[low + 1] - healthy[low])
    assert rules["quantile"] == pytest.approx({"threshold": q, "quantile": 0.95}, rel=1e-6)
  # The default: the validation ranking's best score, at its best-F1 threshold.
  assert test["ranking"]["by"] == "validation AUROC"
  assert chosen["default"]["score"] == test["ranking"]["best"]
  assert chosen["default"]["rule"] == "best_f1" and "AUROC" in chosen["default"]["why"]
  # Pixel maps: each map's N-sigma threshold of the healthy validation maps.
  for k, s in test["healthy_map_stats"].items():
    assert chosen["maps"][k]["n_sigma"] == pytest.approx(
        {"threshold": s["mean"] + 3 * s["std"], "n_sigma": 3.0, "mean": s["mean"],
         "std": s["std"]}, rel=1e-12)
  # --split=val rewrote the file with the very same image thresholds, and says they
  # are optimistic there.
  again = json.load(open(os.path.join(workdir, "eval", "thresholds.json")))
  for k, rules in chosen["scores"].items():
    for rule, entry in rules.items():
      assert again["scores"][k][rule] == pytest.approx(entry, rel=1e-9), (k, rule)
  assert again["default"] == chosen["default"]
  assert "optimistic" in val["image_thresholds"]["note"]


def test_image_thresholds_are_scored_on_the_evaluated_split(evaluated):
  workdir, _, test, chosen, _ = evaluated
  saved = json.load(open(os.path.join(workdir, "eval", "metrics.json")))["test"]
  section = saved["image_thresholds"]
  assert section["chosen_on"] == chosen["chosen_on"]
  assert section["evaluated_on"] == "test split: 48 images, 24 anomalous"
  assert section["default"] == chosen["default"]
  scores = _npz(os.path.join(workdir, "eval", "test", "scores.npz"))
  labels = scores["anomalous"] > 0
  for k, rules in section["scores"].items():
    for rule, row in rules.items():
      t = chosen["scores"][k][rule]["threshold"]
      assert row["threshold"] == t
      pred = scores[k].astype(np.float64) >= t
      tp, fp = np.sum(pred & labels), np.sum(pred & ~labels)
      fn, tn = np.sum(~pred & labels), np.sum(~pred & ~labels)
      assert (row["tp"], row["fp"], row["tn"], row["fn"]) == (tp, fp, tn, fn), (k, rule)
      assert row["sensitivity"] == pytest.approx(tp / 24)
      assert row["specificity"] == pytest.approx(tn / 24)
      assert row["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
  default = chosen["default"]
  line = evaluation.headline_table(test)
  assert f"image threshold: {default['score']} >= " in line
  row = section["scores"][default["score"]]["best_f1"]
  assert f"sensitivity {row['sensitivity']:.3f}, specificity {row['specificity']:.3f}" in line
  assert "pxAUPRO" in line
  html = open(os.path.join(workdir, "eval", "test", "report.html"), encoding="utf-8").read()
  assert "Image-level thresholds" in html and f"★ {default['score']} / best_f1" in html


def test_aupro_and_per_image_dice_match_brute_force_on_the_saved_maps(evaluated):
  workdir, config, test, _, _ = evaluated
  with np.load(os.path.join(workdir, "eval", "test", "maps.npz")) as f:
    maps = {k: f[k].astype(np.float64) for k in test["pixel"]}
    masks = f["mask"] > 0
  is_calib, _ = evaluation.calibration_images(len(masks), None, 0.2, config.seed)
  lesion = masks.reshape(len(masks), -1).any(axis=1)
  for k, m in test["pixel"].items():
    # Streamed in the bins [0, 4 × healthy max): the brute force of the binned values.
    hi = 4 * test["healthy_map_stats"][k]["max"]
    binned = np.clip(np.floor(maps[k] * (1000 / hi)), 0, 999)
    assert m["aupro"] == pytest.approx(_brute_aupro(binned, masks), abs=1e-9), k
    assert m["aupro"] == pytest.approx(_brute_aupro(maps[k], masks), abs=0.02), k
    assert m["aupro_max_fpr"] == 0.3 and m["lesion_regions"] >= 24
    for rule, part in (("pr_operating_point", lesion), ("calibrated", lesion & ~is_calib)):
      entry = m["thresholds"][rule]
      t = -np.inf if entry["threshold"] is None else entry["threshold"]  # a bin edge
      dice = [2 * np.sum((maps[k][i] >= t) & masks[i]) /
              (np.sum(maps[k][i] >= t) + masks[i].sum()) for i in np.flatnonzero(part)]
      per_image = entry["dice_per_image"]
      assert per_image["num_images"] == len(dice) == part.sum()
      assert per_image["mean"] == pytest.approx(np.mean(dice), abs=1e-9), (k, rule)
      assert per_image["median"] == pytest.approx(np.median(dice), abs=1e-9), (k, rule)
    assert set(m["thresholds"]["n_sigma"]["dice_per_image"]) == {
        "mean", "median", "num_images", "images"}


def test_no_validation_split_means_no_thresholds_and_says_so(evaluated):
  workdir, config, _, _, _ = evaluated
  path = os.path.join(workdir, "eval", "thresholds.json")
  before = open(path).read()
  config = config.copy_and_resolve_references()
  config.data.val_split = ""  # and val_fraction 0: no validation split at all
  config.eval.pixel_maps = False
  result = evaluation.evaluate(workdir, config=config)
  assert result["image_thresholds"] == {"note": evaluation.NO_VALIDATION}
  assert "ranked on the test split itself" in result["ranking"]["note"]
  assert "image threshold: none (no validation split" in evaluation.headline_table(result)
  assert open(path).read() == before  # not rewritten from nothing
  config.eval.threshold_quantile = 1.5
  with pytest.raises(ConfigError, match=r"eval\.threshold_quantile=1\.5 must be strictly"):
    evaluation.evaluate(workdir, config=config)
