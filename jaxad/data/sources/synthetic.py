"""The synthetic source: smooth fields, with bright elliptic lesions in the test split.

For tests and smoke runs: every image is generated from (split, index), so any example
is reproducible on its own, and an anomalous image's mask is exactly its lesion.
data.synthetic sets num_examples, image_size, channels and anomaly_fraction.
"""

import zlib

import numpy as np

from jaxad.data.sources import base
from jaxad.errors import ConfigError, DataError

SYNTHETIC_SPLITS = ("train", "val", "test")


def load(data, split: str, key: str) -> base.Source:
  """Normal images are smooth fields in [0.05, 0.6]; anomalous test images add an
  ellipse of value ≥ 0.9 and a mask of exactly its pixels. Generated per index."""
  if split not in SYNTHETIC_SPLITS:
    raise DataError(f"the synthetic source has no split {split!r}; its splits are "
                    f"{list(SYNTHETIC_SPLITS)}: {base.split_hint(key)}")
  cfg = data.get("synthetic", None) or {}
  n = int(cfg.get("num_examples", 64))
  size, channels = int(cfg.get("image_size", 32)), int(cfg.get("channels", 1))
  fraction = float(cfg.get("anomaly_fraction", 0.5)) if split == "test" else 0.0
  if n < 1 or size < 4 or channels < 1 or not 0 <= fraction <= 1:
    raise ConfigError(f"data.synthetic (num_examples={n}, image_size={size}, channels="
                      f"{channels}, anomaly_fraction={fraction}) needs num_examples >= "
                      "1, image_size >= 4, channels >= 1 and anomaly_fraction in [0, 1]")
  labels = np.zeros(n, np.int32)
  order = np.random.default_rng(zlib.crc32(split.encode())).permutation(n)
  labels[order[:int(round(fraction * n))]] = 1
  return base.Source(
      name=f"synthetic[{split}]", class_names=("normal", "anomalous"), labels=labels,
      ids=base.example_ids(split, n), groups=None, has_masks=True, spatial_ndim=2,
      reader=lambda i: example(split, i, size, channels, bool(labels[i])))


def example(split: str, index: int, size: int, channels: int,
            anomalous: bool) -> tuple[np.ndarray, np.ndarray]:
  """The image of (split, index); the anomalous one is the normal one plus a lesion."""
  rng = np.random.default_rng([zlib.crc32(split.encode()), index])
  yy, xx = np.mgrid[0:size, 0:size] + 0.5
  field = np.zeros((size, size))
  for _ in range(4):  # a sum of gaussian blobs
    cy, cx = rng.uniform(0, size, 2)
    sigma = rng.uniform(size / 6, size / 3)
    field += rng.uniform(0.3, 1.0) * np.exp(-((yy - cy)**2 + (xx - cx)**2) / (2 * sigma**2))
  gains = rng.uniform(0.8, 1.0, channels)
  image = (0.05 + 0.55 * (field / field.max())[..., None] * gains).astype(np.float32)
  if not anomalous:
    return image, np.zeros((size, size, 1), np.uint8)
  lesion = _ellipse(rng, yy, xx, size)
  image[lesion] = np.float32(rng.uniform(0.9, 1.0))
  return image, lesion.astype(np.uint8)[..., None]


def _ellipse(rng, yy, xx, size: int) -> np.ndarray:
  """A boolean ellipse with semi-axes in [size/10, size/5] (at least 1.5 pixels)."""
  a, b = rng.uniform(max(1.5, size / 10), max(2.0, size / 5), 2)
  r = max(a, b)
  cy, cx = rng.uniform(r, size - r, 2)
  theta = rng.uniform(0, np.pi)
  u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
  v = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
  return (u / a)**2 + (v / b)**2 <= 1.0
