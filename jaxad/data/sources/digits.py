"""The digits source: scikit-learn's 1797 8×8 handwritten digits, for quick runs.

No download and no files: the arrays ship with scikit-learn (imported only when used).
The train, val and test splits are fixed 60/20/20 per class with default_rng(0).
"""

import numpy as np

from jaxad.data.sources import base
from jaxad.errors import DataError

DIGITS_FRACTIONS = {"train": 0.6, "val": 0.2, "test": 0.2}


def load(data, split: str, key: str) -> base.Source:
  """Split `split` ('train', 'val' or 'test') of the digits as uint8 8×8×1 images."""
  if split not in DIGITS_FRACTIONS:
    raise DataError(f"the digits source has no split {split!r}; its splits are "
                    f"{list(DIGITS_FRACTIONS)}: {base.split_hint(key)}")
  from sklearn.datasets import load_digits  # only when used
  digits = load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int32)
  indices = _split(labels)[split]
  images, labels = images[indices], labels[indices]
  return base.Source(
      name=f"digits[{split}]", class_names=tuple(str(i) for i in range(10)),
      labels=labels, ids=base.example_ids(split, len(labels)), groups=None,
      has_masks=False, spatial_ndim=2, reader=lambda i: (images[i], None))


def _split(labels: np.ndarray) -> dict[str, np.ndarray]:
  """Sorted example indices per split, stratified by class, fixed by default_rng(0)."""
  rng = np.random.default_rng(0)
  parts = {s: [] for s in DIGITS_FRACTIONS}
  for c in range(10):
    idx = rng.permutation(np.flatnonzero(labels == c))
    n_train = int(round(len(idx) * DIGITS_FRACTIONS["train"]))
    n_val = int(round(len(idx) * DIGITS_FRACTIONS["val"]))
    parts["train"].append(idx[:n_train])
    parts["val"].append(idx[n_train:n_train + n_val])
    parts["test"].append(idx[n_train + n_val:])
  return {s: np.sort(np.concatenate(p)) for s, p in parts.items()}
