"""The tf.data pipeline: source indices → decode → channels → resize → [-1, 1] → batches.

Order is decided in NumPy on example indices, not by a tf.data shuffle buffer: epoch
`e` is the permutation `default_rng([seed, e])` of the normal training indices, cut into
global batches, and each process reads only its contiguous slice of every global batch.
So the global batch at step `s` is the same on 1 process or 64, and resuming at step
`s` costs nothing (slice the index array). Pixels are read by `Source.read` inside
`tf.numpy_function` and preprocessed in the TF graph, in parallel, deterministically.

Evaluation batches cover a split exactly once, in order: the last batch is padded and
every example carries `index` (into the source, for its id) and `valid` (0 on padding).

`load_split` reads every file of a file-backed split once (data.check_files), so an
unreadable or truncated image is reported, with its path, before anything compiles
rather than mid-epoch.

Pixel values are checked here, the one place every split's pixels pass through
(`check_pixels`): float pixels must be finite, and with data.intensity='fixed' and no
data.intensity_range they must lie in [0, 1] (else they would be clipped silently).
In-memory float arrays (npz, tfds) are scanned whole, vectorised, when the split is
loaded; files are checked as data.check_files reads them, and every example again when
the pipeline reads it (one min and max per float image; integer pixels cost nothing).
"""

import concurrent.futures
import dataclasses
import logging
import math
import os
import time
from collections.abc import Iterator

import ml_collections
import numpy as np
import tensorflow as tf

from jaxad.data import sources
from jaxad.data.sources import base as source_base
from jaxad.errors import ConfigError, DataError

log = logging.getLogger("jaxad")
AUTOTUNE = tf.data.AUTOTUNE
MAX_LISTED = 20  # bad files named in a check_files error
BATCHED_READ_BYTES = 16 * 2**20  # a batch of stored images read in one host call, at most
UNIT_SLACK = 1e-3  # float pixels may stray this far outside [0, 1] (rounding)
# tf.data runs on the host only: never let TensorFlow take accelerator memory from JAX.
tf.config.set_visible_devices([], "GPU")


@dataclasses.dataclass(frozen=True)
class Split:
  """A source split and the labels that count as normal in it."""
  source: sources.Source
  normal_labels: np.ndarray  # int labels of the normal classes

  @property
  def normal_indices(self) -> np.ndarray:
    return np.flatnonzero(np.isin(self.source.labels, self.normal_labels))

  @property
  def anomalous(self) -> np.ndarray:
    """1 for every example of a non-normal class, else 0."""
    return (~np.isin(self.source.labels, self.normal_labels)).astype(np.int32)


def normal_labels(source: sources.Source, data: ml_collections.ConfigDict) -> np.ndarray:
  """Resolves data.normal_classes / data.anomalous_classes to normal label ints."""
  return source_base.normal_labels(source, data.normal_classes, data.anomalous_classes)


def load_split(data: ml_collections.ConfigDict, role: str) -> Split | None:
  """Reads split `role` ('train', 'val' or 'test'); None if there is no val split."""
  source = sources.get_source(data, role)
  if source is None:
    return None
  split = Split(source, normal_labels(source, data))
  if role != "test" and len(split.normal_indices) == 0:
    present = sorted({source.class_names[i] for i in np.unique(source.labels)})
    raise DataError(
        f"the {role} split of {source.name} has no image of the normal classes "
        f"{[source.class_names[i] for i in split.normal_labels]} (classes present: "
        f"{present}): check data.normal_classes / data.anomalous_classes")
  check_files(source, data)
  return split


def check_files(source: sources.Source, data: ml_collections.ConfigDict) -> None:
  """Checks a split's pixels before anything compiles; raises one DataError naming
  every bad example.

  In-memory float arrays (`Source.blocks`) are always scanned whole, vectorised
  (`check_pixels`' rules). Every file of a file-backed source is read once, when
  data.check_files is on and the source has at most data.check_files_max examples (0:
  no limit); larger sources are skipped with a log line. Files are decoded on a thread
  pool and the time taken is logged.
  """
  _check_arrays(source, data)
  if not source.from_files or not data.get("check_files", True):
    return
  n, limit = len(source), int(data.get("check_files_max", 0) or 0)
  if limit < 0:
    raise ConfigError(f"data.check_files_max={limit} must be >= 0 (0 = no limit)")
  if limit and n > limit:
    log.info("data.check_files: %s has %d examples, more than data.check_files_max=%d: "
             "not checked (a bad file stops the run when it is read)", source.name, n,
             limit)
    return
  t0 = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(min(32, os.cpu_count() or 1)) as pool:
    problems = [p for p in pool.map(lambda i: _read_problem(source, i, data), range(n))
                if p]
  log.info("data.check_files: read the %d examples of %s in %.1f s", n, source.name,
           time.perf_counter() - t0)
  if problems:
    listed = "\n".join(f"  {p}" for p in problems[:MAX_LISTED])
    more = (f"\n  ... and {len(problems) - MAX_LISTED} more"
            if len(problems) > MAX_LISTED else "")
    raise DataError(
        f"{len(problems)} of the {n} examples of {source.name} cannot be read:\n"
        f"{listed}{more}\nremove or replace these files, or set "
        "data.check_files=False to skip this check (a bad file then stops the run when "
        "it is read)")


def _read_problem(source: sources.Source, i: int, data) -> str | None:
  """Why example i cannot be read or used (the message names its file), or None."""
  try:
    image, _ = source.read(i)
    check_pixels(image, data, source, i)
  except DataError as e:
    return str(e)
  return None


def _unit_floats(data) -> bool:
  """Whether float pixels are mapped from [0, 1] (data.intensity='fixed', no range)."""
  return (data.get("intensity", "fixed") == "fixed"
          and not tuple(data.get("intensity_range", ()) or ()))


def check_pixels(image: np.ndarray, data, source: sources.Source, i: int) -> None:
  """Raises a DataError naming example `i` of `source` if its float pixels are NaN or
  infinite, or lie outside [0, 1] where the pipeline maps [0, 1] (`_unit_floats`).
  Integer pixels always pass: their dtype's range is what is mapped."""
  if image.dtype.kind != "f" or not image.size:
    return
  lo, hi = float(image.min()), float(image.max())  # NaN propagates through both
  what = f"example {source.ids[i]} of {source.name}"
  if not (math.isfinite(lo) and math.isfinite(hi)):
    raise DataError(_non_finite(what, int(np.count_nonzero(~np.isfinite(image))),
                                image.size))
  if _unit_floats(data) and (lo < -UNIT_SLACK or hi > 1 + UNIT_SLACK):
    raise DataError(_outside_unit(f"pixels of {what}", lo, hi, lo, hi))


def _check_arrays(source: sources.Source, data) -> None:
  """`check_pixels` over a whole in-memory array at once (`Source.blocks`)."""
  if source.blocks is None:
    return
  t0, unit = time.perf_counter(), _unit_floats(data)
  bad_finite, bad_range, first_finite, first_range = 0, 0, None, None
  array_lo, array_hi = math.inf, -math.inf
  for indices, images in source.blocks():
    if images.dtype.kind != "f":
      return
    if not len(images):
      continue
    flat = images.reshape(len(images), -1)
    lo, hi = flat.min(axis=1), flat.max(axis=1)  # NaN propagates
    finite = np.isfinite(lo) & np.isfinite(hi)
    if not finite.all():
      rows = np.flatnonzero(~finite)
      bad_finite += len(rows)
      if first_finite is None:
        first_finite = (indices[rows[0]], int(np.count_nonzero(~np.isfinite(
            flat[rows[0]]))), flat.shape[1])
    if finite.any():
      array_lo = min(array_lo, float(lo[finite].min()))
      array_hi = max(array_hi, float(hi[finite].max()))
    if unit:
      rows = np.flatnonzero(finite & ((lo < -UNIT_SLACK) | (hi > 1 + UNIT_SLACK)))
      bad_range += len(rows)
      if len(rows) and first_range is None:
        first_range = (indices[rows[0]], float(lo[rows[0]]), float(hi[rows[0]]))
  log.info("pixel check: scanned the float pixels of %s in %.2f s", source.name,
           time.perf_counter() - t0)
  n = len(source)
  if first_finite is not None:
    i, count, size = first_finite
    raise DataError(f"{bad_finite} of the {n} examples of {source.name} have NaN or "
                    "infinite pixels; the first: " + _non_finite(
                        f"example {source.ids[i]}", count, size))
  if first_range is not None:
    i, lo, hi = first_range
    raise DataError(f"{bad_range} of the {n} examples of {source.name} have float "
                    f"pixels outside [0, 1] (all together [{array_lo:g}, "
                    f"{array_hi:g}]); the first: " + _outside_unit(
                        f"pixels of example {source.ids[i]}", lo, hi, array_lo,
                        array_hi))


def _non_finite(what: str, count: int, size: int) -> str:
  return (f"{what} has {count} NaN or infinite pixels (of {size}): every pixel must "
          "be a finite number; fix or drop the image (e.g. np.nan_to_num) and re-save "
          "the data")


def _outside_unit(what: str, lo: float, hi: float, all_lo: float, all_hi: float) -> str:
  """The message for float pixels in [lo, hi] (all the data's in [all_lo, all_hi])
  where [0, 1] is mapped, with the data.intensity_range that would fit."""
  if all_lo >= 0 and all_hi <= 255:
    fit = "(0, 255)"
  else:
    fit = f"({math.floor(all_lo)}, {math.ceil(all_hi)})"
  return (f"{what} lie in [{lo:g}, {hi:g}] but float images must be in [0, 1] "
          f"(data.intensity='fixed' with no data.intensity_range): set "
          f"data.intensity_range={fit}, the range the images are stored in (or store "
          "uint8, or set data.intensity='minmax')")


def output_shape(data: ml_collections.ConfigDict, spatial_ndim: int) -> tuple[int, ...]:
  """The shape of one preprocessed image: (H, W, C) or (D, H, W, C)."""
  size = data.image_size
  if spatial_ndim == 3:
    return (data.depth or size, size, size, data.channels)
  return (size, size, data.channels)


def _intensity_bounds(data, dtype: np.dtype) -> tuple[float, float]:
  """The intensity window mapped to [-1, 1]: the config's, else the dtype's range."""
  if tuple(data.intensity_range):
    lo, hi = data.intensity_range
    return float(lo), float(hi)
  if np.issubdtype(dtype, np.integer):
    info = np.iinfo(dtype)
    return float(info.min), float(info.max)
  return 0.0, 1.0


def _to_unit(image: np.ndarray, data) -> np.ndarray:
  """One image in its stored dtype → float32 in [0, 1], as data.intensity says."""
  x = image.astype(np.float32)
  if data.intensity == "minmax":
    lo, hi = float(x.min()), float(x.max())
  else:
    lo, hi = _intensity_bounds(data, image.dtype)
  return np.clip((x - lo) / max(hi - lo, 1e-8), 0.0, 1.0)


def _to_channels(image: np.ndarray, channels: int) -> np.ndarray:
  """Grayscale ↔ RGB conversion (ITU-R 601 luma for RGB → gray)."""
  have = image.shape[-1]
  if have == channels:
    return image
  if channels == 3 and have == 1:
    return np.repeat(image, 3, axis=-1)
  if channels == 1 and have == 3:
    return image @ np.array([[0.2989], [0.5870], [0.1140]], np.float32)
  raise DataError(f"cannot convert {have}-channel images to data.channels={channels}: "
                  "set data.channels to 1 or 3")


def _unless_same_size(resize):
  """`resize`, skipped when the spatial axes already have the target size (a resize to
  the same size is an exact identity for both methods, and costs more than the read)."""
  def maybe(x: tf.Tensor, shape: tuple[int, ...], method: str, batch: int = 0):
    spatial = tf.shape(x)[batch:batch + len(shape) - 1]
    same = tf.reduce_all(tf.equal(spatial, tf.constant(shape[:-1], tf.int32)))
    return tf.cond(same, lambda: x, lambda: resize(x, shape, method))
  return maybe


def _resize_2d(x: tf.Tensor, size: tuple[int, int], method: str, batch: int) -> tf.Tensor:
  """Bilinear resizes that shrink an axis filter first (antialias); enlarging needs no
  filter, and TF's plain bilinear kernel is 20× faster than its antialiased one."""
  if method == "nearest":
    return tf.image.resize(x, size, method=method)
  shrinks = tf.reduce_any(tf.shape(x)[batch:batch + 2] > tf.constant(size, tf.int32))
  return tf.cond(shrinks,
                 lambda: tf.image.resize(x, size, method=method, antialias=True),
                 lambda: tf.image.resize(x, size, method=method, antialias=False))


@_unless_same_size
def _resize(x: tf.Tensor, shape: tuple[int, ...], method: str) -> tf.Tensor:
  """Resizes the spatial axes of one (H, W, C) or (D, H, W, C) tensor to `shape`."""
  if len(shape) == 3:
    return _resize_2d(x, shape[:2], method, batch=0)
  # Volumes: resize H×W per slice, then D×H per column (separable bilinear/nearest).
  d, h, w = shape[:3]
  x = tf.image.resize(x, (h, w), method=method)
  x = tf.transpose(tf.image.resize(tf.transpose(x, (2, 0, 1, 3)), (d, h), method=method),
                   (1, 2, 0, 3))
  return x


def _resize_batch(x: tf.Tensor, shape: tuple[int, ...], method: str) -> tf.Tensor:
  """`_resize` of every example of a batch (images in one call, volumes one by one)."""
  if len(shape) == 3:
    return _unless_same_size(lambda x, shape, method: _resize_2d(x, shape[:2], method, 1))(
        x, shape, method, 1)
  return tf.map_fn(lambda v: _resize(v, shape, method), x)


class _Preprocess:
  """Maps an example index to a dict of preprocessed tensors (one tf.data map fn)."""

  def __init__(self, split: Split, data: ml_collections.ConfigDict):
    self.split, self.data = split, data
    self.shape = output_shape(data, split.source.spatial_ndim)
    self.labels = split.source.labels.astype(np.int32)
    self.anomalous = split.anomalous
    self.method = data.get("resize", "bilinear")  # nearest keeps the stored levels

  @tf.autograph.experimental.do_not_convert
  def _read(self, index):
    image, mask = self.split.source.read(int(index))
    check_pixels(image, self.data, self.split.source, int(index))
    image = _to_channels(_to_unit(image, self.data), self.shape[-1])
    if mask is None:
      mask = np.zeros(image.shape[:-1] + (1,), np.float32)
    return image, mask.astype(np.float32)

  def _read_batch(self, indices):
    images, masks = zip(*(self._read(i) for i in indices))
    return np.stack(images), np.stack(masks)

  def batched(self, indices):
    """The examples of a batch of indices at once, for sources whose images share one
    shape (in-memory arrays): one host call and one resize per batch instead of one per
    example, with the same pixels as `__call__` (the same reads and resize kernels)."""
    spatial = [None] * (self.split.source.spatial_ndim + 1)
    images, masks = tf.numpy_function(self._read_batch, [indices], (tf.float32, tf.float32),
                                      stateful=False)
    images = _resize_batch(tf.ensure_shape(images, spatial + [self.shape[-1]]), self.shape,
                           self.method)
    example = {
        "image": tf.ensure_shape(images * 2.0 - 1.0, [None, *self.shape]),
        "label": tf.gather(self.labels, indices),
        "anomalous": tf.gather(self.anomalous, indices),
        "index": tf.cast(indices, tf.int32),
    }
    if self.split.source.has_masks:
      masks = _resize_batch(tf.ensure_shape(masks, spatial + [1]), self.shape[:-1] + (1,),
                            "nearest")
      example["mask"] = tf.cast(masks > 0.5, tf.float32)
    return example

  def __call__(self, index):
    spatial = [None] * self.split.source.spatial_ndim
    image, mask = tf.numpy_function(self._read, [index], (tf.float32, tf.float32),
                                    stateful=False)
    image = _resize(tf.ensure_shape(image, spatial + [self.shape[-1]]), self.shape,
                    self.method)
    example = {
        "image": tf.ensure_shape(image * 2.0 - 1.0, self.shape),
        "label": tf.gather(self.labels, index),
        "anomalous": tf.gather(self.anomalous, index),
        "index": tf.cast(index, tf.int32),
    }
    if self.split.source.has_masks:
      mask = _resize(tf.ensure_shape(mask, spatial + [1]), self.shape[:-1] + (1,),
                     "nearest")
      example["mask"] = tf.cast(mask > 0.5, tf.float32)
    return example


def _numpy_batches(ds: tf.data.Dataset) -> Iterator[dict]:
  """Iterates numpy batches; a read error inside tf.data surfaces as a plain DataError."""
  it = ds.as_numpy_iterator()
  while True:
    try:
      batch = next(it)
    except StopIteration:
      return
    except tf.errors.OpError as e:
      lines = [l for l in e.message.splitlines() if "Error:" in l] or [e.message]
      raise DataError(lines[-1].split("Error: ", 1)[-1].strip()) from None
    yield batch


def _dataset(split, data, indices: np.ndarray, batch: int, valid=None,
             per_example: bool | None = None) -> tf.data.Dataset:
  """Batches of the examples `indices` (with `valid`: padded eval batches).

  In-memory sources are read a batch at a time (`_Preprocess.batched`) when a batch of
  their stored images is small (BATCHED_READ_BYTES: tf.data holds a few batches before
  they are resized); file sources, whose images may differ in size, and large images
  one example at a time (`per_example`), so memory stays flat.
  """
  if per_example is None:
    per_example = split.source.from_files or not len(split.source) or \
        split.source.read(0)[0].size * 4 * batch > BATCHED_READ_BYTES
  ds = tf.data.Dataset.from_tensor_slices(indices.astype(np.int64))
  if valid is not None:
    ds = tf.data.Dataset.zip(ds, tf.data.Dataset.from_tensor_slices(valid))
  preprocess = _Preprocess(split, data)
  one = preprocess if per_example else preprocess.batched
  fn = one if valid is None else (lambda i, v: {**one(i), "valid": v})
  fn = tf.autograph.experimental.do_not_convert(fn)  # plain TF ops; reads run in NumPy
  options = tf.data.Options()
  options.deterministic = True
  options.threading.private_threadpool_size = 0
  ds = ds.with_options(options)
  if per_example:
    return (ds.map(fn, num_parallel_calls=AUTOTUNE, deterministic=True)
            .batch(batch, drop_remainder=valid is None).prefetch(AUTOTUNE))
  return (ds.batch(batch, drop_remainder=valid is None)
          .map(fn, num_parallel_calls=AUTOTUNE, deterministic=True).prefetch(AUTOTUNE))


def steps_per_epoch(split: Split, global_batch: int) -> int:
  n = len(split.normal_indices)
  if n < global_batch:
    raise ConfigError(
        f"the train split has {n} normal images, fewer than train.batch_size="
        f"{global_batch}: lower the batch size or add data")
  return n // global_batch


def epoch_order(split: Split, seed: int, epoch: int, global_batch: int) -> np.ndarray:
  """Epoch `epoch`'s global batches of example indices, shape (steps, global_batch)."""
  steps = steps_per_epoch(split, global_batch)
  perm = np.random.default_rng([seed, epoch]).permutation(split.normal_indices)
  return perm[: steps * global_batch].reshape(steps, global_batch)


def train_batches(split: Split, data: ml_collections.ConfigDict, *, seed: int,
                  global_batch: int, start_step: int = 0, process_index: int = 0,
                  process_count: int = 1) -> Iterator[dict]:
  """Yields this process's share of every global training batch from `start_step` on.

  Batches are numpy dicts (`image`, `label`, `anomalous`, `index`, `mask` if the data
  has masks), `global_batch // process_count` images each; the stream never ends.
  """
  if global_batch % process_count:
    raise ConfigError(f"train.batch_size={global_batch} is not divisible by the "
                      f"{process_count} processes")
  local = global_batch // process_count
  steps = steps_per_epoch(split, global_batch)
  epoch, skip = divmod(start_step, steps)
  while True:
    order = epoch_order(split, seed, epoch, global_batch)[skip:]
    mine = order[:, process_index * local:(process_index + 1) * local].reshape(-1)
    yield from _numpy_batches(_dataset(split, data, mine, local))
    epoch, skip = epoch + 1, 0


def padded_indices(indices: np.ndarray, global_batch: int,
                   length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(indices, valid) padded to whole batches (or to `length`): the padding repeats the
  first index (0 if there is none) with valid = 0, so every example counts once."""
  n = len(indices)
  padded = -(-n // global_batch) * global_batch if length is None else length
  valid = np.zeros(padded, np.float32)
  valid[:n] = 1.0
  indices = np.concatenate([indices, np.full(padded - n, indices[0] if n else 0)])
  return indices, valid


def preprocessed_images(split: Split, data: ml_collections.ConfigDict,
                        indices: np.ndarray, batch: int = 256) -> np.ndarray:
  """The images of `indices`, in order, preprocessed as every batch holds them."""
  indices, valid = padded_indices(np.asarray(indices, np.int64), batch)
  parts = [b["image"][b["valid"] > 0] for b in
           _numpy_batches(_dataset(split, data, indices, batch, valid=valid))]
  return np.concatenate(parts)


def eval_batches(split: Split, data: ml_collections.ConfigDict, *, global_batch: int,
                 normal_only: bool = False, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict]:
  """Every example of the split exactly once, in order, in padded global batches.

  Each process gets its slice of every global batch; padding repeats index 0 with
  `valid` = 0, so masked sums over `valid` count each real example once.
  """
  indices = split.normal_indices if normal_only else np.arange(len(split.source))
  indices, valid = padded_indices(indices, global_batch)
  local = global_batch // process_count
  take = lambda a: a.reshape(-1, global_batch)[:, process_index * local:
                                               (process_index + 1) * local].reshape(-1)
  return _numpy_batches(_dataset(split, data, take(indices), local, valid=take(valid)))
