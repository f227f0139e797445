"""Data sources: one split of a dataset as metadata in memory and pixels read by index.

A `Source` holds labels, ids and groups for every example of a split, and a `reader`
that decodes example `i` on demand; the tf.data pipeline calls `Source.read` inside
`tf.numpy_function`, then resizes and scales. Sources do neither: `read` returns pixels
in their stored dtype, always one of uint8, uint16 or float32 (float values as stored;
the pipeline maps the dtype's range, float 0..1, unless data.intensity_range says
otherwise), with a trailing channel axis (H×W×C for images, D×H×W×1 for volumes), and
masks as uint8 in {0, 1} with one channel.

Sources by `data.source`: tfds, folder (`ROOT/<split>/<class>/*.png`), nifti (the same
layout with one `.nii`/`.nii.gz` volume per file), csv (ISIC 2018), npz (MedMNIST),
digits (scikit-learn 8×8 digits) and synthetic (smooth fields with bright elliptic
lesions, for tests).
"""

import csv
import dataclasses
import os
import re
import zipfile
import zlib
from collections.abc import Callable, Sequence

import ml_collections
import numpy as np
from PIL import Image

from jaxad.data import npz as npz_lib
from jaxad.data import splits
from jaxad.errors import ConfigError, DataError

ROLES = ("train", "val", "test")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
MASKS_FOLDER = "masks"  # folder source: ROOT/<split>/masks/<class>/<stem>.<ext>
VAL_SEED = 0  # the held-out validation set never depends on the training seed

Reader = Callable[[int], tuple[np.ndarray, np.ndarray | None]]


@dataclasses.dataclass(frozen=True)
class Source:
  """One split of a dataset: metadata in memory, pixels read on demand."""
  name: str  # human-readable, e.g. "npz:/data/x.npz[test]"
  class_names: tuple[str, ...]  # label i means class_names[i]
  labels: np.ndarray  # int32 [N]
  ids: np.ndarray  # str [N]: file path relative to the split root, or f"{split}/{i}"
  groups: np.ndarray | None  # str [N] (patient / subject id) or None
  has_masks: bool
  spatial_ndim: int  # 2 for images, 3 for volumes
  reader: Reader  # i -> (image, mask or None), see the module docstring
  from_files: bool = False  # one file per example (folder, nifti, csv): data.check_files

  def __post_init__(self):
    n = len(self.labels)
    groups = n if self.groups is None else len(self.groups)
    if len(self.ids) != n or groups != n:
      raise DataError(f"{self.name}: {n} labels, {len(self.ids)} ids and {groups} "
                      "groups: every example needs one of each")

  def __len__(self) -> int:
    return len(self.labels)

  def read(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Returns (image, mask) of example `i`; any failure is a DataError naming it."""
    i = int(i)
    if not 0 <= i < len(self):
      raise DataError(f"example index {i} is out of range for {self.name} "
                      f"({len(self)} examples)")
    try:
      image, mask = self.reader(i)
    except (DataError, ConfigError):
      raise
    except Exception as e:  # a reader bug or an odd file: name the example
      raise DataError(f"cannot read example {i} ({self.ids[i]}) of {self.name}: "
                      f"{type(e).__name__}: {e}") from None
    if image.ndim != self.spatial_ndim + 1:
      raise DataError(f"example {i} ({self.ids[i]}) of {self.name} has shape "
                      f"{image.shape}, expected {self.spatial_ndim} spatial axes and "
                      "one channel axis: check the file")
    return image, mask

  def subset(self, indices, name: str | None = None) -> "Source":
    """The selected rows (same class_names); the reader maps new indices to old."""
    indices = np.asarray(indices, np.int64).reshape(-1)
    if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
      raise DataError(f"subset indices must lie in [0, {len(self)}) for {self.name}")
    reader = self.reader
    return dataclasses.replace(
        self, name=name or self.name, labels=self.labels[indices], ids=self.ids[indices],
        groups=None if self.groups is None else self.groups[indices],
        reader=lambda j: reader(int(indices[j])))


# ----------------------------------------------------------------------------------
# Entry points.


def get_source(data: ml_collections.ConfigDict, role: str) -> Source | None:
  """Reads split `role` ('train', 'val' or 'test') of the dataset `data` describes.

  With data.val_split = '' the validation set is the fraction data.val_fraction of the
  train split, fixed by `default_rng(0)` (whole patients where the split has groups),
  and 'train' excludes it; with a zero fraction there is no validation set and 'val'
  returns None.
  """
  if role not in ROLES:
    raise ConfigError(f"unknown role {role!r}: use one of {list(ROLES)}")
  kind = data.get("source", "")
  if kind not in _LOADERS:
    raise ConfigError(f"unknown data.source {kind!r}: valid sources are "
                      f"{sorted(_LOADERS)}; set data.source to one of them")
  load = _LOADERS[kind]
  held_out = not data.get("val_split", "") and role in ("train", "val")
  if not held_out:
    return load(data, _split_name(data, role), f"data.{role}_split")
  fraction = float(data.get("val_fraction", 0.0) or 0.0)
  if role == "val" and fraction <= 0:
    return None
  train = load(data, _split_name(data, "train"), "data.train_split")
  if fraction <= 0:
    return train
  val = held_out_indices(len(train), fraction, train.name, groups=train.groups)
  if role == "val":
    return train.subset(val, f"{train.name} held-out val {fraction:g}")
  return train.subset(np.setdiff1d(np.arange(len(train)), val),
                      f"{train.name} minus held-out val {fraction:g}")


def _split_name(data, role: str) -> str:
  split = data.get(f"{role}_split", role)
  if not split:
    raise ConfigError(f"data.{role}_split is empty: set it to the {role} split's name "
                      "(e.g. 'train' or 'test')")
  return split


def held_out_indices(n: int, fraction: float, name: str = "the train split",
                     groups=None) -> np.ndarray:
  """The sorted indices of the validation examples held out of an n-example split.

  With `groups` (patient ids) whole patients are held out (`splits.held_out`), so no
  patient has images on both sides.
  """
  if not 0 < fraction < 1:
    raise ConfigError(f"data.val_fraction={fraction} must be in (0, 1)")
  k = max(1, int(round(n * fraction)))
  if k >= n and groups is None:
    raise DataError(f"{name} has {n} examples: holding out data.val_fraction="
                    f"{fraction} for validation leaves none to train on; lower "
                    "data.val_fraction or set data.val_split")
  return splits.held_out(n, fraction, VAL_SEED, groups)


def resolve_classes(source: Source, classes) -> np.ndarray:
  """Class names (str) or indices (int) → int32 labels, checked against the source."""
  if isinstance(classes, (str, int, np.integer)):
    classes = (classes,)
  names = list(source.class_names)
  labels = []
  for c in classes:
    if isinstance(c, str) and c in names:
      labels.append(names.index(c))
    elif (isinstance(c, (int, np.integer)) and not isinstance(c, bool)
          and 0 <= c < len(names)):
      labels.append(int(c))
    else:
      raise ConfigError(f"unknown class {c!r} for {source.name}: valid class names are "
                        f"{names} (or indices 0..{len(names) - 1}); check "
                        "data.normal_classes / data.anomalous_classes")
  return np.asarray(labels, np.int32)


def _config_splits(data, split: str) -> list[str]:
  """`split` and the split names the config uses (for class names shared by splits)."""
  names = [split] + [data.get(f"{r}_split", "") for r in ROLES]
  return list(dict.fromkeys(n for n in names if n))


def _split_hint(key: str) -> str:
  hint = f"check {key}"
  if key == "data.val_split":
    hint += (", or set data.val_split='' and data.val_fraction > 0 to hold out part "
             "of the train split")
  return hint


def _sub(template: str, split: str) -> str:
  return template.replace("{split}", split)


# ----------------------------------------------------------------------------------
# Pixels: decoding, dtypes, masks.


def decode_image(path: str) -> np.ndarray:
  """Decodes an image file to H×W×C in its stored dtype (uint8, uint16 or float32)."""
  try:
    with Image.open(path) as im:
      return _pil_to_array(im, path)
  except DataError:
    raise
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise DataError(f"cannot decode image {path} ({e}); remove or replace the "
                    "file") from None


def _pil_to_array(im: Image.Image, path: str) -> np.ndarray:
  """Grayscale stays 1 channel and 16-bit stays uint16; alpha is dropped."""
  mode = im.mode
  if mode.startswith("I;16"):
    return np.asarray(im).astype(np.uint16)[..., None]
  if mode == "I":
    x = np.asarray(im)
    if x.size and (x.min() < 0 or x.max() > 65535):
      raise DataError(f"image {path} is 32-bit integer with values in [{x.min()}, "
                      f"{x.max()}], outside 0..65535: save it as 16-bit or float32")
    return x.astype(np.uint16)[..., None]
  if mode == "F":
    return np.asarray(im, np.float32)[..., None]
  if mode in ("1", "L", "LA", "La"):
    return np.asarray(im.convert("L"), np.uint8)[..., None]
  return np.asarray(im.convert("RGB"), np.uint8)  # RGB, RGBA, P, CMYK, YCbCr, ...


def _binary_mask(mask: np.ndarray, spatial_ndim: int) -> np.ndarray:
  """Any nonzero pixel (in any channel) → 1; returns uint8 spatial×1."""
  mask = np.asarray(mask)
  if mask.ndim == spatial_ndim + 1:
    mask = np.any(mask != 0, axis=-1)
  return (mask != 0).astype(np.uint8)[..., None]


def _read_mask(path: str, image: np.ndarray, image_name: str) -> np.ndarray:
  mask = _binary_mask(decode_image(path), 2)
  if mask.shape[:2] != image.shape[:2]:
    raise DataError(f"mask {path} is {mask.shape[0]}×{mask.shape[1]} but image "
                    f"{image_name} is {image.shape[0]}×{image.shape[1]}: masks must "
                    "match their image's size")
  return mask


def _standard_dtype(images: np.ndarray, what: str) -> np.ndarray:
  """In-memory pixel arrays → uint8, uint16 or float32 (integers by their range)."""
  value_range = lambda: (images.min().item(), images.max().item()) if images.size else (0, 0)
  return _as_pixels(images, _pixel_dtype(images.dtype, value_range, what))


def _pixel_dtype(dtype, value_range: Callable[[], tuple], what: str, *,
                 by_width: bool = False) -> np.dtype:
  """The dtype pixels are served in: uint8, uint16 or float32.

  Other integers go by the range of the whole array (so every image of it maps its
  intensities the same way), or with `by_width` (one file of many) by their width: 8
  bits → uint8, wider → uint16, after checking the values fit. `value_range()` gives
  (min, max) and is called only for integer dtypes other than uint8 and uint16.
  """
  dtype = np.dtype(dtype)
  if dtype == np.bool_ or (dtype.kind == "u" and dtype.itemsize == 1):
    return np.dtype(np.uint8)
  if dtype.kind == "u" and dtype.itemsize == 2:
    return np.dtype(np.uint16)
  if dtype.kind == "f":
    return np.dtype(np.float32)
  if dtype.kind in "iu":
    lo, hi = value_range()
    if by_width and lo >= 0 and hi <= (255 if dtype.itemsize == 1 else 65535):
      return np.dtype(np.uint8 if dtype.itemsize == 1 else np.uint16)
    if not by_width and lo >= 0 and hi <= 255:
      return np.dtype(np.uint8)
    if lo >= 0 and hi <= 65535:
      return np.dtype(np.uint16)
    raise DataError(f"{what} has {dtype} pixels in [{lo}, {hi}], outside 0..65535: "
                    "store them as uint16, or as float32 in [0, 1] (e.g. after a CT "
                    "window)")
  raise DataError(f"{what} has unsupported pixel dtype {dtype}: store uint8, uint16 "
                  "or float32 pixels")


def _as_pixels(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
  """`x` in the dtype `_pixel_dtype` chose; booleans become 0 / 255."""
  if x.dtype == np.bool_:
    return x.astype(np.uint8) * np.uint8(255)
  return x.astype(dtype, copy=False)


def _ids(split: str, n: int) -> np.ndarray:
  return np.asarray([f"{split}/{i}" for i in range(n)], dtype=str)


def _str_array(values: Sequence[str]) -> np.ndarray:
  return np.asarray(list(values), dtype=str) if len(values) else np.zeros(0, dtype=str)


# ----------------------------------------------------------------------------------
# tfds.


def _tfds_source(data, split: str, key: str) -> Source:
  """A TensorFlow Datasets split, decoded into memory once.

  Fine for MNIST-scale image-classification sets (the whole split is held as one
  array); larger datasets should be exported to a folder or an npz file.
  """
  import tensorflow_datasets as tfds  # slow import: only when used

  name, data_dir = data.get("name", ""), data.get("data_dir", "") or None
  image_key, label_key = data.get("image_key", "image"), data.get("label_key", "label")
  builder = _tfds_builder(tfds, name, data_dir)
  known = list(builder.info.splits)
  unknown = [s for s in _tfds_split_bases(split) if s != "all" and s not in known]
  if known and unknown:
    raise DataError(f"tfds dataset {name!r} has no split {unknown[0]!r} (in {split!r}); "
                    f"its splits are {known}: {_split_hint(key)}")
  features = builder.info.features
  for k, what in ((image_key, "data.image_key"), (label_key, "data.label_key")):
    if k not in features:
      raise DataError(f"tfds dataset {name!r} has no feature {k!r}; its features are "
                      f"{sorted(features.keys())}: set {what}")
  try:
    ds = builder.as_dataset(split=split, shuffle_files=False)
  except Exception as e:
    raise DataError(f"cannot read split {split!r} of tfds dataset {name!r} "
                    f"({_first_line(e)}); splits: {known}: {_split_hint(key)}") from None
  images, labels, spatial_ndim = _tfds_arrays(tfds, ds, image_key, label_key, name)
  label_feature = features[label_key]
  if hasattr(label_feature, "names"):
    class_names = tuple(label_feature.names)
  else:
    class_names = tuple(str(i) for i in range(int(labels.max(initial=-1)) + 1))
  return Source(
      name=f"tfds:{name}[{split}]", class_names=class_names, labels=labels,
      ids=_ids(split, len(labels)), groups=None, has_masks=False,
      spatial_ndim=spatial_ndim, reader=lambda i: (images[i], None))


def _tfds_builder(tfds, name: str, data_dir: str | None):
  """The prepared builder for `name`, downloading it if tfds can."""
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:
    raise DataError(
        f"unknown tfds dataset {name!r} (tfds.builder({name!r}) failed: "
        f"{_first_line(e)}): check data.name (`tfds.list_builders()` lists the names); "
        f"run `tfds build {name}` or set data.data_dir to a folder holding it") from None
  try:
    builder.download_and_prepare()
  except Exception as e:
    raise DataError(
        f"cannot download or prepare tfds dataset {name!r} into "
        f"{data_dir or 'the default tfds data_dir'} ({_first_line(e)}): run "
        f"`tfds build {name}` where there is internet access and set data.data_dir "
        "to the folder it wrote") from None
  return builder


def _tfds_split_bases(split: str) -> list[str]:
  """'train[:90%]+test' → ['train', 'test']."""
  return [re.sub(r"\[.*\]$", "", s).strip() for s in split.split("+")]


def _tfds_arrays(tfds, ds, image_key: str, label_key: str, name: str):
  """Images (one array, or a list if sizes vary), int32 labels and spatial_ndim.

  Batches of 4096 rather than tfds's batch_size=-1, which needs the split size in the
  dataset info (absent under tfds.testing.mock_data, where it crashes).
  """
  spec = ds.element_spec[image_key]
  rank = spec.shape.rank
  if rank not in (2, 3, 4):
    raise DataError(f"tfds dataset {name!r}: feature {image_key!r} has rank {rank}; "
                    "expected H×W, H×W×C or D×H×W×C: check data.image_key")
  ds = ds.map(lambda ex: (ex[image_key], ex[label_key]))
  if spec.shape.is_fully_defined():
    parts = list(tfds.as_numpy(ds.batch(4096)))
    images = (np.concatenate([p[0] for p in parts]) if parts
              else np.zeros((0, *spec.shape), spec.dtype.as_numpy_dtype))
    labels = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0)
  else:
    pairs = list(tfds.as_numpy(ds))
    images, labels = [p[0] for p in pairs], np.asarray([p[1] for p in pairs])
  what = f"tfds dataset {name!r}"
  if isinstance(images, list):
    images = [_tfds_image(_standard_dtype(x, what), rank) for x in images]
  else:
    images = _tfds_image(_standard_dtype(images, what), rank)
  return images, labels.astype(np.int32).reshape(-1), 2 if rank < 4 else 3


def _tfds_image(x: np.ndarray, rank: int) -> np.ndarray:
  """Adds the channel axis of H×W images and drops alpha (works batched too)."""
  if rank == 2:
    return x[..., None]
  if rank == 3 and x.shape[-1] == 4:
    return x[..., :3]  # drop alpha
  return x


def _first_line(e: Exception) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__


# ----------------------------------------------------------------------------------
# folder: ROOT/<split>/<class>/*.png, masks in ROOT/<split>/masks/<class>/.


def _folder_source(data, split: str, key: str) -> Source:
  """An image folder, Kermany OCT2017 layout: ROOT/<split>/<class>/*.{png,jpg,tif,...}.

  Class names are the sorted class folders of every split the config names, so a label
  means the same class in each split. When ROOT/<split>/masks/ exists, masks are read
  from masks/<class>/<image stem>.<ext>, and an image without one gets an all-zero mask
  (a healthy image has no lesion).
  """
  root = data.get("path", "")
  split_dir = os.path.join(root, split)
  if not os.path.isdir(split_dir):
    if not os.path.isdir(root):
      raise DataError(f"image folder {root!r} does not exist: check data.path")
    present = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    raise DataError(f"split folder {split_dir} does not exist (splits under {root}: "
                    f"{present}): {_split_hint(key)}")
  class_names = _folder_classes(root, _config_splits(data, split))
  masks_dir = os.path.join(split_dir, MASKS_FOLDER)
  has_masks = os.path.isdir(masks_dir)
  paths, ids, labels, mask_paths = [], [], [], []
  for label, cls in enumerate(class_names):
    masks = _image_files(os.path.join(masks_dir, cls)) if has_masks else []
    mask_by_stem = {os.path.splitext(m)[0]: m for m in masks}
    for f in _image_files(os.path.join(split_dir, cls)):
      paths.append(os.path.join(split_dir, cls, f))
      ids.append(f"{cls}/{f}")
      labels.append(label)
      mask = mask_by_stem.get(os.path.splitext(f)[0])
      mask_paths.append(None if mask is None else os.path.join(masks_dir, cls, mask))
  if not paths:
    raise DataError(f"no images found under {split_dir}/<class>/ (looked for "
                    f"{', '.join('*' + e for e in IMAGE_EXTS)} in class folders "
                    f"{list(class_names)}): check data.path")

  def reader(i):
    image = decode_image(paths[i])
    if not has_masks:
      return image, None
    if mask_paths[i] is None:
      return image, np.zeros(image.shape[:-1] + (1,), np.uint8)
    return image, _read_mask(mask_paths[i], image, paths[i])

  return Source(
      name=f"folder:{root}[{split}]", class_names=class_names,
      labels=np.asarray(labels, np.int32), ids=_str_array(ids), groups=None,
      has_masks=has_masks, spatial_ndim=2, reader=reader, from_files=True)


def _folder_classes(root: str, splits: list[str]) -> tuple[str, ...]:
  """Sorted class folders over the given split folders (those that exist)."""
  classes = set()
  for split in splits:
    split_dir = os.path.join(root, split)
    if os.path.isdir(split_dir):
      classes.update(d for d in os.listdir(split_dir)
                     if d != MASKS_FOLDER and not d.startswith(".")
                     and os.path.isdir(os.path.join(split_dir, d)))
  if not classes:
    raise DataError(f"no class folders under {os.path.join(root, splits[0])} (expected "
                    f"{os.path.join(root, splits[0], '<class>', '*.png')}): check "
                    "data.path")
  return tuple(sorted(classes))


def _image_files(folder: str) -> list[str]:
  """Sorted image file names in `folder` (extensions case-insensitive), [] if none."""
  if not os.path.isdir(folder):
    return []
  return sorted(f for f in os.listdir(folder)
                if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTS
                and os.path.isfile(os.path.join(folder, f)))


# ----------------------------------------------------------------------------------
# nifti: ROOT/<split>/<class>/*.nii[.gz], masks in ROOT/<split>/masks/<class>/.

NIFTI_EXTS = (".nii", ".nii.gz")


def _nifti_files(folder: str) -> list[str]:
  if not os.path.isdir(folder):
    return []
  return sorted(f for f in os.listdir(folder) if not f.startswith(".")
                and f.lower().endswith(NIFTI_EXTS) and os.path.isfile(os.path.join(folder, f)))


def _nifti_stem(name: str) -> str:
  return name[:-len(".nii.gz")] if name.lower().endswith(".nii.gz") else name[:-len(".nii")]


def read_nifti(path: str) -> np.ndarray:
  """A NIfTI volume as D×H×W×1 in its stored dtype (uint8, uint16 or float32).

  The file's (x, y, z) axes are reversed to (z, y, x) = D×H×W, so slicing D gives the
  axial slices of an RAS-oriented brain MRI; a trailing axis of length 1 (x, y, z, 1)
  is dropped. Intensity scaling in the header (scl_slope) gives float32. Integer
  volumes are served by their stored width, not their values (int16 → uint16 even for a
  dark scan whose values fit in uint8), so every file of a dataset maps intensities to
  [-1, 1] the same way.
  """
  try:
    import nibabel  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ConfigError("data.source='nifti' needs nibabel: pip install 'jaxad[nifti]' "
                      "(or pip install nibabel)") from None
  try:
    volume = np.asanyarray(nibabel.load(path).dataobj)
  except Exception as e:  # nibabel raises many kinds on a corrupt file
    raise DataError(f"cannot read NIfTI volume {path} ({_first_line(e)}); remove or "
                    "replace the file") from None
  while volume.ndim > 3 and volume.shape[-1] == 1:  # (x, y, z, 1), as some tools save
    volume = volume[..., 0]
  if volume.ndim != 3:
    raise DataError(f"NIfTI file {path} has shape {volume.shape}: one 3-D volume per "
                    "file is expected (split 4-D series into one file per volume)")
  volume = np.ascontiguousarray(volume.transpose(2, 1, 0))
  value_range = lambda: (volume.min().item(), volume.max().item()) if volume.size else (0, 0)
  dtype = _pixel_dtype(volume.dtype, value_range, f"NIfTI file {path}", by_width=True)
  return _as_pixels(volume, dtype)[..., None]


def _nifti_source(data, split: str, key: str) -> Source:
  """A folder of NIfTI volumes, ROOT/<split>/<class>/*.nii[.gz], as brain-MRI users keep
  them; optional masks ROOT/<split>/masks/<class>/<same stem>.nii[.gz] (a volume
  without one gets an all-zero mask)."""
  root = data.get("path", "")
  split_dir = os.path.join(root, split)
  if not os.path.isdir(split_dir):
    if not os.path.isdir(root):
      raise DataError(f"NIfTI folder {root!r} does not exist: check data.path")
    raise DataError(f"split folder {split_dir} does not exist: {_split_hint(key)}")
  class_names = _folder_classes(root, _config_splits(data, split))
  masks_dir = os.path.join(split_dir, MASKS_FOLDER)
  has_masks = os.path.isdir(masks_dir)
  paths, ids, labels, mask_paths = [], [], [], []
  for label, cls in enumerate(class_names):
    mask_by_stem = {_nifti_stem(m): m for m in _nifti_files(os.path.join(masks_dir, cls))}
    for f in _nifti_files(os.path.join(split_dir, cls)):
      paths.append(os.path.join(split_dir, cls, f))
      ids.append(f"{cls}/{f}")
      labels.append(label)
      mask = mask_by_stem.get(_nifti_stem(f))
      mask_paths.append(None if mask is None else os.path.join(masks_dir, cls, mask))
  if not paths:
    raise DataError(f"no NIfTI volumes found under {split_dir}/<class>/ (looked for "
                    f"*.nii and *.nii.gz in class folders {list(class_names)}): check "
                    "data.path")

  def reader(i):
    volume = read_nifti(paths[i])
    if not has_masks:
      return volume, None
    if mask_paths[i] is None:
      return volume, np.zeros(volume.shape[:-1] + (1,), np.uint8)
    mask = _binary_mask(read_nifti(mask_paths[i])[..., 0], 3)
    if mask.shape[:3] != volume.shape[:3]:
      raise DataError(f"mask {mask_paths[i]} is {mask.shape[:3]} but volume {paths[i]} "
                      f"is {volume.shape[:3]}: masks must match their volume")
    return volume, mask

  return Source(
      name=f"nifti:{root}[{split}]", class_names=class_names,
      labels=np.asarray(labels, np.int32), ids=_str_array(ids), groups=None,
      has_masks=has_masks, spatial_ndim=3, reader=reader, from_files=True)


# ----------------------------------------------------------------------------------
# csv: ISIC 2018 ground-truth tables.


def _csv_source(data, split: str, key: str) -> Source:
  """A CSV of image ids and labels, ISIC 2018 Task 3 layout `image,MEL,NV,...`.

  Labels are one-hot class columns (every column but the id and group columns), or the
  class names in data.label_column. Images are data.image_dir/<id><data.image_ext>;
  with data.mask_dir, the mask of id X is X_segmentation.png or X.png there, and an
  image without one gets an all-zero mask.
  """
  path = _sub(data.get("path", ""), split)
  header, rows = _read_csv(path, key)
  id_col = data.get("id_column", "image") or "image"
  label_col = data.get("label_column", "") or ""
  group_col = data.get("group_column", "") or ""
  for col, what in ((id_col, "data.id_column"), (label_col, "data.label_column"),
                    (group_col, "data.group_column")):
    if col and col not in header:
      raise DataError(f"{path} has no column {col!r}; its columns are {header}: set "
                      f"{what} to one of them")
  column = {c: header.index(c) for c in header}
  if label_col:
    class_names = _csv_class_names(data, split, label_col)
    labels = [class_names.index(r[column[label_col]].strip()) for _, r in rows]
  else:
    class_names = tuple(c for c in header if c not in (id_col, group_col))
    if not class_names:
      raise DataError(f"{path} has no class columns besides {id_col!r}: add one-hot "
                      "class columns or set data.label_column")
    cols = [column[c] for c in class_names]
    labels = [_one_hot_label(r, cols, f"{path} line {line} ({r[column[id_col]]!r})")
              for line, r in rows]
  image_dir = _sub(data.get("image_dir", "") or "", split) or os.path.dirname(path)
  ids = [_with_ext(r[column[id_col]].strip(), data.get("image_ext", ".jpg"))
         for _, r in rows]
  paths = [os.path.join(image_dir, i) for i in ids]
  _check_exist(paths, path, image_dir)
  mask_dir = _sub(data.get("mask_dir", "") or "", split)
  mask_paths = _csv_masks(mask_dir, ids) if mask_dir else None

  def reader(i):
    image = decode_image(paths[i])
    if mask_paths is None:
      return image, None
    if mask_paths[i] is None:
      return image, np.zeros(image.shape[:-1] + (1,), np.uint8)
    return image, _read_mask(mask_paths[i], image, paths[i])

  groups = None
  if group_col:
    groups = _str_array([r[column[group_col]].strip() for _, r in rows])
  return Source(
      name=f"csv:{path}", class_names=class_names, labels=np.asarray(labels, np.int32),
      ids=_str_array(ids), groups=groups, has_masks=mask_paths is not None,
      spatial_ndim=2, reader=reader, from_files=True)


def _read_csv(path: str, key: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
  """The header and the (line number, cells) of every non-empty row."""
  if not os.path.isfile(path):
    raise DataError(f"CSV file {path} not found: check data.path (it may contain "
                    f"{{split}}, filled from {key}); {_split_hint(key)}")
  with open(path, newline="", encoding="utf-8-sig") as f:
    lines = list(csv.reader(f))
  if not lines:
    raise DataError(f"CSV file {path} is empty: it needs a header row and one row per "
                    "image")
  header = [c.strip() for c in lines[0]]
  rows = [(n, r) for n, r in enumerate(lines[1:], start=2) if any(c.strip() for c in r)]
  for n, r in rows:
    if len(r) != len(header):
      raise DataError(f"{path} line {n} has {len(r)} cells but the header has "
                      f"{len(header)}: fix the row")
  return header, rows


def _one_hot_label(row: list[str], cols: list[int], where: str) -> int:
  """The index of the single 1 among the class cells (0/1 or 0.0/1.0)."""
  try:
    values = [float(row[c]) for c in cols]
  except ValueError:
    values = []
  ones = [k for k, v in enumerate(values) if v == 1.0]
  if len(ones) != 1 or any(v not in (0.0, 1.0) for v in values):
    raise DataError(f"{where} is not one-hot (class cells "
                    f"{[row[c] for c in cols]}): each row needs exactly one 1 and 0 "
                    "elsewhere, or set data.label_column")
  return ones[0]


def _csv_class_names(data, split: str, label_col: str) -> tuple[str, ...]:
  """Sorted label values over every split's CSV, so labels agree across splits."""
  template = data.get("path", "")
  splits = _config_splits(data, split) if "{split}" in template else [split]
  names = set()
  for s in splits:
    path = _sub(template, s)
    if os.path.isfile(path):
      header, rows = _read_csv(path, "")
      if label_col in header:
        c = header.index(label_col)
        names.update(r[c].strip() for _, r in rows)
  return tuple(sorted(names))


def _with_ext(image_id: str, ext: str) -> str:
  if os.path.splitext(image_id)[1].lower() in IMAGE_EXTS:
    return image_id
  return image_id + (ext if ext.startswith(".") or not ext else "." + ext)


def _check_exist(paths: list[str], csv_path: str, image_dir: str) -> None:
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise DataError(f"{len(missing)} of the {len(paths)} images listed in {csv_path} "
                    f"are missing, e.g. {missing[0]}: check data.image_dir "
                    f"({image_dir}) and data.image_ext")


def _csv_masks(mask_dir: str, ids: list[str]) -> list[str | None]:
  """The mask of id X: X_segmentation.png (ISIC task 1 naming) or X.png, else None."""
  if not os.path.isdir(mask_dir):
    raise DataError(f"mask folder {mask_dir} does not exist: check data.mask_dir")
  found = []
  for i in ids:
    stem = os.path.join(mask_dir, os.path.splitext(i)[0])
    found.append(next((p for p in (stem + "_segmentation.png", stem + ".png")
                       if os.path.isfile(p)), None))
  if ids and all(p is None for p in found):
    raise DataError(f"no masks found in {mask_dir} (looked for <id>_segmentation.png "
                    f"and <id>.png, e.g. {os.path.splitext(ids[0])[0]}.png): check "
                    "data.mask_dir")
  return found


# ----------------------------------------------------------------------------------
# npz: MedMNIST arrays.


def _npz_source(data, split: str, key: str) -> Source:
  """MedMNIST-style arrays `{split}_images`, `{split}_labels`, optional `{split}_masks`.

  Labels (any integer dtype, shape N or N×1, as MedMNIST's uint8 N×1) are loaded once;
  images and masks are read from disk one example at a time (`jaxad.data.npz`), so a
  large split costs no memory. Images are N×H×W, N×H×W×C (C in 1, 3, 4; alpha
  dropped), N×D×H×W or N×D×H×W×1; a 4-D array whose last axis is 1, 3 or 4 is taken
  as 2D with channels unless data.ndim says otherwise.
  """
  path = data.get("path", "")
  keys, labels_by_split, names = _npz_index(path)
  for k in (f"{split}_images", f"{split}_labels"):
    if k not in keys:
      raise DataError(f"{path} has no array {k!r} (its keys: {keys}): "
                      f"{_split_hint(key)}")
  name = f"npz:{path}[{split}]"
  images = npz_lib.NpzArray(path, f"{split}_images")
  spatial_ndim = _npz_spatial(images.shape, int(data.get("ndim", 0) or 0), name)
  read_image = _npz_reader(images, spatial_ndim, name)
  labels = _npz_labels(labels_by_split[split], len(images), name)
  masks = npz_lib.NpzArray(path, f"{split}_masks") if f"{split}_masks" in keys else None
  lead = 1 + spatial_ndim  # N and the spatial axes
  if masks is not None and masks.shape[:lead] != images.shape[:lead]:
    raise DataError(f"{name}: masks have shape {masks.shape} but images "
                    f"{images.shape}: {split}_masks must match {split}_images")
  max_label = max((_max_label(v) for v in labels_by_split.values()), default=-1)
  class_names = _npz_class_names(names, max_label, name)

  def reader(i):
    mask = None if masks is None else _binary_mask(masks[i], spatial_ndim)
    return read_image(i), mask

  return Source(
      name=name, class_names=class_names, labels=labels, ids=_ids(split, len(labels)),
      groups=None, has_masks=masks is not None, spatial_ndim=spatial_ndim, reader=reader)


def _npz_index(path: str) -> tuple[list[str], dict[str, np.ndarray], np.ndarray | None]:
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
  labels = {k[:-len("_labels")]: v for k, v in arrays.items() if k.endswith("_labels")}
  return keys, labels, arrays.get("class_names")


def _max_label(labels: np.ndarray) -> int:
  """The largest label, -1 when there is none (of any dtype: uint8 has no -1)."""
  return int(labels.max()) if labels.size else -1


def _npz_spatial(shape: tuple[int, ...], ndim: int, name: str) -> int:
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


def _npz_image(x: np.ndarray, spatial_ndim: int) -> np.ndarray:
  """One stored image → spatial×C: adds the channel axis where missing, drops alpha."""
  if x.ndim == spatial_ndim:
    return x[..., None]
  if spatial_ndim == 2 and x.shape[-1] == 4:
    return x[..., :3]
  return x


def _npz_reader(images: npz_lib.NpzArray, spatial_ndim: int, name: str) -> Callable:
  """i → image i in its pixel dtype (chosen once for the whole array)."""
  dtype = _pixel_dtype(images.dtype, images.value_range, name)
  return lambda i: _as_pixels(_npz_image(images[i], spatial_ndim), dtype)


def _npz_labels(labels: np.ndarray, n: int, name: str) -> np.ndarray:
  """Class indices of any integer (or integral float) dtype, shape N or N×1 → int32 N."""
  if labels.ndim == 2 and labels.shape[1] > 1:
    raise DataError(f"{name}: labels have shape {labels.shape}, i.e. multi-label; "
                    "multi-label data is not supported: convert to a single class "
                    "label per image (shape N or N×1)")
  labels = labels.reshape(-1) if labels.ndim <= 2 else labels
  if labels.ndim != 1 or len(labels) != n:
    raise DataError(f"{name}: {labels.shape} labels for {n} images: need one label "
                    "per image (shape N or N×1)")
  if labels.size and (labels.min() < 0 or np.any(labels != np.round(labels))):
    raise DataError(f"{name}: labels must be non-negative integers (class indices)")
  return labels.astype(np.int32)


def _npz_class_names(names, max_label: int, name: str) -> tuple[str, ...]:
  """class_names as stored, else "0".."max_label"; one name per label either way."""
  if names is None:
    return tuple(str(i) for i in range(max_label + 1))
  names = tuple(str(c) for c in np.asarray(names).reshape(-1))
  if len(names) <= max_label:
    raise DataError(f"{name}: {len(names)} class_names but labels go up to "
                    f"{max_label}: give one name per class")
  return names


# ----------------------------------------------------------------------------------
# digits: scikit-learn's 8×8 handwritten digits.

DIGITS_FRACTIONS = {"train": 0.6, "val": 0.2, "test": 0.2}


def _digits_source(data, split: str, key: str) -> Source:
  """scikit-learn's 1797 8×8 digits as uint8, split 60/20/20 per class with rng(0)."""
  if split not in DIGITS_FRACTIONS:
    raise DataError(f"the digits source has no split {split!r}; its splits are "
                    f"{list(DIGITS_FRACTIONS)}: {_split_hint(key)}")
  from sklearn.datasets import load_digits  # only when used
  digits = load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int32)
  indices = _digits_split(labels)[split]
  images, labels = images[indices], labels[indices]
  return Source(
      name=f"digits[{split}]", class_names=tuple(str(i) for i in range(10)),
      labels=labels, ids=_ids(split, len(labels)), groups=None, has_masks=False,
      spatial_ndim=2, reader=lambda i: (images[i], None))


def _digits_split(labels: np.ndarray) -> dict[str, np.ndarray]:
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


# ----------------------------------------------------------------------------------
# synthetic: smooth fields, bright elliptic lesions in the test split.

SYNTHETIC_SPLITS = ("train", "val", "test")


def _synthetic_source(data, split: str, key: str) -> Source:
  """Normal images are smooth fields in [0.05, 0.6]; anomalous test images add an
  ellipse of value ≥ 0.9 and a mask of exactly its pixels. Generated per index."""
  if split not in SYNTHETIC_SPLITS:
    raise DataError(f"the synthetic source has no split {split!r}; its splits are "
                    f"{list(SYNTHETIC_SPLITS)}: {_split_hint(key)}")
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
  return Source(
      name=f"synthetic[{split}]", class_names=("normal", "anomalous"), labels=labels,
      ids=_ids(split, n), groups=None, has_masks=True, spatial_ndim=2,
      reader=lambda i: _synthetic_example(split, i, size, channels, bool(labels[i])))


def _synthetic_example(split: str, index: int, size: int, channels: int,
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


_LOADERS = {
    "tfds": _tfds_source,
    "folder": _folder_source,
    "nifti": _nifti_source,
    "csv": _csv_source,
    "npz": _npz_source,
    "digits": _digits_source,
    "synthetic": _synthetic_source,
}


# ----------------------------------------------------------------------------------
# Unlabelled inputs for batch scoring.


def unlabeled_source(path: str, ndim: int = 0) -> Source:
  """Images to score with no labels: a folder (searched recursively) or an .npz file.

  A folder is read file by file and an .npz (its `images` array, or its only
  `*_images` array) row by row, so memory stays flat however many images they hold.
  Every image gets the class 'unlabeled', treated as normal.
  """
  if os.path.isdir(path):
    files = sorted(os.path.relpath(os.path.join(d, f), path)
                   for d, _, names in os.walk(path) for f in names
                   if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTS)
    if not files:
      raise DataError(f"no images under {path} (looked for "
                      f"{', '.join('*' + e for e in IMAGE_EXTS)}): check --input")
    reader = lambda i: (decode_image(os.path.join(path, files[i])), None)
    ids, spatial_ndim = files, 2
  elif path.endswith(".npz") and os.path.isfile(path):
    names = npz_lib.member_names(path)
    keys = [k for k in names if k == "images" or k.endswith("_images")]
    if len(keys) != 1:
      raise DataError(f"{path} must hold one image array named 'images' or "
                      f"'<split>_images' (its keys: {names}): check --input")
    images = npz_lib.NpzArray(path, keys[0])
    spatial_ndim = _npz_spatial(images.shape, ndim, f"npz:{path}")
    read = _npz_reader(images, spatial_ndim, f"npz:{path}")
    reader = lambda i: (read(i), None)
    ids = [f"{keys[0]}/{i}" for i in range(len(images))]
  else:
    raise DataError(f"--input={path!r} is neither a folder of images nor an .npz file")
  return Source(
      name=f"input:{path}", class_names=("unlabeled",), labels=np.zeros(len(ids), np.int32),
      ids=_str_array(ids), groups=None, has_masks=False, spatial_ndim=spatial_ndim,
      reader=reader, from_files=os.path.isdir(path))
