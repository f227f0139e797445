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


# ------------------------------------------------- image thresholds against brute force


def _brute_f1(labels, scores, t):
  """F1 of `score >= t` by counting, float64."""
  pred = scores >= t
  tp = float(np.sum(pred & labels))
  fp, fn = float(np.sum(pred & ~labels)), float(np.sum(~pred & labels))
  return 2 * tp / (2 * tp + fp + fn)


@pytest.mark.parametrize("ties", [False, True])
def test_best_f1_threshold_is_the_brute_force_optimum(ties):
  for seed in range(12):
    labels, scores = random_problem(seed, n=40 + 7 * seed, ties=ties)
    labels = labels.astype(bool)
    candidates = np.unique(scores)  # every distinct score, increasing
    f1 = np.array([_brute_f1(labels, scores, t) for t in candidates])
    best = candidates[np.flatnonzero(f1 == f1.max())[-1]]  # ties: the highest threshold
    t, got = metrics.best_f1_threshold(labels, scores)
    assert got == pytest.approx(f1.max(), abs=1e-12)
    assert t == best
  with pytest.raises(DataError, match="at least one anomalous"):
    metrics.best_f1_threshold([0, 0, 0], [0.1, 0.2, 0.3])


def test_binary_metrics_count_by_hand():
  labels, scores = random_problem(3, n=200, ties=True)
  for t in (-np.inf, -0.5, 0.0, 0.3, 1.2, np.inf):
    got = metrics.binary_metrics(labels, scores, t)
    tp = fp = tn = fn = 0
    for y, s in zip(labels, scores):  # one image at a time
      if s >= t:
        tp, fp = tp + (y == 1), fp + (y == 0)
      else:
        fn, tn = fn + (y == 1), tn + (y == 0)
    assert (got["tp"], got["fp"], got["tn"], got["fn"]) == (tp, fp, tn, fn)
    assert got["sensitivity"] == pytest.approx(tp / (tp + fn))
    assert got["specificity"] == pytest.approx(tn / (tn + fp))
    if tp + fp:
      assert got["precision"] == pytest.approx(tp / (tp + fp))
      assert got["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    else:  # nothing predicted: precision is 0/0
      assert got["precision"] is None and got["f1"] == 0.0
  healthy = metrics.binary_metrics([0, 0, 0], [0.1, 0.5, 0.9], 0.5)
  assert healthy["sensitivity"] is None and healthy["specificity"] == pytest.approx(1 / 3)


def test_nsigma_and_quantile_rules_against_brute_force():
  rng = np.random.default_rng(5)
  healthy = rng.gamma(2.0, 1.0, 57)
  n = len(healthy)
  mean = sum(healthy) / n
  std = (sum((v - mean) ** 2 for v in healthy) / n) ** 0.5
  rule = metrics.nsigma_rule(healthy, 2.5)
  assert rule["mean"] == pytest.approx(mean, rel=1e-12)
  assert rule["std"] == pytest.approx(std, rel=1e-12)
  assert rule["threshold"] == pytest.approx(mean + 2.5 * std, rel=1e-12)
  ordered = sorted(healthy)
  for q in (0.5, 0.9, 0.95, 0.99):
    position = q * (n - 1)  # linear interpolation between order statistics
    low = int(position)
    expected = ordered[low] + (position - low) * (ordered[low + 1] - ordered[low])
    got = metrics.quantile_rule(healthy, q)
    assert got == {"threshold": pytest.approx(expected, rel=1e-12), "quantile": q}
    flagged = np.mean(healthy >= got["threshold"])
    assert abs(flagged - (1 - q)) <= 1 / n + 1e-12
  with pytest.raises(DataError, match="strictly between 0 and 1"):
    metrics.quantile_rule(healthy, 1.0)


def test_image_thresholds_rules_with_and_without_anomalies():
  labels, scores = random_problem(8, n=120)
  labels = labels.astype(bool)
  out = metrics.image_thresholds(labels, scores, n_sigma=3.0, quantile=0.9)
  assert list(out) == ["best_f1", "n_sigma", "quantile"]
  assert (out["best_f1"]["threshold"], out["best_f1"]["val_f1"]) == \
      metrics.best_f1_threshold(labels, scores)
  assert out["n_sigma"] == metrics.nsigma_rule(scores[~labels], 3.0)  # healthy only
  assert out["quantile"] == metrics.quantile_rule(scores[~labels], 0.9)
  healthy_only = metrics.image_thresholds(np.zeros(50, bool), scores[:50])
  assert list(healthy_only) == ["n_sigma", "quantile"]
  with pytest.raises(DataError, match="needs normal"):
    metrics.image_thresholds(np.ones(5, bool), scores[:5])


# ------------------------------------------------------ AUPRO against brute force


def _regions_by_flood_fill(mask):
  """Region id (1..R) of every lesion pixel of one image or volume, face neighbours."""
  ids = np.zeros(mask.shape, np.int64)
  count = 0
  for start in zip(*np.nonzero(mask)):
    if ids[start]:
      continue
    count += 1
    ids[start], stack = count, [start]
    while stack:
      p = stack.pop()
      for axis in range(mask.ndim):
        for step in (-1, 1):
          q = list(p)
          q[axis] += step
          q = tuple(q)
          if 0 <= q[axis] < mask.shape[axis] and mask[q] and not ids[q]:
            ids[q] = count
            stack.append(q)
  return ids, count


def _brute_aupro(maps, masks, max_fpr=0.3):
  """MVTec AD's AUPRO: sort every pixel value, sweep the thresholds from the top, PRO as
  the mean over regions of each region's fraction at or above, trapezoids to max_fpr."""
  region, offset = np.zeros(maps.shape, np.int64), 0
  for i in range(len(maps)):  # each image's regions on their own
    ids, count = _regions_by_flood_fill(masks[i])
    region[i] = np.where(ids > 0, ids + offset, 0)
    offset += count
  values, region = maps.ravel().astype(np.float64), region.ravel()
  sizes = np.bincount(region, minlength=offset + 1)[1:]
  normal = region == 0
  fpr, pro = [0.0], [0.0]
  for t in np.unique(values)[::-1]:
    above = values >= t
    fpr.append(np.sum(above & normal) / np.sum(normal))
    pro.append(np.mean(np.bincount(region[above], minlength=offset + 1)[1:] / sizes))
    if fpr[-1] > max_fpr:
      break
  area = 0.0
  for k in range(1, len(fpr)):
    x0, x1, y0, y1 = fpr[k - 1], fpr[k], pro[k - 1], pro[k]
    if x1 > max_fpr:  # the last trapezoid ends at max_fpr, pro interpolated there
      y1, x1 = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0), max_fpr
    area += (x1 - x0) * (y0 + y1) / 2
  return area / max_fpr


def _blob_masks(rng, shape, num_images, max_blobs=3):
  """Masks with 0..max_blobs boxes per image (some touching, so regions merge)."""
  masks = np.zeros((num_images, *shape), bool)
  for i in range(num_images):
    for _ in range(rng.integers(0, max_blobs + 1)):
      corner = [rng.integers(0, s - 1) for s in shape]
      extent = [rng.integers(1, max(2, s // 3)) for s in shape]
      masks[(i, *(slice(c, c + e) for c, e in zip(corner, extent)))] = True
  masks[0, (0,) * len(shape)] = True  # at least one region
  return masks


def _stream(curve, maps, masks, batch=5):
  """Updates curve batch by batch, each batch padded with junk marked invalid."""
  for start in range(0, len(maps), batch):
    m, k = maps[start:start + batch], masks[start:start + batch]
    pad = batch - len(m)
    curve.update(np.concatenate([m, np.full((pad, *m.shape[1:]), 1e3)]),
                 np.concatenate([k, np.ones((pad, *k.shape[1:]), bool)]),
                 np.arange(batch) < len(m))
  return curve


@pytest.mark.parametrize("shape", [(12, 12), (6, 7, 5)], ids=["2d", "3d"])
def test_streaming_aupro_matches_the_brute_force_sweep(shape):
  rng = np.random.default_rng(len(shape))
  masks = _blob_masks(rng, shape, 14)
  num_bins, value_range = 64, (0.0, 4.0)
  width = 4.0 / num_bins
  # Values on bin centres: the bins lose nothing, so streaming is exact.
  centres = (rng.integers(0, num_bins, masks.shape) + 0.5) * width
  centres = np.where(masks, np.minimum(centres + 1.0, 4.0 - width / 2), centres)
  curve = _stream(metrics.PixelCurve(num_bins, value_range, regions=True), centres, masks)
  reference = _brute_aupro(centres, masks)
  assert 0.3 < reference < 0.99
  assert curve.aupro() == pytest.approx(reference, abs=1e-12)
  assert curve.num_regions == sum(_regions_by_flood_fill(m)[1] for m in masks)
  assert metrics.aupro(centres, masks) == pytest.approx(reference, abs=1e-12)  # exact mode
  # Any values: exact mode is the brute force; the bins tie the values of each bin, so
  # streaming is the brute force of the binned values, within the binning error of it.
  maps = rng.gamma(2.0, 0.3, masks.shape) + 0.6 * masks
  exact = _brute_aupro(maps, masks)
  assert metrics.aupro(maps, masks) == pytest.approx(exact, abs=1e-12)
  streamed = _stream(metrics.PixelCurve(num_bins, value_range, regions=True), maps, masks)
  binned = np.floor(np.clip(maps, 0, 4.0 - 1e-9) / width)
  assert streamed.aupro() == pytest.approx(_brute_aupro(binned, masks), abs=1e-12)
  assert streamed.aupro() == pytest.approx(exact, abs=0.03)
  fine = _stream(metrics.PixelCurve(4096, value_range, regions=True), maps, masks)
  assert abs(fine.aupro() - exact) < abs(streamed.aupro() - exact) + 1e-3


def test_aupro_extremes_and_errors():
  rng = np.random.default_rng(0)
  masks = _blob_masks(rng, (10, 10), 8)
  perfect = metrics.aupro(masks + 0.1 * rng.random(masks.shape), masks)
  assert perfect == pytest.approx(1.0, abs=1e-12)
  noise = rng.random((400, 10, 10))
  masks = np.zeros(noise.shape, bool)
  masks[:, 2:5, 2:5] = True
  assert metrics.aupro(noise, masks) == pytest.approx(0.15, abs=0.01)  # chance: PRO = FPR
  with pytest.raises(DataError, match="regions=True"):
    metrics.PixelCurve().aupro()
  curve = metrics.PixelCurve(16, (0.0, 1.0), regions=True)
  curve.update(noise[:2], np.zeros((2, 10, 10), bool))
  with pytest.raises(DataError, match="0 regions"):
    curve.aupro()
  with pytest.raises(DataError, match="max_fpr"):
    metrics.aupro(noise[:2], masks[:2], max_fpr=0.0)


def test_pixel_curve_memory_with_regions_is_flat():
  maps, masks = synthetic_maps(2, n=24)
  curve = metrics.PixelCurve(num_bins=1000, regions=True)
  for i in range(0, 24, 4):
    curve.update(maps[i:i + 4], masks[i:i + 4])
    assert {k: v.size for k, v in vars(curve).items() if isinstance(v, np.ndarray)} == \
        {"_counts": 2000, "_pro": 1000}
  assert curve._pro.sum() == pytest.approx(curve.num_regions, rel=1e-12)


def test_per_image_dice_against_brute_force():
  rng = np.random.default_rng(11)
  num_bins, value_range = 50, (0.0, 1.0)
  masks = _blob_masks(rng, (9, 9), 30)
  masks[5] = False  # an image without lesion pixels: not counted
  maps = (rng.integers(0, num_bins, masks.shape) + 0.5) / num_bins  # bin centres
  maps = np.where(masks, np.minimum(maps + 0.3, 0.99), maps)
  h = metrics.image_histograms(maps, masks, value_range, num_bins)
  subset = rng.random(30) < 0.7
  for t in (0.02, 0.3, 0.52, 0.8, 2.0):  # bin edges (and beyond): no binning error
    for images in (None, subset):
      dices = []
      for i in range(30):
        if masks[i].any() and (images is None or images[i]):
          pred = maps[i] >= t
          dices.append(2 * np.sum(pred & masks[i]) / (pred.sum() + masks[i].sum()))
      got = metrics.per_image_dice(h, t, images)
      assert got["num_images"] == len(dices)
      assert got["mean"] == pytest.approx(np.mean(dices), abs=1e-12)
      assert got["median"] == pytest.approx(np.median(dices), abs=1e-12)
  curve = metrics.PixelCurve(num_bins, value_range)
  curve.update(maps, masks)
  pooled = curve.overlap_at(0.52)["dice"]  # the pooled Dice is a different number
  assert pooled == pytest.approx(metrics.dice(maps >= 0.52, masks), abs=1e-12)
  assert metrics.per_image_dice(h, 0.5, np.zeros(30, bool)) == {
      "mean": None, "median": None, "num_images": 0}
