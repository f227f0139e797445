"""Metrics: against scikit-learn, hand-made examples, and the protocols' invariants."""

import numpy as np
import pytest
from sklearn import metrics as skm
from sklearn.model_selection import StratifiedKFold

from jaxad import metrics
from jaxad.errors import DataError


def random_problem(seed, n=300, ties=False):
  rng = np.random.default_rng(seed)
  labels = rng.random(n) < rng.uniform(0.05, 0.6)
  labels[:2] = [True, False]  # both classes always present
  scores = rng.normal(size=n) + rng.uniform(0, 2) * labels
  return labels.astype(int), np.round(scores, 1) if ties else scores


@pytest.mark.parametrize("ties", [False, True])
def test_auroc_auprc_match_sklearn(ties):
  for seed in range(40):
    labels, scores = random_problem(seed, n=20 + 13 * seed, ties=ties)
    assert metrics.auroc(labels, scores) == pytest.approx(
        skm.roc_auc_score(labels, scores), abs=1e-12)
    assert metrics.auprc(labels, scores) == pytest.approx(
        skm.average_precision_score(labels, scores), abs=1e-12)


def test_auroc_heavy_ties_and_extremes():
  labels = np.array([0, 1, 0, 1, 1, 0])
  assert metrics.auroc(labels, np.zeros(6)) == 0.5  # all tied: every pair counts ½
  assert metrics.auroc(labels, labels * 2.0) == 1.0
  assert metrics.auroc(labels, -labels) == 0.0
  assert metrics.auprc(labels, np.zeros(6)) == pytest.approx(0.5)  # the prevalence
  integer_scores = np.array([3, 1, 2, 3, 3, 0])
  assert metrics.auroc(labels.astype(bool), integer_scores) == pytest.approx(
      skm.roc_auc_score(labels, integer_scores), abs=1e-12)


# Classes: NV (normal), MEL scored above every normal image, DF below every one, BCC mixed.
CLASS_NAMES = ("NV", "MEL", "DF", "BCC")
LABELS = np.array([0, 0, 0, 0, 1, 1, 2, 2, 3, 3])
SCORE = np.array([0.2, 0.4, 0.3, 0.1, 0.9, 0.8, 0.0, -1.0, 0.35, 0.05])


def test_per_class_table_hand_made():
  table = metrics.per_class_table(CLASS_NAMES, LABELS, {"mse": SCORE}, ["NV"])
  rows = table["mse"]
  assert list(rows) == ["MEL", "DF", "BCC", "all"]
  assert rows["MEL"] == {"auroc": 1.0, "auprc": 1.0, "n_anomalous": 2, "n_normal": 4}
  assert rows["DF"]["auroc"] == 0.0
  # BCC 0.35 beats 3 of 4 normals, 0.05 beats none: (3 + 0) / 8.
  assert rows["BCC"]["auroc"] == pytest.approx(3 / 8)
  # all: MEL 4+4 wins, DF 0+0, BCC 3+0 → 11 of 6·4 = 24 pairs.
  assert rows["all"]["auroc"] == pytest.approx(11 / 24)
  assert rows["all"]["n_anomalous"] == 6 and rows["all"]["n_normal"] == 4
  assert rows["all"]["auprc"] == pytest.approx(
      skm.average_precision_score(LABELS != 0, SCORE), abs=1e-12)


def test_per_class_table_excludes_other_anomalous_classes():
  # DF lifted above MEL: counted among MEL's negatives it would pull MEL below 1.0.
  score = SCORE.copy()
  score[LABELS == 2] = 5.0
  table = metrics.per_class_table(CLASS_NAMES, LABELS, {"s": score}, ["NV"])
  assert table["s"]["MEL"]["auroc"] == 1.0  # DF (above MEL) is not among its negatives
  assert table["s"]["MEL"]["n_normal"] == 4
  names = np.array(CLASS_NAMES)[LABELS]  # names work as well as indices
  assert metrics.per_class_table(CLASS_NAMES, names, {"s": score}, [0]) == table


def test_per_class_table_absent_class_and_several_scores():
  keep = LABELS != 3
  table = metrics.per_class_table(CLASS_NAMES, LABELS[keep],
                                  {"a": SCORE[keep], "b": -SCORE[keep]}, ["NV"])
  assert table["a"]["BCC"] == {"auroc": None, "auprc": None, "n_anomalous": 0,
                               "n_normal": 4}
  assert table["b"]["MEL"]["auroc"] == 0.0 and table["b"]["DF"]["auroc"] == 1.0


def synthetic_maps(seed, n=200, size=32):
  """Smooth-ish noise maps with bright elliptic lesions in about half the images."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:size, :size]
  maps = rng.gamma(2.0, 0.1, size=(n, size, size))
  masks = np.zeros((n, size, size), np.uint8)
  for i in range(n):
    if rng.random() < 0.5:
      cy, cx = rng.uniform(6, size - 6, 2)
      ry, rx = rng.uniform(2, 6, 2)
      lesion = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
      masks[i] = lesion
      maps[i] += lesion * rng.gamma(2.0, 0.15, size=(size, size))
  return maps, masks


def test_pixel_curve_streaming_matches_exact():
  maps, masks = synthetic_maps(0)
  streaming, exact = metrics.PixelCurve(), metrics.PixelCurve(exact=True)
  for start in range(0, 200, 48):  # batches of 48, the last one padded with junk
    batch_maps = np.zeros((48, 32, 32))
    batch_masks = np.zeros((48, 32, 32), np.uint8)
    real = min(48, 200 - start)
    batch_maps[:real], batch_masks[:real] = maps[start:start + 48], masks[start:start + 48]
    batch_maps[real:] = 1e6  # padding must not count
    valid = np.arange(48) < real
    streaming.update(batch_maps, batch_masks, valid)
    exact.update(batch_maps, batch_masks, valid)
  reference = skm.roc_auc_score(masks.ravel(), maps.ravel())
  assert exact.auroc() == pytest.approx(reference, abs=1e-12)
  assert exact.auprc() == pytest.approx(
      skm.average_precision_score(masks.ravel(), maps.ravel()), abs=1e-12)
  assert 0.7 < reference < 0.99  # a realistic, imperfect detector
  assert streaming.auroc() == pytest.approx(exact.auroc(), abs=1e-3)
  assert streaming.auprc() == pytest.approx(exact.auprc(), abs=1e-3)
  threshold, f1 = streaming.best_f1_threshold()
  exact_threshold, exact_f1 = exact.best_f1_threshold()
  assert f1 == pytest.approx(exact_f1, abs=1e-3)
  assert threshold == pytest.approx(exact_threshold, abs=0.02)
  assert metrics.dice(maps >= exact_threshold, masks) == pytest.approx(exact_f1)


def test_pixel_curve_given_range_and_clipping():
  maps, masks = synthetic_maps(1, n=60)
  exact = metrics.PixelCurve(exact=True)
  exact.update(maps, masks)
  curve = metrics.PixelCurve(value_range=(0.0, float(np.quantile(maps, 0.999))))
  curve.update(maps, masks)
  assert curve.num_clipped == np.count_nonzero(maps >= curve.value_range[1])
  assert curve.auroc() == pytest.approx(exact.auroc(), abs=1e-3)


def test_pixel_curve_memory_is_flat():
  maps, masks = synthetic_maps(2, n=40)

  def sizes(curve):
    return {k: (v.size if isinstance(v, np.ndarray) else len(v))
            for k, v in vars(curve).items() if isinstance(v, (np.ndarray, list))}

  curve = metrics.PixelCurve(num_bins=1000)
  curve.update(maps[:4], masks[:4])
  before = sizes(curve)
  assert before == {"_counts": 2000}
  for i in range(4, 40, 4):
    curve.update(maps[i:i + 4], masks[i:i + 4])
  assert sizes(curve) == before
  assert curve._counts.sum() == maps.size


def test_dice_iou_hand_made():
  pred, mask = np.zeros((8, 8), bool), np.zeros((8, 8), bool)
  pred[0:4, 0:4] = True  # 16 pixels
  mask[2:6, 2:6] = True  # 16 pixels, overlap rows 2-3 × cols 2-3 = 4 pixels
  assert metrics.dice(pred, mask) == pytest.approx(2 * 4 / 32)
  assert metrics.iou(pred, mask) == pytest.approx(4 / 28)
  assert metrics.dice(pred.astype(np.uint8), pred) == 1.0
  empty = np.zeros((3, 4, 4), np.uint8)
  assert metrics.dice(empty, empty) == 1.0 and metrics.iou(empty, empty) == 1.0
  assert metrics.dice(pred, np.zeros_like(pred)) == 0.0


def test_dice_is_pooled_over_images():
  pred = np.zeros((2, 4, 4), bool)
  mask = np.zeros((2, 4, 4), bool)
  pred[0, :2, :2] = mask[0, :2, :2] = True  # image 0: perfect, 4 pixels
  mask[1, 0, :] = True  # image 1: 4 missed pixels
  assert metrics.dice(pred, mask) == pytest.approx(2 * 4 / (4 + 8))


def test_calibration_split():
  calibration, report = metrics.calibration_split(100, seed=3)
  assert len(calibration) == 20 and len(report) == 80
  assert np.array_equal(np.sort(np.r_[calibration, report]), np.arange(100))
  again = metrics.calibration_split(100, seed=3)
  assert np.array_equal(again[0], calibration) and np.array_equal(again[1], report)
  assert not np.array_equal(metrics.calibration_split(100, seed=4)[0], calibration)


def test_calibration_split_keeps_groups_whole():
  rng = np.random.default_rng(0)
  groups = np.repeat([f"p{i}" for i in range(30)], rng.integers(1, 8, size=30))
  n = len(groups)
  calibration, report = metrics.calibration_split(n, seed=1, groups=groups)
  assert np.array_equal(np.sort(np.r_[calibration, report]), np.arange(n))
  assert not set(groups[calibration]) & set(groups[report])
  assert abs(len(calibration) - 0.2 * n) <= 7  # within one group of the target


def test_best_dice_threshold_separates():
  rng = np.random.default_rng(0)
  masks = np.zeros((10, 16, 16), np.uint8)
  masks[:, 4:9, 5:11] = 1
  maps = np.where(masks, rng.uniform(0.7, 1.0, masks.shape), rng.uniform(0, 0.3, masks.shape))
  threshold, score = metrics.best_dice_threshold(maps, masks)
  assert score == 1.0 and 0.3 < threshold <= maps[masks == 1].min()
  assert metrics.dice(maps >= threshold, masks) == 1.0
  grid_threshold, grid_score = metrics.best_dice_threshold(maps, masks, [0.1, 0.5, 0.9])
  assert (grid_threshold, grid_score) == (0.5, 1.0)


def test_nsigma_threshold():
  rng = np.random.default_rng(0)
  healthy = rng.normal(0.1, 0.02, size=(20, 8, 8))
  values = healthy.ravel()
  assert metrics.nsigma_threshold(healthy) == pytest.approx(
      values.mean() + 3 * values.std(), rel=1e-12)
  assert metrics.nsigma_threshold(list(healthy), n_sigma=2) == pytest.approx(
      values.mean() + 2 * values.std(), rel=1e-12)
  with pytest.raises(TypeError):  # healthy maps only: there is no place for masks
    metrics.nsigma_threshold(healthy, np.ones_like(healthy), 3.0)


def test_bootstrap_interval_and_determinism():
  labels, scores = random_problem(0, n=400)
  result = metrics.bootstrap(metrics.auroc, labels, scores, num_resamples=100, seed=7)
  assert result["estimate"] == metrics.auroc(labels, scores)
  assert result["low"] <= result["estimate"] <= result["high"]
  assert result["low"] < result["high"] and result["std"] > 0
  assert metrics.bootstrap(metrics.auroc, labels, scores, num_resamples=100, seed=7) == result
  constant = metrics.bootstrap(lambda x: 1.5, scores, num_resamples=10)
  assert constant == {"estimate": 1.5, "mean": 1.5, "std": 0.0, "low": 1.5, "high": 1.5}


def test_bootstrap_stratified_never_one_class():
  labels = np.zeros(100, int)
  labels[[5, 50, 95]] = 1
  scores = np.random.default_rng(0).normal(size=100) + labels
  seen = []

  def counting_auroc(y, s):
    seen.append((y.sum(), len(y)))
    return metrics.auroc(y, s)

  metrics.bootstrap(counting_auroc, labels, scores, num_resamples=200, stratify=labels)
  assert all(pos == 3 and n == 100 for pos, n in seen)
  with pytest.raises(DataError, match="stratify=labels"):  # unstratified: one-class draws
    metrics.bootstrap(metrics.auroc, labels, scores, num_resamples=200)


def test_bootstrap_groups_resample_whole_patients():
  groups = np.repeat(np.arange(10), 3)
  values = np.repeat(np.arange(10.0), 3)
  seen = []

  def record(v, g):
    seen.append((v, g))
    return float(v.mean())

  metrics.bootstrap(record, values, groups, num_resamples=20, groups=groups)
  for v, g in seen[:-1]:  # the last call is the full-data estimate
    assert len(v) == 30
    assert all(np.count_nonzero(g == k) % 3 == 0 for k in range(10))


def test_logistic_regression_auroc_monotone_and_random():
  rng = np.random.default_rng(0)
  labels = (rng.random(600) < 0.3).astype(int)
  scores = rng.normal(size=600) + 1.5 * labels
  result = metrics.logistic_regression_auroc(scores, labels, folds=5, seed=0)
  assert result["auroc"] == pytest.approx(metrics.auroc(labels, scores), abs=0.02)
  assert len(result["folds"]) == 5
  assert result["auroc_std"] == pytest.approx(np.std(result["folds"]))
  splits = StratifiedKFold(5, shuffle=True, random_state=0).split(scores[:, None], labels)
  for fold, (_, test) in zip(result["folds"], splits):  # monotone model: same ranking
    assert fold == pytest.approx(metrics.auroc(labels[test], scores[test]), abs=1e-12)
  noise = metrics.logistic_regression_auroc(rng.normal(size=2000), rng.random(2000) < 0.5)
  assert noise["auroc"] == pytest.approx(0.5, abs=0.05)


@pytest.mark.parametrize("call, message", [
    (lambda: metrics.auroc([], []), "empty"),
    (lambda: metrics.auroc([0, 0, 0], [0.1, 0.2, 0.3]), "only normal"),
    (lambda: metrics.auprc([1, 1], [0.1, 0.2]), "only anomalous"),
    (lambda: metrics.auroc([0, 1, 1], [0.1, 0.2]), "shape"),
    (lambda: metrics.auroc([0, 1], [0.1, np.nan]), "NaN"),
    (lambda: metrics.auroc([0, 2], [0.1, 0.2]), "only 0 and 1"),
    (lambda: metrics.per_class_table(CLASS_NAMES, LABELS, {"s": SCORE[:5]}, ["NV"]),
     "one score per image"),
    (lambda: metrics.per_class_table(CLASS_NAMES, LABELS, {"s": SCORE}, ["XX"]),
     "unknown classes"),
    (lambda: metrics.per_class_table(CLASS_NAMES, LABELS, {"s": SCORE}, CLASS_NAMES),
     "anomalous class"),
    (lambda: metrics.per_class_table(CLASS_NAMES, LABELS[4:], {"s": SCORE[4:]}, ["NV"]),
     "only anomalous"),
    (lambda: metrics.PixelCurve().update(np.zeros((2, 4, 4)), np.zeros((2, 4, 4, 1))),
     "channel axis"),
    (lambda: metrics.PixelCurve().update(np.zeros((2, 4)), np.zeros((2, 4)), [True]),
     "one flag per image"),
    (lambda: metrics.PixelCurve().update(np.full((1, 4), np.nan), np.zeros((1, 4))), "NaN"),
    (lambda: metrics.PixelCurve().auroc(), "both"),
    (lambda: metrics.PixelCurve(exact=True).auroc(), "call update"),
    (lambda: metrics.PixelCurve(value_range=(1.0, 1.0)), "low < high"),
    (lambda: metrics.dice(np.full((2, 2), 0.4), np.zeros((2, 2))), "maps >= threshold"),
    (lambda: metrics.iou(np.zeros((2, 2)), np.zeros((3, 2))), "shape"),
    (lambda: metrics.calibration_split(10, fraction=1.0), "between 0 and 1"),
    (lambda: metrics.calibration_split(4, groups=["a"] * 4), "two groups"),
    (lambda: metrics.calibration_split(4, groups=["a", "b"]), "one group"),
    (lambda: metrics.best_dice_threshold(np.ones((2, 3)), np.zeros((2, 3))),
     "no lesion pixels"),
    (lambda: metrics.nsigma_threshold([]), "empty"),
    (lambda: metrics.bootstrap(metrics.auroc, [0, 1], [0.1, 0.2, 0.3]), "lengths"),
    (lambda: metrics.logistic_regression_auroc(np.arange(20.0), np.r_[np.zeros(17),
                                                                   np.ones(3)]),
     "lower folds"),
])
def test_bad_input_raises_data_error(call, message):
  with pytest.raises(DataError, match=message):
    call()


def test_pixel_curve_overlap_at_threshold_matches_dice_and_iou():
  rng = np.random.default_rng(3)
  maps = rng.random((20, 8, 8))
  masks = (rng.random((20, 8, 8)) < 0.2).astype(np.uint8)
  for exact in (True, False):
    curve = metrics.PixelCurve(num_bins=1000, value_range=(0.0, 1.0), exact=exact)
    curve.update(maps, masks)
    got = curve.overlap_at(0.5)  # 0.5 is a bin edge: streaming is exact there too
    assert got["dice"] == pytest.approx(metrics.dice(maps >= 0.5, masks), abs=1e-12)
    assert got["iou"] == pytest.approx(metrics.iou(maps >= 0.5, masks), abs=1e-12)


def test_image_histograms_match_numpy_per_image():
  rng = np.random.default_rng(3)
  maps = rng.uniform(-0.2, 1.2, (5, 6, 7))
  masks = rng.random((5, 6, 7)) < 0.3
  masks[2] = False  # an image without lesion pixels
  h = metrics.image_histograms(maps, masks, (0.0, 1.0), 16)
  dense = h.dense()
  assert len(h) == 5 and dense.shape == (5, 2, 16)
  for i in range(5):
    clipped = np.clip(maps[i], 0.0, 1.0 - 1e-9)  # edge bins take the values outside
    for row, keep in ((0, ~masks[i]), (1, masks[i])):
      expected, _ = np.histogram(clipped[keep], bins=16, range=(0.0, 1.0))
      np.testing.assert_array_equal(dense[i, row], expected)
  np.testing.assert_array_equal(h.has_lesion, masks.reshape(5, -1).any(1))
  weights = np.array([0, 3, 1, 0, 2])  # a resample: image 1 thrice, image 4 twice
  np.testing.assert_array_equal(h.summed(weights), np.tensordot(weights, dense, 1))


def test_pixel_curve_keeps_the_image_histograms_it_sums():
  maps, masks = synthetic_maps(5, n=30)
  curve = metrics.PixelCurve(num_bins=500, keep_images=True)
  for start in range(0, 30, 8):  # the range comes from the first batch
    curve.update(maps[start:start + 8], masks[start:start + 8])
  h = curve.image_histograms()
  assert len(h) == 30 and h.value_range == curve.value_range
  np.testing.assert_array_equal(h.summed(), curve._counts)
  one_shot = metrics.image_histograms(maps, masks, curve.value_range, 500)
  np.testing.assert_array_equal(h.dense(), one_shot.dense())


def _binned_auroc(maps, masks, value_range, num_bins):
  """Brute force: scikit-learn's AUROC of each pixel's bin number."""
  lo, hi = value_range
  bins = np.clip(np.floor((maps - lo) / (hi - lo) * num_bins), 0, num_bins - 1)
  return skm.roc_auc_score(masks.ravel(), bins.ravel())


def test_pixel_interval_is_of_the_point_estimate_on_heavy_tailed_maps():
  # Heavy-tailed maps with a few huge outliers: the range is set by the outliers, so
  # nearly every pixel lies in the lowest few percent of it. The old 256-bin intervals
  # measured a much coarser statistic than the 10,000-bin point and missed it.
  rng = np.random.default_rng(7)
  masks = np.zeros((60, 12, 12), bool)
  masks[:30, 3:8, 4:9] = True
  maps = rng.lognormal(0.0, 1.0, masks.shape) * (1.0 + 1.5 * masks)
  maps[2, 0, 0], maps[40, 0, 0], maps[50, 0, 0] = 2e4, 5e3, 1e6  # normal pixels
  curve = metrics.PixelCurve(num_bins=10_000, keep_images=True)
  curve.update(maps[:8], masks[:8])  # the range: the first batch's, widened
  curve.update(maps[8:], masks[8:])
  assert curve.num_clipped == 1  # 1e6 lies above it
  point = curve.auroc()
  full = _binned_auroc(maps, masks, curve.value_range, 10_000)
  assert point == pytest.approx(full, abs=1e-12)
  out = metrics.pixel_bootstrap(curve.image_histograms(), threshold=3.0, num_resamples=50)
  assert out["auroc"]["estimate"] == point
  assert out["auprc"]["estimate"] == curve.auprc()
  assert out["dice"]["estimate"] == curve.overlap_at(3.0)["dice"]
  for name in ("auroc", "auprc", "dice", "iou"):
    assert out[name]["low"] <= out[name]["estimate"] <= out[name]["high"], name
  # What the old code reported: 256 bins over the same range, a different statistic
  # whose interval lies wholly below the point.
  coarse = metrics.image_histograms(maps, masks, curve.value_range, 256)
  old = metrics.pixel_bootstrap(coarse, num_resamples=50)["auroc"]
  assert old["high"] < point - 0.1
  assert old["estimate"] == pytest.approx(
      _binned_auroc(maps, masks, curve.value_range, 256), abs=1e-12)


def test_pixel_bootstrap_resamples_images_and_groups():
  rng = np.random.default_rng(4)
  masks = np.zeros((40, 8, 8), bool)
  masks[:20, 2:5, 2:5] = True  # 20 images with a lesion, 20 without
  maps = rng.normal(size=(40, 8, 8)) + 1.5 * masks
  value_range = (-5.0, 7.0)
  h = metrics.image_histograms(maps, masks, value_range, 256)
  out = metrics.pixel_bootstrap(h, threshold=1.0, num_resamples=30, seed=0)
  whole = metrics.PixelCurve(256, value_range)
  whole.update(maps, masks)
  assert out["auroc"]["estimate"] == pytest.approx(whole.auroc(), abs=1e-12)
  assert out["dice"]["estimate"] == pytest.approx(whole.overlap_at(1.0)["dice"], abs=1e-12)
  assert out["auroc"]["low"] < out["auroc"]["estimate"] < out["auroc"]["high"]
  assert 0 < out["auroc"]["std"] < 0.1
  # Two images per individual: resampling whole individuals changes the intervals, and
  # the same seed gives the same intervals.
  groups = np.repeat(np.arange(20), 2)
  a = metrics.pixel_bootstrap(h, num_resamples=30, seed=0, groups=groups)
  b = metrics.pixel_bootstrap(h, num_resamples=30, seed=0, groups=groups)
  assert a == b and set(a) == {"auroc", "auprc"}
  assert a["auroc"]["low"] != out["auroc"]["low"]
