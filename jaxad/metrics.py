"""Evaluation metrics for anomaly detection, in plain NumPy.

Convention everywhere: a higher score means more anomalous, and label 1 means anomalous
(label 0 normal). Image-level metrics (`auroc`, `auprc`, `per_class_table`) rank one score
per image; image thresholds (`best_f1_threshold`, `nsigma_rule`, `quantile_rule`,
`image_thresholds`) predict anomalous when `score >= threshold`, and `binary_metrics`
scores such a rule. Pixel-level metrics (`PixelCurve`, `aupro`, `dice`, `iou`,
`per_image_dice`, thresholds) compare anomaly maps with lesion masks. Protocol helpers
(`calibration_split`, `bootstrap`, `logistic_regression_auroc`) follow the papers the
configs reproduce.

AUROC and AUPRC are computed here from tie-grouped counts, so exact scores, histogram
bins (streaming `PixelCurve`) and thresholds all share one implementation; they match
`sklearn.metrics.roc_auc_score` and `average_precision_score` (tests check to 1e-12).
Bad input raises `DataError` naming the problem and the fix.
"""

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from jaxad.data import splits
from jaxad.errors import DataError

# --------------------------------------------------------------------------- validation


def _as_array(x, what: str) -> np.ndarray:
  x = np.asarray(x)
  if x.size == 0:
    raise DataError(f"{what} is empty: pass at least one example")
  return x


def _as_scores(x, what: str) -> np.ndarray:
  """Finite float64 values; NaN or inf means the model output is broken upstream."""
  x = _as_array(x, what)
  if x.dtype.kind not in "biuf":
    raise DataError(f"{what} must be numeric, got dtype {x.dtype}: pass a float array")
  x = x.astype(np.float64, copy=False)
  bad = np.count_nonzero(~np.isfinite(x))
  if bad:
    raise DataError(f"{what} has {bad} NaN or infinite values: check the model output "
                    "(diverged training, a division by zero in the score) before scoring")
  return x


def _as_binary(x, what: str) -> np.ndarray:
  """Bool array from bool or {0, 1} input."""
  x = _as_array(x, what)
  if x.dtype == bool:
    return x
  if x.dtype.kind not in "iuf":
    raise DataError(f"{what} must be bool or 0/1, got dtype {x.dtype}")
  ok = (x == 0) | (x == 1)
  if not ok.all():
    raise DataError(f"{what} must contain only 0 and 1 (1 = anomalous), got e.g. "
                    f"{x[~ok].flat[0]!r}: binarise it first, e.g. `maps >= threshold` "
                    "or `labels != normal_label`")
  return x.astype(bool)


def _same_shape(a: np.ndarray, b: np.ndarray, what_a: str, what_b: str) -> None:
  if a.shape != b.shape:
    raise DataError(f"{what_a} has shape {a.shape} but {what_b} has shape {b.shape}: "
                    "they must match element for element (check for a channel axis or "
                    "a batch that was not flattened)")


def _check_both_classes(num_pos: int, num_neg: int, what: str) -> None:
  if num_pos == 0 or num_neg == 0:
    only = "anomalous (1)" if num_neg == 0 else "normal (0)"
    raise DataError(f"{what} needs both normal (0) and anomalous (1) examples, got only "
                    f"{only} ones ({num_pos + num_neg} in all): evaluate on a set that "
                    "contains both classes")


def _labels_scores(labels, scores) -> tuple[np.ndarray, np.ndarray]:
  labels = _as_binary(labels, "labels")
  scores = _as_scores(scores, "scores")
  _same_shape(labels, scores, "labels", "scores")
  return labels.reshape(-1), scores.reshape(-1)


# ----------------------------------------------------------------- curves from counts


def _tie_groups(labels: np.ndarray, scores: np.ndarray):
  """Distinct scores in decreasing order with their anomalous and normal counts."""
  order = np.argsort(scores, kind="stable")[::-1]
  s, y = scores[order], labels[order]
  starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
  pos = np.add.reduceat(y.astype(np.int64), starts)
  neg = np.diff(np.r_[starts, len(s)]) - pos
  return s[starts], pos, neg


def _auroc_from_counts(pos: np.ndarray, neg: np.ndarray) -> float:
  """P(score of an anomalous > a normal one), ties ½; counts ordered by decreasing score."""
  num_pos, num_neg = pos.sum(), neg.sum()
  tp_above = np.cumsum(pos) - pos
  return float(np.sum(neg * (tp_above + 0.5 * pos)) / (float(num_pos) * float(num_neg)))


def _ap_from_counts(pos: np.ndarray, neg: np.ndarray) -> float:
  """Average precision Σ (R_k − R_k−1)·P_k over tie groups, as scikit-learn defines it."""
  tp, fp = np.cumsum(pos), np.cumsum(neg)
  hit = pos > 0  # groups without anomalous examples add no recall
  return float(np.sum(pos[hit] / pos.sum() * (tp[hit] / (tp[hit] + fp[hit]))))


def _best_f1_from_counts(thresholds: np.ndarray, pos: np.ndarray, neg: np.ndarray):
  """(threshold, F1) maximising F1 = 2TP/(TP+FP+P) over `score >= threshold`."""
  tp, predicted = np.cumsum(pos), np.cumsum(pos + neg)
  f1 = 2.0 * tp / (predicted + pos.sum())
  k = int(np.argmax(f1))  # the first maximum: the highest such threshold
  return float(thresholds[k]), float(f1[k])


# ------------------------------------------------------------------ image-level metrics


def auroc(labels, scores) -> float:
  """Area under the ROC curve: P(anomalous scores higher than normal), ties count ½."""
  labels, scores = _labels_scores(labels, scores)
  _check_both_classes(int(labels.sum()), int((~labels).sum()), "auroc")
  _, pos, neg = _tie_groups(labels, scores)
  return _auroc_from_counts(pos, neg)


def auprc(labels, scores) -> float:
  """Average precision (area under the PR curve, step-wise as in scikit-learn)."""
  labels, scores = _labels_scores(labels, scores)
  _check_both_classes(int(labels.sum()), int((~labels).sum()), "auprc")
  _, pos, neg = _tie_groups(labels, scores)
  return _ap_from_counts(pos, neg)


def _class_indices(class_names: Sequence[str], values, what: str) -> np.ndarray:
  """Class indices from class indices or class names."""
  values = np.asarray(values)
  if values.dtype.kind in "iu":
    bad = values[(values < 0) | (values >= len(class_names))]
    if bad.size:
      raise DataError(f"{what} has class index {bad.flat[0]}, but there are only "
                      f"{len(class_names)} classes {tuple(class_names)}")
    return values.astype(np.int64)
  lookup = {name: i for i, name in enumerate(class_names)}
  unknown = sorted({str(v) for v in values.reshape(-1) if v not in lookup})
  if unknown:
    raise DataError(f"{what} names unknown classes {unknown}: use names from "
                    f"{tuple(class_names)} or their indices")
  return np.array([lookup[v] for v in values.reshape(-1)], np.int64).reshape(values.shape)


def _table_row(is_anomalous: np.ndarray, scores: np.ndarray) -> dict:
  num_pos = int(is_anomalous.sum())
  row = {"n_anomalous": num_pos, "n_normal": int(len(is_anomalous) - num_pos)}
  if num_pos == 0:  # a class absent from this split: reported, not guessed
    return {"auroc": None, "auprc": None, **row}
  return {"auroc": auroc(is_anomalous, scores), "auprc": auprc(is_anomalous, scores), **row}


def per_class_table(class_names: Sequence[str], labels_class: np.ndarray,
                    scores: dict[str, np.ndarray], normal_classes) -> dict:
  """Per anomalous class (against normal images only) and 'all', for every score.

  `labels_class` holds one class index (into `class_names`) or class name per image;
  `normal_classes` names (or indexes) the normal ones. Images of other anomalous classes
  are left out of a class's comparison, as in Lu & Xu's Table 2. Returns
  {score: {class or 'all': {'auroc', 'auprc', 'n_anomalous', 'n_normal'}}}; a class
  with no images in this split gets None for both metrics.
  """
  class_names = [str(c) for c in class_names]
  labels = _class_indices(class_names, _as_array(labels_class, "labels_class"),
                          "labels_class").reshape(-1)
  normal = _class_indices(class_names, np.atleast_1d(np.asarray(normal_classes)),
                          "normal_classes")
  anomalous = [i for i in range(len(class_names)) if i not in normal]
  if not anomalous:
    raise DataError(f"every class {tuple(class_names)} is listed in normal_classes: "
                    "leave at least one anomalous class out of it")
  is_normal = np.isin(labels, normal)
  _check_both_classes(int((~is_normal).sum()), int(is_normal.sum()), "per_class_table")
  if not scores:
    raise DataError("scores is empty: pass {score_name: one score per image}")
  table = {}
  for name, values in scores.items():
    values = _as_scores(values, f"scores[{name!r}]").reshape(-1)
    if len(values) != len(labels):
      raise DataError(f"scores[{name!r}] has {len(values)} values but labels_class has "
                      f"{len(labels)}: pass one score per image, in the same order")
    rows = {}
    for c in anomalous:
      keep = is_normal | (labels == c)
      rows[class_names[c]] = _table_row(labels[keep] == c, values[keep])
    rows["all"] = _table_row(~is_normal, values)
    table[name] = rows
  return table


# --------------------------------------------------------------- image-level thresholds


def best_f1_threshold(labels, scores) -> tuple[float, float]:
  """(threshold, F1) of the rule `score >= threshold` with the highest F1 on these images.

  Every distinct score is a candidate, so the optimum is exact; among equal F1 the
  highest threshold wins. Needs at least one anomalous image.
  """
  labels, scores = _labels_scores(labels, scores)
  if not labels.any():
    raise DataError("best_f1_threshold needs at least one anomalous (1) image, got "
                    f"{len(labels)} normal ones: label some anomalous validation images, "
                    "or use the healthy-score rules (nsigma_rule, quantile_rule)")
  return _best_f1_from_counts(*_tie_groups(labels, scores))


def _ratio(num: int, den: int) -> float | None:
  return None if den == 0 else num / den


def binary_metrics(labels, scores, threshold: float) -> dict:
  """Confusion counts and rates of predicting anomalous when `score >= threshold`.

  sensitivity = TP/(TP+FN), specificity = TN/(TN+FP), precision = TP/(TP+FP),
  F1 = 2TP/(2TP+FP+FN); a ratio whose denominator is 0 (e.g. sensitivity without an
  anomalous image) is None.
  """
  labels, scores = _labels_scores(labels, scores)
  if np.isnan(threshold):
    raise DataError("binary_metrics threshold is NaN: pass a number (a chosen threshold)")
  predicted = scores >= threshold
  tp = int(np.count_nonzero(predicted & labels))
  fp = int(np.count_nonzero(predicted & ~labels))
  fn = int(np.count_nonzero(~predicted & labels))
  tn = len(labels) - tp - fp - fn
  return {"threshold": float(threshold), "sensitivity": _ratio(tp, tp + fn),
          "specificity": _ratio(tn, tn + fp), "precision": _ratio(tp, tp + fp),
          "f1": _ratio(2 * tp, 2 * tp + fp + fn), "tp": tp, "fp": fp, "tn": tn, "fn": fn}


def nsigma_rule(healthy_scores, n_sigma: float = 3.0) -> dict:
  """{'threshold': mean + n_sigma·std, 'n_sigma', 'mean', 'std'} of healthy images'
  scores (population std): a threshold that needs no anomalous image."""
  values = _as_scores(healthy_scores, "healthy_scores").reshape(-1)
  if not np.isfinite(n_sigma):
    raise DataError(f"n_sigma must be finite, got {n_sigma!r}")
  mean, std = float(values.mean()), float(values.std())
  return {"threshold": mean + float(n_sigma) * std, "n_sigma": float(n_sigma),
          "mean": mean, "std": std}


def quantile_rule(healthy_scores, quantile: float = 0.95) -> dict:
  """{'threshold', 'quantile'}: the `quantile` of healthy images' scores (NumPy's
  linear interpolation), so about 1 − quantile of healthy images score at or above it."""
  values = _as_scores(healthy_scores, "healthy_scores").reshape(-1)
  if not 0.0 < quantile < 1.0:
    raise DataError(f"quantile must be strictly between 0 and 1, got {quantile!r} "
                    "(0.95 flags about 5% of healthy images)")
  return {"threshold": float(np.quantile(values, quantile)), "quantile": float(quantile)}


def image_thresholds(labels, scores, n_sigma: float = 3.0, quantile: float = 0.95) -> dict:
  """Every rule's threshold for one score, chosen on these (validation) images:
  {'best_f1': {'threshold', 'val_f1'}} when both classes are present, and
  'n_sigma' (`nsigma_rule`) and 'quantile' (`quantile_rule`) of the normal images."""
  labels, scores = _labels_scores(labels, scores)
  if labels.all():
    raise DataError("image_thresholds needs normal (0) images to choose thresholds on, "
                    "got only anomalous ones: validate on a split with healthy images")
  out = {}
  if labels.any():
    t, f1 = best_f1_threshold(labels, scores)
    out["best_f1"] = {"threshold": t, "val_f1": f1}
  out["n_sigma"] = nsigma_rule(scores[~labels], n_sigma)
  out["quantile"] = quantile_rule(scores[~labels], quantile)
  return out


# ------------------------------------------------------------------ pixel-level metrics


def _bin_index(values: np.ndarray, value_range: tuple[float, float],
               num_bins: int) -> tuple[np.ndarray, int]:
  """(bin of each value among num_bins equal bins of value_range, values outside it);
  values outside go to the edge bins."""
  lo, hi = value_range
  position = (values - lo) * (num_bins / (hi - lo))
  clipped = int(np.count_nonzero((position < 0) | (position >= num_bins)))
  return np.clip(position, 0, num_bins - 1).astype(np.int64), clipped


def _lower_edges(value_range: tuple[float, float], num_bins: int) -> np.ndarray:
  """Each bin's lower edge (increasing); the bottom one is −inf, since the bottom bin
  also holds the values clipped below the range."""
  lo, hi = value_range
  edges = lo + (hi - lo) * np.arange(num_bins) / num_bins
  edges[0] = -np.inf
  return edges


AUPRO_MAX_FPR = 0.3  # MVTec AD: the PRO curve is integrated up to a 30% false positive rate


def _region_weights(masks: np.ndarray) -> tuple[np.ndarray, int]:
  """(1/|region| at each lesion pixel, 0 elsewhere; the number of regions) of masks
  (n, *spatial): connected components of each image (or volume) on its own, with
  scipy.ndimage.label's default connectivity (face neighbours only)."""
  from scipy import ndimage
  structure = np.zeros((3,) * masks.ndim, bool)  # no neighbours across the image axis
  structure[1] = ndimage.generate_binary_structure(masks.ndim - 1, 1)
  labels, count = ndimage.label(masks, structure=structure)
  sizes = np.bincount(labels.reshape(-1), minlength=count + 1)
  weights = np.where(labels > 0, 1.0 / np.maximum(sizes, 1)[labels], 0.0)
  return weights, int(count)


def _value_groups(values: np.ndarray, *columns: np.ndarray):
  """Distinct values in decreasing order and each column summed over each tie group."""
  order = np.argsort(values, kind="stable")[::-1]
  v = values[order]
  starts = np.flatnonzero(np.r_[True, v[1:] != v[:-1]])
  return v[starts], [np.add.reduceat(c[order], starts) for c in columns]


def _area_to(fpr: np.ndarray, pro: np.ndarray, max_fpr: float) -> float:
  """Trapezoid area under pro(fpr) for fpr in [0, max_fpr], divided by max_fpr; the
  points run from (0, 0) by non-decreasing fpr, pro interpolated linearly at max_fpr."""
  k = int(np.searchsorted(fpr, max_fpr, side="right"))  # fpr[:k] <= max_fpr
  x, y = fpr[:k], pro[:k]
  if k < len(fpr):
    x0, x1, y0, y1 = fpr[k - 1], fpr[k], pro[k - 1], pro[k]
    x, y = np.r_[x, max_fpr], np.r_[y, y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)]
  return float(np.trapezoid(y, x) / max_fpr)


class PixelCurve:
  """Streaming pixel AUROC/AUPRC/AUPRO: accumulate (map, mask) batches, flat memory.

  Streaming mode counts normal and lesion pixels in `num_bins` equal bins over
  `value_range`; every metric is then computed from the bin counts as if each bin were
  one tied score, so memory is two fixed arrays however many images pass through.
  Pass `value_range` (e.g. from a first pass over healthy validation maps) whenever you
  can; if it is None, the first update's min/max, widened by `MARGIN` of the span on
  each side, fixes it. Later values outside the range are counted in the edge bins
  (`num_clipped` says how many), which only ties them with their bin neighbours.
  `exact=True` keeps every value instead and uses `auroc`/`auprc` directly.

  `keep_images=True` also keeps each image's counts in the same bins (sparsely, see
  `ImageHistograms`), so `pixel_bootstrap(curve.image_histograms())` resamples exactly
  the statistic this curve reports: summed over all images they are its counts.

  `regions=True` adds MVTec AD's per-region overlap (`aupro`): each image's lesion mask
  is split into connected regions as it arrives, and every lesion pixel adds 1/|its
  region| to its bin of one more array, so PRO(t), the mean over regions of the
  fraction of the region at or above t, is a cumulative sum over bins, like the FPR.
  """

  MARGIN = 0.25

  def __init__(self, num_bins: int = 10_000, value_range: tuple[float, float] | None = None,
               exact: bool = False, keep_images: bool = False, regions: bool = False):
    if int(num_bins) != num_bins or num_bins < 2:
      raise DataError(f"PixelCurve num_bins must be an integer >= 2, got {num_bins!r}")
    if exact and keep_images:
      raise DataError("PixelCurve(exact=True, keep_images=True): per-image histograms "
                      "need bins; pass exact=False to keep them")
    self.num_bins = int(num_bins)
    self.exact = bool(exact)
    self.value_range = None if value_range is None else _check_range(value_range)
    self.num_clipped = 0
    self.regions, self.num_regions = bool(regions), 0
    self._images = [] if keep_images else None  # ImageHistograms, one per update
    if self.exact:
      self._values, self._masks = [], []
      self._weights = [] if self.regions else None  # 1/|region| per pixel
    else:
      self._counts = np.zeros((2, self.num_bins), np.int64)  # row 0 normal, row 1 lesion
      self._pro = np.zeros(self.num_bins) if self.regions else None  # Σ 1/|region|

  def update(self, maps: np.ndarray, masks: np.ndarray, valid: np.ndarray | None = None):
    """Adds a batch: maps (B, *spatial), masks of the same shape, valid (B,) or None."""
    maps = _as_array(maps, "maps")
    masks = _as_binary(masks, "masks")
    _same_shape(maps, masks, "maps", "masks")
    if valid is not None:
      valid = _as_binary(valid, "valid").reshape(-1)
      if len(valid) != len(maps):
        raise DataError(f"valid has {len(valid)} entries for a batch of {len(maps)} "
                        "maps: pass one flag per image (False for padding)")
      maps, masks = maps[valid], masks[valid]
      if not len(maps):
        return
    values = _as_scores(maps, "maps").reshape(len(maps), -1)
    weights = None
    if self.regions:
      weights, count = _region_weights(masks)
      self.num_regions += count
    masks = masks.reshape(len(maps), -1)
    if self.exact:
      self._values.append(values.reshape(-1).copy())
      self._masks.append(masks.reshape(-1).copy())
      if weights is not None:
        self._weights.append(weights.reshape(-1))
      return
    self._add_bins(values, masks, weights)

  def _add_bins(self, values: np.ndarray, masks: np.ndarray, weights) -> None:
    """Streaming mode: bins (n, pixels) values into the counts (and region weights)."""
    if self.value_range is None:
      self.value_range = _widened_range(values.min(), values.max(), self.MARGIN)
    index, clipped = _bin_index(values, self.value_range, self.num_bins)
    self.num_clipped += clipped
    codes = index + self.num_bins * masks
    counts = np.bincount(codes.reshape(-1), minlength=2 * self.num_bins)
    self._counts += counts.reshape(2, self.num_bins)
    if weights is not None:
      self._pro += np.bincount(index.reshape(-1), weights=weights.reshape(-1),
                               minlength=self.num_bins)
    if self._images is not None:
      self._images.append(ImageHistograms.from_codes(codes, self.value_range,
                                                     self.num_bins))

  def image_histograms(self) -> "ImageHistograms":
    """Every image's counts so far (in update order), in this curve's bins."""
    if self._images is None:
      raise DataError("PixelCurve.image_histograms needs PixelCurve(keep_images=True)")
    if not self._images:
      raise DataError("PixelCurve has no pixels yet: call update() with maps and masks")
    return ImageHistograms.concatenate(self._images)

  def _check_pixels(self) -> None:
    if self.exact and not self._values:
      raise DataError("PixelCurve has no pixels yet: call update() with maps and masks")

  def _groups(self):
    """(thresholds, lesion counts, normal counts) by decreasing value."""
    self._check_pixels()
    if self.exact:
      masks, values = np.concatenate(self._masks), np.concatenate(self._values)
      _check_both_classes(int(masks.sum()), int((~masks).sum()), "PixelCurve")
      return _tie_groups(masks, values)
    neg, pos = self._counts
    _check_both_classes(int(pos.sum()), int(neg.sum()), "PixelCurve")
    return _lower_edges(self.value_range, self.num_bins)[::-1], pos[::-1], neg[::-1]

  @classmethod
  def from_counts(cls, counts: np.ndarray, value_range: tuple[float, float]) -> "PixelCurve":
    """A streaming curve from bin counts (2, num_bins): row 0 normal, row 1 lesion."""
    counts = np.asarray(counts, np.int64)
    if counts.ndim != 2 or counts.shape[0] != 2:
      raise DataError(f"counts must have shape (2, num_bins), got {counts.shape}")
    curve = cls(counts.shape[1], value_range)
    curve._counts = counts.copy()
    return curve

  def auroc(self) -> float:
    """Pixel-level AUROC over all valid pixels seen so far."""
    _, pos, neg = self._groups()
    return _auroc_from_counts(pos, neg)

  def auprc(self) -> float:
    """Pixel-level average precision over all valid pixels seen so far."""
    _, pos, neg = self._groups()
    return _ap_from_counts(pos, neg)

  def best_f1_threshold(self) -> tuple[float, float]:
    """The PR-curve point of highest F1: (threshold, F1), predicting `map >= threshold`.

    Pooled F1 equals pooled Dice, so this is also the best-Dice threshold. In streaming
    mode the threshold is a bin's lower edge.
    """
    return _best_f1_from_counts(*self._groups())

  def pro_curve(self) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) from (0, 0) at every threshold by decreasing value (every distinct
    value, or every bin's lower edge), ties stepping diagonally. FPR is over all normal
    pixels (mask 0) of every image; PRO is the mean over lesion regions of the fraction
    of the region's pixels at or above the threshold."""
    if not self.regions:
      raise DataError("PixelCurve.pro_curve and aupro need PixelCurve(regions=True)")
    self._check_pixels()
    if self.exact:
      masks, values = np.concatenate(self._masks), np.concatenate(self._values)
      _, (neg, pro) = _value_groups(values, (~masks).astype(np.int64),
                                    np.concatenate(self._weights))
    else:
      neg, pro = self._counts[0][::-1], self._pro[::-1]
    num_neg = int(neg.sum())
    if self.num_regions == 0 or num_neg == 0:
      raise DataError(f"PixelCurve.aupro needs lesion regions and normal pixels, got "
                      f"{self.num_regions} regions and {num_neg} normal pixels: evaluate "
                      "on images with annotated lesions and healthy tissue")
    fpr = np.cumsum(neg) / num_neg
    pro = np.minimum(np.cumsum(pro) / self.num_regions, 1.0)  # float sums may pass 1
    return np.r_[0.0, fpr], np.r_[0.0, pro]

  def aupro(self, max_fpr: float = AUPRO_MAX_FPR) -> float:
    """MVTec AD's AUPRO: the area under PRO(FPR) for FPR in [0, max_fpr] (trapezoids,
    PRO interpolated at max_fpr), divided by max_fpr, so 1 is perfect."""
    if not 0.0 < max_fpr <= 1.0:
      raise DataError(f"max_fpr must be in (0, 1], got {max_fpr!r} (MVTec AD uses 0.3)")
    return _area_to(*self.pro_curve(), max_fpr)

  def overlap_at(self, threshold: float) -> dict:
    """Pooled Dice and IoU of `map >= threshold` against the masks seen so far.

    In streaming mode a pixel counts as predicted when its bin's lower edge is at or
    above the threshold: exact at bin edges, within one bin width elsewhere.
    """
    thresholds, pos, neg = self._groups()
    above = thresholds >= threshold
    tp, fp = int(pos[above].sum()), int(neg[above].sum())
    fn = int(pos.sum()) - tp
    return {"threshold": float(threshold), "dice": 2 * tp / max(2 * tp + fp + fn, 1),
            "iou": tp / max(tp + fp + fn, 1)}


def aupro(maps, masks, max_fpr: float = AUPRO_MAX_FPR) -> float:
  """Exact AUPRO (MVTec AD) of maps (n, *spatial) against masks of the same shape:
  every distinct map value is a threshold. `PixelCurve(regions=True)` streams it."""
  curve = PixelCurve(exact=True, regions=True)
  curve.update(maps, masks)
  return curve.aupro(max_fpr)


def _check_range(value_range) -> tuple[float, float]:
  try:
    lo, hi = (float(v) for v in value_range)
  except (TypeError, ValueError):
    raise DataError(f"value_range must be a pair (low, high), got {value_range!r}") from None
  if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
    raise DataError(f"value_range must be finite with low < high, got {value_range!r}: "
                    "use the min and max of maps from a first pass, or None")
  return lo, hi


def _widened_range(lo: float, hi: float, margin: float) -> tuple[float, float]:
  span = hi - lo if hi > lo else max(abs(hi), 1.0)
  return float(lo - margin * span), float(hi + margin * span)


def _pair_counts(pred, mask) -> tuple[int, int, int]:
  """(|P∩M|, |P|, |M|) over all pixels given."""
  pred, mask = _as_binary(pred, "pred"), _as_binary(mask, "mask")
  _same_shape(pred, mask, "pred", "mask")
  return (int(np.count_nonzero(pred & mask)), int(np.count_nonzero(pred)),
          int(np.count_nonzero(mask)))


def dice(pred: np.ndarray, mask: np.ndarray) -> float:
  """Pooled Dice 2|P∩M|/(|P|+|M|) over every pixel given; 1.0 when both are empty."""
  both, p, m = _pair_counts(pred, mask)
  return 1.0 if p + m == 0 else 2.0 * both / (p + m)


def iou(pred: np.ndarray, mask: np.ndarray) -> float:
  """Pooled intersection over union |P∩M|/|P∪M|; 1.0 when both are empty."""
  both, p, m = _pair_counts(pred, mask)
  union = p + m - both
  return 1.0 if union == 0 else both / union


def _maps_masks(maps, masks) -> tuple[np.ndarray, np.ndarray]:
  maps = _as_scores(maps, "maps")
  masks = _as_binary(masks, "masks")
  _same_shape(maps, masks, "maps", "masks")
  return maps.reshape(-1), masks.reshape(-1)


def best_dice_threshold(maps, masks, candidates=None) -> tuple[float, float]:
  """(threshold, Dice) maximising pooled Dice of `maps >= threshold` on these images.

  Meant for the calibration fifth of `calibration_split`. By default every distinct map
  value is a candidate (all empirical quantiles), so the optimum is exact; pass
  `candidates` (e.g. np.quantile(maps, np.linspace(0.9, 1, 101))) for a coarser grid,
  or use `PixelCurve.best_f1_threshold` (same optimum, binned) on very large sets.
  """
  values, masks = _maps_masks(maps, masks)
  num_lesion = int(masks.sum())
  if num_lesion == 0:
    raise DataError("best_dice_threshold: the masks have no lesion pixels, so every "
                    "threshold above the maps is optimal: calibrate on annotated lesions")
  if candidates is None:
    return _best_f1_from_counts(*_tie_groups(masks, values))
  candidates = _as_scores(candidates, "candidates").reshape(-1)
  predicted = len(values) - np.searchsorted(np.sort(values), candidates, side="left")
  hits = num_lesion - np.searchsorted(np.sort(values[masks]), candidates, side="left")
  scores = 2.0 * hits / (predicted + num_lesion)
  k = int(np.argmax(scores))
  return float(candidates[k]), float(scores[k])


def nsigma_threshold(healthy_maps, n_sigma: float = 3.0) -> float:
  """mean + n_sigma·std of every pixel of healthy maps: needs no anomalous data.

  `healthy_maps` is an array or a list of arrays (shapes may differ); std is the
  population one (ddof=0).
  """
  if isinstance(healthy_maps, (list, tuple)):
    if not healthy_maps:
      raise DataError("healthy_maps is empty: pass maps of healthy validation images")
    healthy_maps = np.concatenate([np.ravel(m) for m in healthy_maps])
  values = _as_scores(healthy_maps, "healthy_maps")
  if not np.isfinite(n_sigma):
    raise DataError(f"n_sigma must be finite, got {n_sigma!r}")
  return float(values.mean() + n_sigma * values.std())


# ----------------------------------------------------------------------------- protocol


def _check_fraction(fraction: float) -> None:
  if not 0.0 < fraction < 1.0:
    raise DataError(f"fraction must be strictly between 0 and 1, got {fraction!r} "
                    "(0.2 is the usual calibration fifth)")


def _as_groups(groups, n: int, what: str = "groups") -> np.ndarray:
  groups = _as_array(groups, what).reshape(-1)
  if len(groups) != n:
    raise DataError(f"{what} has {len(groups)} entries for {n} images: pass one group "
                    "(patient id) per image")
  return groups


def calibration_split(n: int, fraction: float = 0.2, seed: int = 0,
                      groups=None) -> tuple[np.ndarray, np.ndarray]:
  """(calibration, report) sorted indices: a random `fraction` to choose thresholds on.

  Zimmerer et al. pick thresholds on a random fifth and report on the other four
  fifths. The halves are disjoint and cover range(n); with `groups` (patient ids) each
  group lands wholly on one side, the calibration side as close to `fraction`·n images
  as whole groups allow (`splits.held_out`). Deterministic per seed.
  """
  _check_fraction(fraction)
  if int(n) != n or n < 2:
    raise DataError(f"calibration_split needs n >= 2 images, got {n!r}")
  n = int(n)
  if groups is not None:
    groups = _as_groups(groups, n)
    if len(np.unique(groups)) < 2:
      raise DataError("calibration_split with groups needs at least two groups "
                      "(patients), got one: pass groups=None to split images")
  calibration = np.zeros(n, bool)
  calibration[splits.held_out(n, fraction, seed, groups)] = True
  return np.flatnonzero(calibration), np.flatnonzero(~calibration)


def _resampling_units(n: int, groups, stratify):
  """Units (None: rows; else one row-index array per group) and each unit's stratum."""
  if groups is None:
    units = None
  else:
    _, unit_of = np.unique(_as_groups(groups, n), return_inverse=True)
    order = np.argsort(unit_of, kind="stable")
    units = np.split(order, np.flatnonzero(np.diff(unit_of[order])) + 1)
  if stratify is None:
    return units, np.zeros(n if units is None else len(units), np.int64)
  labels = _as_groups(stratify, n, "stratify")
  if units is None:
    keys = labels.tolist()
  else:
    keys = [tuple(np.unique(labels[u]).tolist()) for u in units]  # a group's label set
  lookup = {key: i for i, key in enumerate(dict.fromkeys(keys))}
  return units, np.array([lookup[k] for k in keys], np.int64)


def _resample(rng, units, strata) -> np.ndarray:
  """Row indices of one resample: units drawn with replacement within each stratum."""
  picked = []
  for s in np.unique(strata):
    members = np.flatnonzero(strata == s)
    picked.append(rng.choice(members, size=len(members), replace=True))
  picked = np.concatenate(picked)
  return picked if units is None else np.concatenate([units[u] for u in picked])


def bootstrap(metric_fn: Callable[..., float], *arrays, num_resamples: int = 50,
              seed: int = 0, groups=None, stratify=None, alpha: float = 0.05) -> dict:
  """Percentile bootstrap of `metric_fn(*arrays)` over images (rows of every array).

  With `groups` whole groups (patients) are resampled; with `stratify` (labels) rows
  are resampled within each label, so every resample keeps both classes (with both,
  groups are resampled within the set of labels they contain). Returns
  {'estimate': metric on the full data, 'mean', 'std', 'low', 'high'} where
  [low, high] is the (1 − alpha) percentile interval.
  """
  if not arrays:
    raise DataError("bootstrap needs at least one array to resample, e.g. labels, scores")
  arrays = [_as_array(a, f"bootstrap array {i}") for i, a in enumerate(arrays)]
  n = len(arrays[0])
  if any(len(a) != n for a in arrays):
    raise DataError(f"bootstrap arrays have lengths {[len(a) for a in arrays]}: every "
                    "array needs one row per image, in the same order")
  _check_resamples(num_resamples, alpha)
  units, strata = _resampling_units(n, groups, stratify)
  rng = np.random.default_rng(seed)
  values = np.empty(int(num_resamples))
  for r in range(len(values)):
    rows = _resample(rng, units, strata)
    try:
      values[r] = metric_fn(*[a[rows] for a in arrays])
    except DataError as e:
      raise DataError(f"bootstrap resample {r} failed: {e}. Pass stratify=labels so that "
                      "every resample keeps both classes") from e
  return _interval(metric_fn(*arrays), values, alpha)


def _check_resamples(num_resamples, alpha: float) -> None:
  if int(num_resamples) != num_resamples or num_resamples < 2:
    raise DataError(f"num_resamples must be an integer >= 2, got {num_resamples!r}")
  _check_fraction(alpha)


def _interval(estimate: float, values: np.ndarray, alpha: float) -> dict:
  """The full-data estimate and the percentile interval of its resampled values."""
  low, high = np.percentile(values, [50 * alpha, 100 - 50 * alpha])
  return {"estimate": float(estimate), "mean": float(values.mean()),
          "std": float(values.std(ddof=1)), "low": float(low), "high": float(high)}


@dataclasses.dataclass(frozen=True)
class ImageHistograms:
  """Per-image pixel counts in equal bins of `value_range`, stored sparsely.

  Image i's nonzero counts are `counts[starts[i]:starts[i + 1]]` at `codes` (bin +
  num_bins·is_lesion). An image has at most as many nonzero bins as pixels, so keeping
  them at a `PixelCurve`'s full resolution (10,000 bins by default) costs at most
  4 bytes per pixel (uint16 codes and counts where they fit), usually far less: this is
  what lets the bootstrap resample the very statistic the point estimate is.
  """
  value_range: tuple[float, float]
  num_bins: int
  starts: np.ndarray  # (n + 1,) int64 offsets into codes and counts
  codes: np.ndarray  # bin + num_bins * is_lesion
  counts: np.ndarray  # pixels with that code

  @classmethod
  def from_codes(cls, codes: np.ndarray, value_range, num_bins: int) -> "ImageHistograms":
    """From each pixel's code, shape (n, pixels): bin + num_bins·is_lesion."""
    n, per_image = codes.shape
    width = 2 * num_bins
    keys, counts = np.unique(codes + width * np.arange(n)[:, None], return_counts=True)
    image_of = keys // width
    starts = np.searchsorted(image_of, np.arange(n + 1), side="left")
    code_type = np.uint16 if width <= 1 << 16 else np.int32
    count_type = np.uint16 if per_image < 1 << 16 else np.int32
    return cls(tuple(value_range), int(num_bins), starts.astype(np.int64),
               (keys % width).astype(code_type), counts.astype(count_type))

  @classmethod
  def concatenate(cls, parts: Sequence["ImageHistograms"]) -> "ImageHistograms":
    """The images of every part, in order (all parts must share their bins)."""
    first = parts[0]
    for p in parts[1:]:
      if (p.value_range, p.num_bins) != (first.value_range, first.num_bins):
        raise DataError(f"cannot concatenate image histograms over {p.value_range} in "
                        f"{p.num_bins} bins with ones over {first.value_range} in "
                        f"{first.num_bins} bins: bin every image the same way")
    offsets = np.cumsum([0] + [len(p.codes) for p in parts[:-1]])
    starts = np.concatenate([p.starts[:-1] + o for p, o in zip(parts, offsets)]
                            + [[sum(len(p.codes) for p in parts)]])
    return cls(first.value_range, first.num_bins, starts.astype(np.int64),
               np.concatenate([p.codes for p in parts]),
               np.concatenate([p.counts for p in parts]))

  def __len__(self) -> int:
    return len(self.starts) - 1

  @property
  def has_lesion(self) -> np.ndarray:
    """(n,) bool: the image has at least one lesion pixel."""
    image_of = np.repeat(np.arange(len(self)), np.diff(self.starts))
    return np.bincount(image_of[self.codes >= self.num_bins], minlength=len(self)) > 0

  def summed(self, weights: np.ndarray | None = None) -> np.ndarray:
    """Σ_i weights[i]·counts of image i, shape (2, num_bins): a resample's curve counts."""
    sizes = np.diff(self.starts)
    if weights is None:
      weights = np.ones(len(self), np.int64)
    w = np.repeat(np.asarray(weights, np.float64), sizes) * self.counts
    total = np.bincount(self.codes, weights=w, minlength=2 * self.num_bins)
    return np.rint(total).astype(np.int64).reshape(2, self.num_bins)

  def dense(self) -> np.ndarray:
    """(n, 2, num_bins) counts: row 0 normal pixels, row 1 lesion pixels (small n only)."""
    out = np.zeros((len(self), 2 * self.num_bins), np.int64)
    image_of = np.repeat(np.arange(len(self)), np.diff(self.starts))
    out[image_of, self.codes.astype(np.int64)] = self.counts
    return out.reshape(len(self), 2, self.num_bins)

  def overlap_counts(self, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per image (n,): (lesion pixels predicted, pixels predicted, lesion pixels) of
    `map >= threshold`, a pixel predicted when its bin's lower edge is at or above the
    threshold (as `PixelCurve.overlap_at` counts them)."""
    image_of = np.repeat(np.arange(len(self)), np.diff(self.starts))
    codes = self.codes.astype(np.int64)
    lesion = codes >= self.num_bins
    predicted = _lower_edges(self.value_range, self.num_bins)[codes % self.num_bins] \
        >= threshold
    count = lambda keep: np.bincount(image_of[keep], weights=self.counts[keep],
                                     minlength=len(self)).astype(np.int64)
    return count(predicted & lesion), count(predicted), count(lesion)


def image_histograms(maps, masks, value_range: tuple[float, float],
                     num_bins: int = 10_000) -> ImageHistograms:
  """Per-image pixel counts over `num_bins` equal bins of `value_range`.

  Values outside the range go to the edge bins, as in `PixelCurve`; summed over any
  set of images they are that set's PixelCurve counts, which is what `pixel_bootstrap`
  resamples. `PixelCurve(keep_images=True)` collects the same while streaming.
  """
  maps, masks = _as_scores(maps, "maps"), _as_binary(masks, "masks")
  _same_shape(maps, masks, "maps", "masks")
  n, value_range = len(maps), _check_range(value_range)
  index, _ = _bin_index(maps.reshape(n, -1), value_range, num_bins)
  return ImageHistograms.from_codes(index + num_bins * masks.reshape(n, -1), value_range,
                                    num_bins)


def per_image_dice(histograms: ImageHistograms, threshold: float, images=None) -> dict:
  """Mean and median of each image's own Dice of `map >= threshold`, over the images
  with lesion pixels (among `images`, a bool (n,) selection, when given); with the
  pooled Dice of `PixelCurve.overlap_at` it shows whether a few large lesions carry the
  pooled number. {'mean', 'median', 'num_images'}; None for both without a lesion image.
  """
  tp, predicted, lesion = histograms.overlap_counts(threshold)
  keep = lesion > 0
  if images is not None:
    images = _as_binary(images, "images").reshape(-1)
    if len(images) != len(histograms):
      raise DataError(f"images has {len(images)} flags for {len(histograms)} image "
                      "histograms: pass one flag per image, in the same order")
    keep &= images
  dice_i = 2.0 * tp[keep] / (predicted[keep] + lesion[keep])
  if not len(dice_i):
    return {"mean": None, "median": None, "num_images": 0}
  return {"mean": float(dice_i.mean()), "median": float(np.median(dice_i)),
          "num_images": int(len(dice_i))}


def _pixel_values(counts: np.ndarray, value_range, threshold, names) -> list[float]:
  curve = PixelCurve.from_counts(counts, value_range)
  out = {"auroc": curve.auroc, "auprc": curve.auprc}
  overlap = curve.overlap_at(threshold) if threshold is not None else {}
  return [out[k]() if k in out else overlap[k] for k in names]


def pixel_bootstrap(histograms: ImageHistograms, *, threshold: float | None = None,
                    num_resamples: int = 50, seed: int = 0, groups=None,
                    alpha: float = 0.05) -> dict:
  """Bootstrap intervals of pixel AUROC, AUPRC (and Dice/IoU at `threshold`) over images.

  SANO's protocol: whole images (or whole groups, e.g. individuals) are resampled, within
  the images with and without lesion pixels, and the pixel metrics are recomputed from
  the resample's summed `histograms`. Every resample is binned exactly as the point
  estimate: 'estimate' is the metric of all images summed, which is the streaming
  `PixelCurve`'s own value when the histograms come from it. Returns {metric: {
  'estimate', 'mean', 'std', 'low', 'high'}} as `bootstrap` does.
  """
  if not isinstance(histograms, ImageHistograms):
    raise DataError(f"pixel_bootstrap needs ImageHistograms, got {type(histograms).__name__}"
                    ": use metrics.image_histograms or PixelCurve(keep_images=True)")
  n = len(histograms)
  _check_resamples(num_resamples, alpha)
  names = ("auroc", "auprc") + (("dice", "iou") if threshold is not None else ())
  units, strata = _resampling_units(n, groups, histograms.has_lesion)
  rng = np.random.default_rng(seed)
  values = np.empty((int(num_resamples), len(names)))
  for r in range(len(values)):
    weights = np.bincount(_resample(rng, units, strata), minlength=n)
    try:
      values[r] = _pixel_values(histograms.summed(weights), histograms.value_range,
                                threshold, names)
    except DataError as e:
      raise DataError(f"bootstrap resample {r} failed: {e}. Every resample keeps the "
                      "images with and without lesions; evaluate on more images") from e
  estimate = _pixel_values(histograms.summed(), histograms.value_range, threshold, names)
  return {k: _interval(estimate[j], values[:, j], alpha) for j, k in enumerate(names)}


def logistic_regression_auroc(scores, labels, folds: int = 5, seed: int = 0) -> dict:
  """AUROC of a logistic regression on a 1-D score, stratified k-fold cross-validated.

  The TU/e thesis protocol. Folds come from StratifiedKFold(folds, shuffle=True,
  random_state=seed). A 1-D logistic model is monotone in the score, so each fold's
  AUROC equals the raw score's AUROC on that fold's test images when the fitted slope
  is positive (1 − it when negative): the protocol measures ranking, not calibration.
  Returns {'auroc': mean over folds, 'auroc_std': std over folds, 'folds': [per fold]}.
  """
  from sklearn.linear_model import LogisticRegression  # the reference implementation
  from sklearn.model_selection import StratifiedKFold

  labels, scores = _labels_scores(labels, scores)
  if int(folds) != folds or folds < 2:
    raise DataError(f"folds must be an integer >= 2, got {folds!r}")
  smaller = int(min(labels.sum(), (~labels).sum()))
  if smaller < folds:
    raise DataError(f"logistic_regression_auroc with {folds} folds needs at least {folds} "
                    f"images of each class, the smaller class has {smaller}: lower folds "
                    "or add images")
  splitter = StratifiedKFold(n_splits=int(folds), shuffle=True, random_state=seed)
  x = scores[:, None]
  per_fold = []
  for train, test in splitter.split(x, labels):
    model = LogisticRegression().fit(x[train], labels[train])
    per_fold.append(auroc(labels[test], model.decision_function(x[test])))
  return {"auroc": float(np.mean(per_fold)), "auroc_std": float(np.std(per_fold)),
          "folds": per_fold}
