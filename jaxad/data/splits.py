"""Random held-out parts of a split that keep each patient (group) on one side.

Images of one patient are correlated: a patient with images on both sides of a split
leaks into what the held-out part measures. `held_out` draws whole groups where the data
has a group column (data.group_column: patient or subject id), and single images
otherwise. Both the held-out validation set (`sources.held_out_indices`) and the Dice
calibration fraction (`metrics.calibration_split`) are drawn here.
"""

import numpy as np

from jaxad.errors import DataError


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
