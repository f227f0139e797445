"""The csv source: image ids and labels in a table, ISIC 2018 Task 3's `image,MEL,...`.

Labels are one-hot class columns (every column but the id and group columns), or the
class names in data.label_column (sorted over every split's CSV, by value when all are
integers). Images are data.image_dir/<id><data.image_ext>, ids relative to it (an
absolute id or one with '..' is refused); with data.mask_dir, the mask of id X is
X_segmentation.png or X.png there, and an image without one gets an all-zero mask.
data.path, data.image_dir and data.mask_dir may contain '{split}'.
"""

import csv
import os

import numpy as np

from jaxad.data.sources import base, pixels
from jaxad.errors import DataError


def load(data, split: str, key: str) -> base.Source:
  """The rows of the CSV at data.path ('{split}' filled in) as 2D images."""
  path = base.fill_split(data.get("path", ""), split)
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
    class_names = _class_names(data, split, label_col)
    labels = [class_names.index(r[column[label_col]].strip()) for _, r in rows]
  else:
    class_names = tuple(c for c in header if c not in (id_col, group_col))
    if not class_names:
      raise DataError(f"{path} has no class columns besides {id_col!r}: add one-hot "
                      "class columns or set data.label_column")
    cols = [column[c] for c in class_names]
    labels = [_one_hot_label(r, cols, f"{path} line {line} ({r[column[id_col]]!r})")
              for line, r in rows]
  image_dir = (base.fill_split(data.get("image_dir", "") or "", split)
               or os.path.dirname(path))
  ids = [_with_ext(_checked_id(r[column[id_col]].strip(), path, line, id_col),
                   data.get("image_ext", ".jpg")) for line, r in rows]
  paths = [os.path.join(image_dir, i) for i in ids]
  _check_exist(paths, path, image_dir)
  mask_dir = base.fill_split(data.get("mask_dir", "") or "", split)
  mask_paths = _masks(mask_dir, ids) if mask_dir else None
  groups = None
  if group_col:
    groups = base.str_array([r[column[group_col]].strip() for _, r in rows])
  return base.Source(
      name=f"csv:{path}", class_names=class_names, labels=np.asarray(labels, np.int32),
      ids=base.str_array(ids), groups=groups, has_masks=mask_paths is not None,
      spatial_ndim=2, from_files=True,
      reader=pixels.file_reader(paths, mask_paths, pixels.decode_image, pixels.read_mask))


def _read_csv(path: str, key: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
  """The header and the (line number, cells) of every non-empty row."""
  if not os.path.isfile(path):
    raise DataError(f"CSV file {path} not found: check data.path (it may contain "
                    f"{{split}}, filled from {key}); {base.split_hint(key)}")
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


def _class_names(data, split: str, label_col: str) -> tuple[str, ...]:
  """The label values of every split's CSV, sorted (`base.sorted_class_names`: by
  value when all are integers), so labels agree across splits."""
  template = data.get("path", "")
  splits = base.config_splits(data, split) if "{split}" in template else [split]
  names = set()
  for s in splits:
    path = base.fill_split(template, s)
    if os.path.isfile(path):
      header, rows = _read_csv(path, "")
      if label_col in header:
        c = header.index(label_col)
        names.update(r[c].strip() for _, r in rows)
  return base.sorted_class_names(names)


def _checked_id(image_id: str, path: str, line: int, id_col: str) -> str:
  """`image_id`, checked to name a file inside data.image_dir (not absolute, no '..'
  component), so a CSV never makes the source read files outside the data folder."""
  parts = image_id.replace("\\", "/").split("/")
  absolute = os.path.isabs(image_id) or parts[0] == "" or image_id[1:2] == ":"
  if image_id and (absolute or ".." in parts):
    raise DataError(f"{path} line {line}: image id {image_id!r} (column {id_col!r}) "
                    "points outside data.image_dir: give ids relative to "
                    f"data.image_dir without '..' (e.g. {parts[-1]!r})")
  return image_id


def _with_ext(image_id: str, ext: str) -> str:
  if os.path.splitext(image_id)[1].lower() in pixels.IMAGE_EXTS:
    return image_id
  return image_id + (ext if ext.startswith(".") or not ext else "." + ext)


def _check_exist(paths: list[str], csv_path: str, image_dir: str) -> None:
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise DataError(f"{len(missing)} of the {len(paths)} images listed in {csv_path} "
                    f"are missing, e.g. {missing[0]}: check data.image_dir "
                    f"({image_dir}) and data.image_ext")


def _masks(mask_dir: str, ids: list[str]) -> list[str | None]:
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
