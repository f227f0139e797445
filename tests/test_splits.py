"""Patient-level splits: held-out validation and the Dice calibration part by group."""

import csv
import os

import numpy as np
import pytest
from PIL import Image

from jaxad import defaults, evaluation
from jaxad.data import sources, splits
from jaxad.errors import DataError

# 12 patients with 1 to 7 images each: an image-level split cuts some of them in two.
SIZES = (7, 1, 4, 2, 6, 3, 5, 1, 2, 6, 3, 4)


def _groups():
  return np.repeat([f"p{i:02d}" for i in range(len(SIZES))], SIZES)


def _one_side(groups, chosen) -> bool:
  inside = np.zeros(len(groups), bool)
  inside[chosen] = True
  return not set(groups[inside]) & set(groups[~inside])


def test_held_out_without_groups_is_the_old_image_split():
  # The held-out validation set of data sets without a group column did not move.
  for n, fraction in ((10, 0.2), (97, 0.1), (3, 0.5)):
    k = max(1, int(round(n * fraction)))
    expected = np.sort(np.random.default_rng(0).permutation(n)[:k])
    np.testing.assert_array_equal(splits.held_out(n, fraction, 0), expected)
    np.testing.assert_array_equal(sources.held_out_indices(n, fraction), expected)


def test_held_out_keeps_every_patient_on_one_side():
  groups = _groups()
  n = len(groups)
  assert not _one_side(groups, splits.held_out(n, 0.25, 0))  # images: patients cut
  for seed in range(20):
    chosen = splits.held_out(n, 0.25, seed, groups)
    assert _one_side(groups, chosen) and np.all(np.diff(chosen) > 0)
    assert 0 < len(set(groups[chosen])) < len(SIZES)
    # As close to the target as whole patients allow: within the largest patient.
    assert abs(len(chosen) - 0.25 * n) <= max(SIZES)
  a, b = splits.held_out(n, 0.25, 3, groups), splits.held_out(n, 0.25, 4, groups)
  assert np.array_equal(a, splits.held_out(n, 0.25, 3, groups)) and not np.array_equal(a, b)
  with pytest.raises(DataError, match="one group .*data.group_column"):
    splits.held_out(4, 0.5, 0, ["a"] * 4)


def _write_dataset(root, split, groups, lesion=()):
  """CSV `split`.csv (one-hot normal/lesion, patient column), 16x16 PNGs and masks."""
  rng = np.random.default_rng(len(groups))
  rows = []
  for i, g in enumerate(groups):
    name = f"{split}_{i}"
    image = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    mask = np.zeros((16, 16), np.uint8)
    if i in lesion:
      mask[4:9, 5:11] = 255
      image[mask > 0] = 255
    os.makedirs(root / "masks", exist_ok=True)
    Image.fromarray(mask).save(root / "masks" / f"{name}_segmentation.png")
    Image.fromarray(image).save(root / f"{name}.png")
    rows.append([name, "0" if i in lesion else "1", "1" if i in lesion else "0", g])
  with open(root / f"{split}.csv", "w", newline="") as f:
    csv.writer(f).writerows([["image", "normal", "lesion", "patient"], *rows])


def _data_config(root, **fields):
  data = defaults.get_config().data
  data.update(dict(source="csv", path=str(root / "{split}.csv"), image_dir=str(root),
                   image_ext=".png", group_column="patient", normal_classes=("normal",),
                   val_split="", val_fraction=0.25, image_size=16, **fields))
  return data


def test_held_out_validation_is_drawn_by_patient(tmp_path):
  _write_dataset(tmp_path, "train", _groups())
  data = _data_config(tmp_path)
  train, val = sources.get_source(data, "train"), sources.get_source(data, "val")
  n = len(_groups())
  assert sorted([*train.ids, *val.ids]) == sorted(f"train_{i}.png" for i in range(n))
  assert not set(train.groups) & set(val.groups)
  # Held out image by image, the same fraction cuts patients in two.
  assert not _one_side(_groups(), sources.held_out_indices(len(_groups()), 0.25))


def test_dice_calibration_images_are_drawn_by_patient():
  groups = _groups()
  n = len(groups)
  is_calib, what = evaluation.calibration_images(n, groups, 0.2, seed=1)
  assert _one_side(groups, np.flatnonzero(is_calib)) and 0 < is_calib.sum() < n
  assert "patients" in what and f"({is_calib.sum()} images)" in what
  plain, what = evaluation.calibration_images(n, None, 0.2, seed=1)
  assert plain.sum() == round(0.2 * n) and "of the images" in what
  assert not _one_side(groups, np.flatnonzero(plain))
  single, what = evaluation.calibration_images(n, ["p"] * n, 0.2, seed=1)
  assert not single.any() and "single patient" in what
