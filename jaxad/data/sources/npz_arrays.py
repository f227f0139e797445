"""The npz source: MedMNIST-style arrays `{split}_images`, `{split}_labels`, `_masks`.

Labels (class indices of any integer dtype, or whole floats, shape N or N×1, as
MedMNIST's uint8 N×1; names go in a str array `class_names`) are loaded once;
images and masks are read from disk one example at a time (`jaxad.data.npz`), so a
large split costs no memory. The unlabeled source reads its .npz inputs the same way.
"""

import os
import zipfile
from collections.abc import Callable

import numpy as np

from jaxad.data import npz as npz_lib
from jaxad.data.sources import base, pixels
from jaxad.errors import ConfigError, DataError


def load(data, split: str, key: str) -> base.Source:
  """Split `split` of the .npz file data.path; `{split}_masks` is optional.

  Images are N×H×W, N×H×W×C (C in 1, 3, 4; alpha dropped), N×D×H×W or
  N×D×H×W×1; a 4-D array whose last axis is 1, 3 or 4 is taken as 2D with channels
  unless data.ndim says otherwise.
  """
  path = data.get("path", "")
  keys, labels_by_split, names = _index(path)
  for k in (f"{split}_images", f"{split}_labels"):
    if k not in keys:
      raise DataError(f"{path} has no array {k!r} (its keys: {keys}): "
                      f"{base.split_hint(key)}")
  name = f"npz:{path}[{split}]"
  images = npz_lib.NpzArray(path, f"{split}_images")
  spatial_ndim = spatial_rank(images.shape, int(data.get("ndim", 0) or 0), name)
  read_image = image_reader(images, spatial_ndim, name)
  labels = _labels(labels_by_split[split], len(images), name)
  masks = npz_lib.NpzArray(path, f"{split}_masks") if f"{split}_masks" in keys else None
  lead = 1 + spatial_ndim  # N and the spatial axes
  if masks is not None and masks.shape[:lead] != images.shape[:lead]:
    raise DataError(f"{name}: masks have shape {masks.shape} but images "
                    f"{images.shape}: {split}_masks must match {split}_images")
  max_label = max((_max_label(v) for v in labels_by_split.values()), default=-1)
  class_names = _class_names(names, max_label, name)

  def reader(i):
    mask = None if masks is None else pixels.binary_mask(masks[i], spatial_ndim)
    return read_image(i), mask

  return base.Source(
      name=name, class_names=class_names, labels=labels,
      ids=base.example_ids(split, len(labels)), groups=None, has_masks=masks is not None,
      spatial_ndim=spatial_ndim, reader=reader,
      blocks=image_blocks(images, spatial_ndim))


def _index(path: str) -> tuple[list[str], dict[str, np.ndarray], np.ndarray | None]:
  """All array names, every split's labels ({split: array}) and class_names (or None)."""
  if not os.path.isfile(path):
    raise DataError(f"npz file {path!r} not found: check data.path")
  if not zipfile.is_zipfile(path):
    raise DataError(f"{path} is not an .npz archive (a single .npy array?): save the "
                    "arrays with np.savez(path, train_images=..., train_labels=..., ...)")
  keys = npz_lib.member_names(path)
  wanted = [k for k in keys if k.endswith("_labels") or k == "class_names"]
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: f[k] for k in wanted}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise DataError(f"cannot read the arrays of {path} ({e}): store plain numeric "
                    "arrays, and class_names as a str array (dtype=str)") from None
  labels = {k[:-len("_labels")]: _class_indices(v, k, path)
            for k, v in arrays.items() if k.endswith("_labels")}
  return keys, labels, arrays.get("class_names")


def _class_indices(labels: np.ndarray, key: str, path: str) -> np.ndarray:
  """The array `key` as int64 class indices (same shape): integers, booleans or whole
  non-negative floats; anything else (class-name strings, fractions) is a DataError."""
  kind = labels.dtype.kind
  values = labels.reshape(-1)
  if kind == "f":
    bad = ~np.isfinite(values) | (values != np.round(values))
    if bad.any():
      raise DataError(f"{path}: {key} ({labels.dtype}) holds "
                      f"{values[bad][0].item()!r}, not a class index: store integer "
                      f"class indices 0, 1, ... (MedMNIST layout: {key} uint8 of "
                      "shape N×1)")
  elif kind not in "iub":
    raise DataError(f"{path}: {key} has dtype {labels.dtype} (e.g. "
                    f"{values[0].item() if labels.size else 'empty'!r}) but labels must "
                    "be integer class indices: store 0, 1, ... (MedMNIST layout: "
                    f"{key} uint8 of shape N×1) and the names as a str array "
                    "class_names, in label order")
  if values.size and values.min() < 0:
    raise DataError(f"{path}: {key} holds the label {values.min().item()!r}, but labels "
                    "are class indices 0, 1, ...: store non-negative integers")
  return values.astype(np.int64).reshape(labels.shape)


def _max_label(labels: np.ndarray) -> int:
  """The largest label, -1 when there is none (of any dtype: uint8 has no -1)."""
  return int(labels.max()) if labels.size else -1


def spatial_rank(shape: tuple[int, ...], ndim: int, name: str) -> int:
  """The spatial rank of images of `shape` (N first), checked against data.ndim."""
  if ndim not in (0, 2, 3):
    raise ConfigError(f"data.ndim={ndim} must be 0 (infer), 2 (images) or 3 (volumes)")
  rank = len(shape)
  if rank == 3 and ndim != 3:
    spatial = 2
  elif rank == 4:
    spatial = ndim or (2 if shape[-1] in (1, 3, 4) else 3)
  elif rank == 5 and ndim != 2 and shape[-1] == 1:
    spatial = 3
  else:
    raise DataError(f"{name}: images of shape {shape} do not fit data.ndim="
                    f"{ndim}; expected N×H×W, N×H×W×C (C in 1, 3, 4), N×D×H×W or "
                    "N×D×H×W×1: check data.ndim")
  if spatial == 2 and rank == 4 and shape[-1] not in (1, 3, 4):
    raise DataError(f"{name}: {shape[-1]} channels are not supported (use 1, 3 "
                    "or 4); set data.ndim=3 if the array holds volumes")
  return spatial


def _image(x: np.ndarray, spatial_ndim: int, lead: int = 0) -> np.ndarray:
  """Stored image(s) with `lead` leading axes → spatial×C: adds the channel axis where
  missing, drops alpha."""
  if x.ndim == lead + spatial_ndim:
    return x[..., None]
  if spatial_ndim == 2 and x.shape[-1] == 4:
    return x[..., :3]
  return x


def image_reader(images: npz_lib.NpzArray, spatial_ndim: int, name: str) -> Callable:
  """i → image i in its pixel dtype (chosen once for the whole array)."""
  dtype = pixels.pixel_dtype(images.dtype, images.value_range, name)
  return lambda i: pixels.as_pixels(_image(images[i], spatial_ndim), dtype)


def image_blocks(images: npz_lib.NpzArray, spatial_ndim: int) -> base.Blocks | None:
  """Every image as `image_reader` serves it, in blocks of about 1 MiB, for the
  pipeline's vectorised pixel check; None for integer arrays, whose pixels are always
  finite and within their dtype's range."""
  if images.dtype.kind != "f":
    return None

  def blocks():
    start = 0
    for block in images.chunks():
      yield (np.arange(start, start + len(block)),
             _image(block.astype(np.float32, copy=False), spatial_ndim, lead=1))
      start += len(block)

  return blocks


def _labels(labels: np.ndarray, n: int, name: str) -> np.ndarray:
  """Class indices (checked by `_class_indices`), shape N or N×1 → int32 N."""
  if labels.ndim == 2 and labels.shape[1] > 1:
    raise DataError(f"{name}: labels have shape {labels.shape}, i.e. multi-label; "
                    "multi-label data is not supported: convert to a single class "
                    "label per image (shape N or N×1)")
  labels = labels.reshape(-1) if labels.ndim <= 2 else labels
  if labels.ndim != 1 or len(labels) != n:
    raise DataError(f"{name}: {labels.shape} labels for {n} images: need one label "
                    "per image (shape N or N×1)")
  return labels.astype(np.int32)  # checked by _class_indices


def _class_names(names, max_label: int, name: str) -> tuple[str, ...]:
  """class_names as stored, else "0".."max_label"; one name per label either way."""
  if names is None:
    return tuple(str(i) for i in range(max_label + 1))
  names = tuple(str(c) for c in np.asarray(names).reshape(-1))
  if len(names) <= max_label:
    raise DataError(f"{name}: {len(names)} class_names but labels go up to "
                    f"{max_label}: give one name per class")
  return names
