"""The class-folder walk the folder and NIfTI sources share: ROOT/<split>/<class>/<file>.

Both keep one file per example in class folders under each split, with optional masks
in ROOT/<split>/masks/<class>/ matched by file stem. One walk means both find the same
files in the same order and number classes the same way; a `Layout` says which files
count and how errors name them.
"""

import dataclasses
import os
from collections.abc import Callable

import numpy as np

from jaxad.data.sources import base, pixels
from jaxad.errors import DataError

MASKS_FOLDER = "masks"  # ROOT/<split>/masks/<class>/<stem>.<ext>


@dataclasses.dataclass(frozen=True)
class Layout:
  """Which files a walk takes, and the words its errors use."""
  root_name: str  # the root in errors, e.g. "image folder"
  items: str  # the examples in errors, e.g. "images"
  looked_for: str  # the file patterns in errors, e.g. "*.nii and *.nii.gz"
  matches: Callable[[str], bool]  # file name → is an example (or mask) file
  stem: Callable[[str], str]  # file name → the part an image and its mask share
  list_splits: bool = False  # a missing split's error lists the split folders present


@dataclasses.dataclass(frozen=True)
class Found:
  """The files of one split, in label order then by file name."""
  class_names: tuple[str, ...]  # class folders of every configured split, sorted
  paths: list[str]  # ROOT/<split>/<class>/<file>
  ids: list[str]  # <class>/<file>
  labels: np.ndarray  # int32: the index of the class folder in class_names
  mask_paths: list[str | None] | None  # None: the split has no masks folder


def find(data, split: str, key: str, layout: Layout) -> Found:
  """The example files of `split` under data.path; a DataError naming the fix if none."""
  root = data.get("path", "")
  split_dir = _split_dir(root, split, key, layout)
  class_names = _class_names(root, base.config_splits(data, split))
  masks_dir = os.path.join(split_dir, MASKS_FOLDER)
  has_masks = os.path.isdir(masks_dir)
  paths, ids, labels, mask_paths = [], [], [], []
  for label, cls in enumerate(class_names):
    masks = _files(os.path.join(masks_dir, cls), layout) if has_masks else []
    mask_by_stem = {layout.stem(m): m for m in masks}
    for f in _files(os.path.join(split_dir, cls), layout):
      paths.append(os.path.join(split_dir, cls, f))
      ids.append(f"{cls}/{f}")
      labels.append(label)
      mask = mask_by_stem.get(layout.stem(f))
      mask_paths.append(None if mask is None else os.path.join(masks_dir, cls, mask))
  if not paths:
    raise DataError(f"no {layout.items} found under {split_dir}/<class>/ (looked for "
                    f"{layout.looked_for} in class folders {list(class_names)}): check "
                    "data.path")
  return Found(class_names=class_names, paths=paths, ids=ids,
               labels=np.asarray(labels, np.int32),
               mask_paths=mask_paths if has_masks else None)


def load(data, split: str, key: str, layout: Layout, kind: str, spatial_ndim: int,
         read: Callable, read_mask: Callable) -> base.Source:
  """The Source of a walked folder: `read(path)` each example, `read_mask(path, image,
  image_path)` its mask (an all-zero one where it has none)."""
  found = find(data, split, key, layout)
  return base.Source(
      name=f"{kind}:{data.get('path', '')}[{split}]", class_names=found.class_names,
      labels=found.labels, ids=base.str_array(found.ids), groups=None,
      has_masks=found.mask_paths is not None, spatial_ndim=spatial_ndim,
      reader=pixels.file_reader(found.paths, found.mask_paths, read, read_mask),
      from_files=True)


def _split_dir(root: str, split: str, key: str, layout: Layout) -> str:
  """ROOT/<split>, checked to exist."""
  split_dir = os.path.join(root, split)
  if os.path.isdir(split_dir):
    return split_dir
  if not os.path.isdir(root):
    raise DataError(f"{layout.root_name} {root!r} does not exist: check data.path")
  present = ""
  if layout.list_splits:
    names = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    present = f" (splits under {root}: {names})"
  raise DataError(f"split folder {split_dir} does not exist{present}: "
                  f"{base.split_hint(key)}")


def _class_names(root: str, splits: list[str]) -> tuple[str, ...]:
  """The class folders of the given split folders (those that exist), sorted
  (`base.sorted_class_names`: by value when every name is an integer)."""
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
  return base.sorted_class_names(classes)


def _files(folder: str, layout: Layout) -> list[str]:
  """Sorted names of the non-hidden files in `folder` the layout takes, [] if none."""
  if not os.path.isdir(folder):
    return []
  return sorted(f for f in os.listdir(folder)
                if not f.startswith(".") and layout.matches(f)
                and os.path.isfile(os.path.join(folder, f)))
