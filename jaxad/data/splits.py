"""Random held-out parts of a split that keep each patient (group) on one side.

Images of one patient are correlated: a patient with images on both sides of a split
leaks into what the held-out part measures. `held_out` draws whole groups where the data
has a group column (data.group_column: patient or subject id), and single images
otherwise. Both the held-out validation set (`sources.held_out_indices`) and the Dice
calibration fraction (`metrics.calibration_split`) are drawn here, and so is the part of
the test split's anomalous images (whole patients) that data.val_anomaly_fraction moves
into validation (`moved_anomalies`), so scores and thresholds are chosen on labelled
anomalies without touching the test split.
"""

import numpy as np

from jaxad.errors import ConfigError, DataError


def held_out(n: int, fraction: float, seed: int, groups=None) -> np.ndarray:
  """Sorted indices of a random part of range(n), about `fraction`·n images.

  Without `groups`, round(fraction·n) images (at least 1, at most n − 1). With
  `groups` (one id per image), whole groups in a random order, as many as bring the
  part closest to fraction·n images (at least one group, never all): no group is on
  both sides. Deterministic per seed.
  """
  rng = np.random.default_rng(seed)
  if groups is None:
    size = min(max(int(round(fraction * n)), 1), n - 1)
    return np.sort(rng.permutation(n)[:size])
  groups = np.asarray(groups).reshape(-1)
  if len(groups) != n:
    raise DataError(f"groups has {len(groups)} entries for {n} images: pass one group "
                    "(patient id) per image")
  names, group_of = np.unique(groups, return_inverse=True)
  if len(names) < 2:
    raise DataError(f"cannot hold out part of {n} images by patient: they all belong to "
                    f"one group ({names[0]!r}); check data.group_column, or clear it to "
                    "split images")
  order = rng.permutation(len(names))
  cumulative = np.cumsum(np.bincount(group_of, minlength=len(names))[order])
  take = int(np.argmin(np.abs(cumulative[:-1] - fraction * n))) + 1  # 1..G-1 groups
  return np.flatnonzero(np.isin(group_of, order[:take]))



def moved_anomalies(anomalous, fraction: float, seed: int, groups=None) -> np.ndarray:
  """Sorted indices of the images a labelled validation part takes from a test split.

  About `fraction` of the A anomalous images (`anomalous`: bool per image), drawn at
  random; deterministic per seed. Without `groups`, round(fraction·A) anomalous images.
  With `groups` (one patient id per image), whole patients among those with an
  anomalous image, as many as bring the anomalous images moved closest to fraction·A,
  with every normal image of theirs too, so no patient is on both sides. At least one
  image (patient) moves and one stays; a DataError says why when that cannot be.
  """
  anomalous = np.asarray(anomalous, bool).reshape(-1)
  count = int(anomalous.sum())
  wanted = _wanted(count, fraction)
  rng = np.random.default_rng(seed)
  if groups is None:
    take = min(wanted, count - 1)
    return np.sort(rng.permutation(np.flatnonzero(anomalous))[:take])
  groups = np.asarray(groups).reshape(-1)
  if len(groups) != len(anomalous):
    raise DataError(f"groups has {len(groups)} entries for {len(anomalous)} images: pass "
                    "one group (patient id) per image")
  names, group_of = np.unique(groups, return_inverse=True)
  per_group = np.bincount(group_of, weights=anomalous, minlength=len(names))
  sick = np.flatnonzero(per_group > 0)  # patients with an anomalous image
  if len(sick) < 2:
    raise DataError(f"the {count} anomalous images of the test split all belong to one "
                    f"patient ({names[sick[0]]!r}, data.group_column): moving them would "
                    "leave the test split without one; set data.val_anomaly_fraction=0, "
                    "or clear data.group_column to move single images")
  order = rng.permutation(sick)
  cumulative = np.cumsum(per_group[order])
  take = int(np.argmin(np.abs(cumulative[:-1] - wanted))) + 1  # 1..G-1 patients
  return np.flatnonzero(np.isin(group_of, order[:take]))


def _wanted(count: int, fraction: float) -> int:
  """round(fraction·count) anomalous images, checked: at least 1, and 1 left behind."""
  if not 0 < fraction < 1:
    raise ConfigError(f"data.val_anomaly_fraction={fraction} must be in (0, 1) here "
                      "(0 turns it off)")
  if count == 0:
    raise DataError("the test split has no anomalous image to move into validation "
                    "(data.val_anomaly_fraction): check data.normal_classes / "
                    "data.anomalous_classes, or set data.val_anomaly_fraction=0")
  if count == 1:
    raise DataError("the test split has a single anomalous image: moving it into "
                    "validation (data.val_anomaly_fraction) would leave the test split "
                    "without one; set data.val_anomaly_fraction=0")
  wanted = int(round(fraction * count))
  if wanted < 1:
    raise DataError(f"data.val_anomaly_fraction={fraction:g} of the test split's {count} "
                    f"anomalous images rounds to none: raise it to at least "
                    f"{1 / count:.2g}, or set it to 0")
  return wanted
