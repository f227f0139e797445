"""The `Source` every loader returns, and the split and class helpers loaders share.

A split is metadata in memory (labels, ids, groups) plus a reader that decodes one
example on demand. Split names, held-out validation examples and configured classes
are resolved here, once, so every source treats them the same way; so are the
labelled anomalies data.val_anomaly_fraction moves from the test split into
validation (`with_val_anomalies`, joined to it by `concatenate`).
"""

import dataclasses
import logging
import re
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from jaxad.data import splits
from jaxad.errors import ConfigError, DataError

log = logging.getLogger("jaxad")
ROLES = ("train", "val", "test")
VAL_SEED = 0  # the held-out validation set never depends on the training seed

Reader = Callable[[int], tuple[np.ndarray, np.ndarray | None]]
# () -> blocks (indices, images) that cover every example of an in-memory array once,
# images as `read` serves them (N×spatial×C, pixel dtype): for a vectorised pixel check.
Blocks = Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]
_INTEGER = re.compile(r"[+-]?[0-9]+")


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
  reader: Reader  # i -> (image, mask or None), see the package docstring
  from_files: bool = False  # one file per example (folder, nifti, csv): data.check_files
  blocks: Blocks | None = None  # in-memory arrays (npz): every image, in blocks

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
    reader, blocks = self.reader, None
    if self.blocks is not None:
      position = np.full(len(self), -1, np.int64)  # old index -> new index (or -1)
      position[indices] = np.arange(len(indices))
      parent_blocks = self.blocks

      def blocks():
        for old, images in parent_blocks():
          new = position[old]
          keep = new >= 0
          if keep.any():
            yield new[keep], images[keep]

    return dataclasses.replace(
        self, name=name or self.name, labels=self.labels[indices], ids=self.ids[indices],
        groups=None if self.groups is None else self.groups[indices],
        reader=lambda j: reader(int(indices[j])), blocks=blocks)


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


def concatenate(a: Source, b: Source, name: str) -> Source:
  """`a`'s examples then `b`'s as one Source (example i of `b` becomes len(a) + i).

  Both must be splits of one dataset: the same class names and spatial rank, groups in
  both or in neither. Masks are kept where both parts have them; the pixel-check
  blocks of either part are chained; file-backed if either part is.
  """
  if a.class_names != b.class_names or a.spatial_ndim != b.spatial_ndim:
    raise DataError(f"cannot join {a.name} (classes {list(a.class_names)}, "
                    f"{a.spatial_ndim}D) and {b.name} (classes {list(b.class_names)}, "
                    f"{b.spatial_ndim}D): their splits must come from one dataset")
  if (a.groups is None) != (b.groups is None):
    raise DataError(f"cannot join {a.name} and {b.name}: only one has groups "
                    "(data.group_column): give every split the group column")
  n, a_read, b_read = len(a), a.reader, b.reader
  parts = [(offset, p.blocks) for offset, p in ((0, a), (n, b)) if p.blocks is not None]

  def blocks():
    for offset, part in parts:
      for indices, images in part():
        yield indices + offset, images

  return Source(
      name=name, class_names=a.class_names,
      labels=np.concatenate([a.labels, b.labels]).astype(np.int32),
      ids=np.concatenate([a.ids, b.ids]),
      groups=None if a.groups is None else np.concatenate([a.groups, b.groups]),
      has_masks=a.has_masks and b.has_masks, spatial_ndim=a.spatial_ndim,
      reader=lambda i: a_read(i) if i < n else b_read(i - n),
      from_files=a.from_files or b.from_files, blocks=blocks if parts else None)


def with_val_anomalies(val: Source, load_test: Callable[[], Source], normal,
                       fraction: float, test_split: str) -> tuple[Source, Source | None]:
  """(validation, test) with labelled anomalies in validation (data.val_anomaly_fraction).

  A validation split that already has anomalous images is kept, and the test split is
  not loaded (None). Otherwise `splits.moved_anomalies` picks about `fraction` of the
  test split's anomalous images (whole patients where it has groups) with VAL_SEED;
  they join the validation split, their ids qualified by `test_split`, and leave the
  test split. No batch size or device count enters, so every caller gets the same two.
  """
  if not 0 < fraction < 1:
    raise ConfigError(f"data.val_anomaly_fraction={fraction} must be in [0, 1) (0 = off; "
                      "0.1–0.5 is usual)")
  val_anomalous = int(np.count_nonzero(~np.isin(val.labels, normal)))
  if val_anomalous:
    log.info("data.val_anomaly_fraction=%g: the validation split %s already has %d "
             "anomalous images of %d; none moved from the test split", fraction,
             val.name, val_anomalous, len(val))
    return val, None
  test = load_test()
  anomalous = ~np.isin(test.labels, normal)
  moved = splits.moved_anomalies(anomalous, fraction, VAL_SEED, test.groups)
  part = test.subset(moved)
  part = dataclasses.replace(part, ids=_qualified(part.ids, test_split))
  what = f"{int(anomalous[moved].sum())} of the {int(anomalous.sum())} anomalous images"
  if len(moved) > anomalous[moved].sum():
    what += f" (and the {int((~anomalous[moved]).sum())} normal images of their patients)"
  log.info("data.val_anomaly_fraction=%g: moved %s of %s into validation", fraction,
           what, test.name)
  return (concatenate(val, part, f"{val.name} + {len(moved)} from {test.name}"),
          test.subset(np.setdiff1d(np.arange(len(test)), moved),
                      f"{test.name} minus {len(moved)} moved to val"))


def _qualified(ids: np.ndarray, split: str) -> np.ndarray:
  """Ids that name their split: f"{split}/{id}" unless every id already starts so."""
  prefix = f"{split}/"
  if all(str(i).startswith(prefix) for i in ids):
    return ids
  return str_array([prefix + str(i) for i in ids])


def normal_labels(source: Source, normal_classes, anomalous_classes) -> np.ndarray:
  """data.normal_classes / data.anomalous_classes → the sorted normal label ints."""
  normal, anomalous = tuple(normal_classes), tuple(anomalous_classes)
  if normal == ("*",) and not anomalous:  # every class (a generic background dataset)
    return np.arange(len(source.class_names))
  if bool(normal) == bool(anomalous):
    raise ConfigError(
        "set exactly one of data.normal_classes and data.anomalous_classes "
        f"(got {normal!r} and {anomalous!r}); classes of {source.name}: "
        f"{list(source.class_names)}")
  if normal:
    return np.unique(resolve_classes(source, normal))
  all_labels = np.arange(len(source.class_names))
  return np.setdiff1d(all_labels, resolve_classes(source, anomalous))


def sorted_class_names(names) -> tuple[str, ...]:
  """Class names in label order: by integer value when every name is an integer
  ('0', '1', ..., '10', '11'), else by plain string order."""
  names = set(names)
  if names and all(_INTEGER.fullmatch(n) for n in names):
    return tuple(sorted(names, key=lambda n: (int(n), n)))
  return tuple(sorted(names))


def resolve_classes(source: Source, classes) -> np.ndarray:
  """Class selectors (data.normal_classes / anomalous_classes) → int32 labels.

  One rule for every source: a selector that is a class name selects that class,
  whether given as a str or an int (9 and '9' both select the class named '9'; an int
  also matches a zero-padded name such as '09'); any other int is an index into
  source.class_names. Sources that derive class names from the data (CSV label
  values, class folders) sort integer names by value (`sorted_class_names`), so with
  names '0'..'11' the index and the name agree as well.
  """
  if isinstance(classes, (str, int, np.integer)):
    classes = (classes,)
  names = list(source.class_names)
  labels = []
  for c in classes:
    is_int = isinstance(c, (int, np.integer)) and not isinstance(c, bool)
    if isinstance(c, str) and c in names:
      labels.append(names.index(c))
      continue
    if is_int:
      named = [k for k, n in enumerate(names) if _INTEGER.fullmatch(n) and int(n) == c]
      if len(named) > 1:
        raise ConfigError(f"class {c!r} is ambiguous for {source.name}: classes "
                          f"{[names[k] for k in named]} all read as {c}; give the "
                          "class name as a string in data.normal_classes / "
                          "data.anomalous_classes")
      if named:
        labels.append(named[0])
        continue
      if 0 <= c < len(names):
        labels.append(int(c))
        continue
    raise ConfigError(f"unknown class {c!r} for {source.name}: valid class names are "
                      f"{names} (or indices 0..{len(names) - 1}); check "
                      "data.normal_classes / data.anomalous_classes")
  return np.asarray(labels, np.int32)


def config_splits(data, split: str) -> list[str]:
  """`split` and the split names the config uses (for class names shared by splits)."""
  names = [split] + [data.get(f"{r}_split", "") for r in ROLES]
  return list(dict.fromkeys(n for n in names if n))


def split_hint(key: str) -> str:
  """What to check when the split `key` (e.g. 'data.val_split') names is missing."""
  hint = f"check {key}"
  if key == "data.val_split":
    hint += (", or set data.val_split='' and data.val_fraction > 0 to hold out part "
             "of the train split")
  return hint


def fill_split(template: str, split: str) -> str:
  """`template` with '{split}' replaced by the split name."""
  return template.replace("{split}", split)


def example_ids(split: str, n: int) -> np.ndarray:
  """Ids of in-memory examples: f"{split}/{i}"."""
  return np.asarray([f"{split}/{i}" for i in range(n)], dtype=str)


def str_array(values: Sequence[str]) -> np.ndarray:
  return np.asarray(list(values), dtype=str) if len(values) else np.zeros(0, dtype=str)


def first_line(e: Exception) -> str:
  """The first line of an exception's message (its type name when empty)."""
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__
