"""Data sources by name: the table `data.source` picks from, and `get_source`.

A loader is `load(data, split, key) -> Source`: `split` is the split's name and `key`
the config key that named it (for error hints). jaxad.config validates data.source
against NAMES, so a new source is one module and one line in LOADERS.
"""

import ml_collections
import numpy as np

from jaxad.data.sources import (base, csv_table, digits, folder, nifti, npz_arrays,
                                synthetic, tfds)
from jaxad.errors import ConfigError

LOADERS = {
    "tfds": tfds.load,
    "folder": folder.load,
    "nifti": nifti.load,
    "csv": csv_table.load,
    "npz": npz_arrays.load,
    "digits": digits.load,
    "synthetic": synthetic.load,
}
NAMES = tuple(LOADERS)


def get_source(data: ml_collections.ConfigDict, role: str) -> base.Source | None:
  """Reads split `role` ('train', 'val' or 'test') of the dataset `data` describes.

  With data.val_split = '' the validation set is the fraction data.val_fraction of the
  train split, fixed by `default_rng(0)` (whole patients where the split has groups),
  and 'train' excludes it; with a zero fraction there is no validation set and 'val'
  returns None. With data.val_anomaly_fraction > 0 and a validation set without
  anomalous images, that fraction of the test split's anomalous images (whole
  patients) moves from 'test' into 'val' (`base.with_val_anomalies`): 'val' and
  'test' agree on it whichever is read first, and 'train' never changes.
  """
  if role not in base.ROLES:
    raise ConfigError(f"unknown role {role!r}: use one of {list(base.ROLES)}")
  kind = data.get("source", "")
  if kind not in LOADERS:
    raise ConfigError(f"unknown data.source {kind!r}: valid sources are "
                      f"{sorted(LOADERS)}; set data.source to one of them")
  load = LOADERS[kind]
  source = _role_source(data, role, load)
  fraction = float(data.get("val_anomaly_fraction", 0.0) or 0.0)
  if role == "train" or fraction == 0:
    return source
  val = source if role == "val" else _role_source(data, "val", load)
  if val is None:
    raise ConfigError(f"data.val_anomaly_fraction={fraction:g} moves anomalous test "
                      "images into the validation split, but there is none: set "
                      "data.val_split, or data.val_split='' and data.val_fraction > 0 "
                      "(or set data.val_anomaly_fraction=0)")
  normal = base.normal_labels(val, data.get("normal_classes", ()),
                              data.get("anomalous_classes", ()))
  test_split = _split_name(data, "test")
  load_test = (lambda: source) if role == "test" else \
      (lambda: load(data, test_split, "data.test_split"))
  val, test = base.with_val_anomalies(val, load_test, normal, fraction, test_split)
  if role == "val":
    return val
  return source if test is None else test


def _role_source(data, role: str, load) -> base.Source | None:
  """Split `role` as the dataset has it (held out of train where data.val_split = '')."""
  held_out = not data.get("val_split", "") and role in ("train", "val")
  if not held_out:
    return load(data, _split_name(data, role), f"data.{role}_split")
  fraction = float(data.get("val_fraction", 0.0) or 0.0)
  if role == "val" and fraction <= 0:
    return None
  train = load(data, _split_name(data, "train"), "data.train_split")
  if fraction <= 0:
    return train
  val = base.held_out_indices(len(train), fraction, train.name, groups=train.groups)
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
