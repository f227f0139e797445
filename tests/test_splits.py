"""Patient-level splits: held-out validation and the Dice calibration part by group, and
the labelled anomalies data.val_anomaly_fraction moves from test into validation."""

import csv
import functools
import logging
import os

import jax
import numpy as np
import pytest
from PIL import Image

from jaxad import defaults, evaluation, parallel, scoring
from jaxad import state as state_lib
from jaxad.data import pipeline, sources, splits
from jaxad.errors import ConfigError, DataError

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


# ----------------------------------------------------------------------------------
# data.val_anomaly_fraction: labelled anomalies moved from test into validation


def test_moved_anomalies_take_the_fraction_of_anomalous_images():
  anomalous = np.zeros(50, bool)
  anomalous[np.random.default_rng(5).permutation(50)[:20]] = True
  for fraction, expected in ((0.25, 5), (0.5, 10), (0.04, 1), (0.99, 19)):
    moved = splits.moved_anomalies(anomalous, fraction, 0)
    assert len(moved) == expected and anomalous[moved].all()
    assert np.all(np.diff(moved) > 0)
  a = splits.moved_anomalies(anomalous, 0.25, 0)
  assert np.array_equal(a, splits.moved_anomalies(anomalous, 0.25, 0))
  assert not np.array_equal(a, splits.moved_anomalies(anomalous, 0.25, 1))


def test_moved_anomalies_take_whole_patients():
  groups = _groups()
  n = len(groups)
  anomalous = np.random.default_rng(2).random(n) < 0.4  # patients with both kinds
  names = np.unique(groups)
  sick = [g for g in names if anomalous[groups == g].any()]
  assert any(anomalous[groups == g].any() and (~anomalous[groups == g]).any()
             for g in names)
  largest = max(int(anomalous[groups == g].sum()) for g in names)
  for seed in range(10):
    moved = splits.moved_anomalies(anomalous, 0.3, seed, groups)
    assert _one_side(groups, moved)  # a moved patient takes their normal images too
    assert set(groups[moved]) <= set(sick) and 0 < len(set(groups[moved])) < len(sick)
    assert abs(anomalous[moved].sum() - 0.3 * anomalous.sum()) <= largest
    assert anomalous[np.setdiff1d(np.arange(n), moved)].any()  # test keeps anomalies


@pytest.mark.parametrize("anomalous,groups,fraction,error,message", [
    ([0, 0, 0], None, 0.5, DataError, "no anomalous image.*data.normal_classes"),
    ([0, 1, 0], None, 0.5, DataError, "single anomalous image"),
    ([1] * 4 + [0] * 20, None, 0.1, DataError, "rounds to none: raise it to at least 0.25"),
    ([1, 1, 0, 1], ["a", "a", "b", "a"], 0.5, DataError, "one patient.*'a'"),
    ([1, 1, 0], None, 1.0, ConfigError, "val_anomaly_fraction=1.0 must be in"),
])
def test_moved_anomalies_errors(anomalous, groups, fraction, error, message):
  with pytest.raises(error, match=message):
    splits.moved_anomalies(np.asarray(anomalous, bool), fraction, 0, groups)


def _write_npz(path, val_labels=(0,) * 6):
  """A MedMNIST-layout npz (uint8 N×8×8, labels N×1): train and val normal (0), test
  16 normal and 10 pneumonia (1); every image a distinct constant (its identity)."""
  labels = {"train": [0] * 20, "val": list(val_labels), "test": [0, 1] * 10 + [0] * 6}
  arrays, value = {}, 0
  for split, split_labels in labels.items():
    n = len(split_labels)
    arrays[f"{split}_images"] = (value + np.arange(n, dtype=np.uint8)[:, None, None]
                                 * np.ones((1, 8, 8), np.uint8))
    arrays[f"{split}_labels"] = np.asarray(split_labels, np.uint8).reshape(n, 1)
    value += n
  np.savez(path, class_names=np.array(["normal", "pneumonia"]), **arrays)
  return path


def _npz_data(path, **fields):
  data = defaults.get_config().data
  data.update({**dict(source="npz", path=str(path), normal_classes=("normal",),
                      image_size=8, val_anomaly_fraction=0.3), **fields})
  return data


def _pixels(split):
  """The identity of each image of a split: its constant pixel value."""
  return [int(split.source.read(i)[0][0, 0, 0]) for i in range(len(split.source))]


def _check_moved(data, plain, moved_count):
  """val and test under `data` against `plain` (the same data without the option)."""
  test = pipeline.load_split(data, "test")  # read test first: val must agree anyway
  val = pipeline.load_split(data, "val")
  old_val, old_test = (pipeline.load_split(plain, r) for r in ("val", "test"))
  assert val.anomalous.sum() == moved_count and not old_val.anomalous.any()
  assert test.anomalous.sum() == old_test.anomalous.sum() - moved_count
  assert not set(_pixels(val)) & set(_pixels(test))  # disjoint
  assert sorted(_pixels(val) + _pixels(test)) == sorted(_pixels(old_val) + _pixels(old_test))
  moved = list(val.source.ids[len(old_val.source):])
  assert all(i.startswith("test/") for i in moved)  # moved ids name their split
  qualified = lambda ids: [i if i.startswith("test/") else f"test/{i}" for i in ids]
  assert sorted(moved + qualified(test.source.ids)) == sorted(qualified(old_test.source.ids))
  assert list(val.source.ids[:len(old_val.source)]) == list(old_val.source.ids)
  again = pipeline.load_split(data, "val")
  assert list(again.source.ids) == list(val.source.ids)  # deterministic
  train, old_train = pipeline.load_split(data, "train"), pipeline.load_split(plain, "train")
  assert _pixels(train) == _pixels(old_train)  # training never sees a moved image
  return val, test


def test_npz_val_gets_anomalies_from_test_only(tmp_path, caplog):
  path = _write_npz(tmp_path / "pneumonia.npz")
  data = _npz_data(path)
  val, test = _check_moved(data, _npz_data(path, val_anomaly_fraction=0.0), 3)
  assert len(val.source) == 6 + 3 and list(val.source.ids[:6]) == [f"val/{i}" for i in range(6)]
  # Preprocessed like every split: the moved pixels reach the pipeline's batches.
  images = pipeline.preprocessed_images(val, data, np.arange(len(val.source)), batch=4)
  expected = (np.asarray(_pixels(val), np.float32) / 255) * 2 - 1
  np.testing.assert_allclose(images[:, 0, 0, 0], expected, atol=1e-6)
  # A validation split that already has anomalies keeps itself, and test too.
  path = _write_npz(tmp_path / "val_has.npz", val_labels=(0, 1, 0, 0, 1, 0))
  with caplog.at_level(logging.INFO, logger="jaxad"):
    val = pipeline.load_split(_npz_data(path), "val")
    test = pipeline.load_split(_npz_data(path), "test")
  assert len(val.source) == 6 and len(test.source) == 26
  assert "already has 2 anomalous images of 6; none moved" in caplog.text


def test_npz_held_out_validation_gets_anomalies(tmp_path):
  path = _write_npz(tmp_path / "pneumonia.npz")
  data = _npz_data(path, val_split="", val_fraction=0.25, val_anomaly_fraction=0.5)
  val, _ = _check_moved(data, _npz_data(path, val_split="", val_fraction=0.25,
                                        val_anomaly_fraction=0.0), 5)
  assert len(val.source) == 5 + 5 and all(i.startswith("train/") for i in val.source.ids[:5])


def _write_folder(root):
  """ROOT/{train,val,test}/{NORMAL,PNEUMONIA}/*.png; train and val normal only."""
  counts = {"train": (6, 0), "val": (3, 0), "test": (4, 6)}
  value = 0
  for split, (normal, sick) in counts.items():
    for cls, n in (("NORMAL", normal), ("PNEUMONIA", sick)):
      os.makedirs(root / split / cls, exist_ok=True)
      for i in range(n):
        Image.fromarray(np.full((8, 8), value, np.uint8)).save(
            root / split / cls / f"x{i}.png")  # the same names in every split
        value += 1
  return root


def test_folder_val_gets_anomalies_from_test(tmp_path):
  root = _write_folder(tmp_path / "chest")
  data = defaults.get_config().data
  data.update(dict(source="folder", path=str(root), normal_classes=("NORMAL",),
                   image_size=8, val_anomaly_fraction=0.5))
  plain = data.copy_and_resolve_references()
  plain.val_anomaly_fraction = 0.0
  val, test = _check_moved(data, plain, 3)
  moved = [i for i in val.source.ids if i.startswith("test/")]
  assert len(moved) == 3 and all(i.startswith("test/PNEUMONIA/x") for i in moved)
  assert len(set(val.source.ids)) == len(val.source)  # unique, though names repeat
  assert val.source.from_files and not val.source.has_masks


def test_grouped_test_split_moves_whole_patients(tmp_path):
  # Test patients with normal and lesion images; train (so the held-out val) normal.
  groups = _groups()
  lesion = set(np.flatnonzero(np.random.default_rng(3).random(len(groups)) < 0.4).tolist())
  _write_dataset(tmp_path, "train", np.char.add("train-", groups[:20]))
  _write_dataset(tmp_path, "test", groups, lesion=lesion)
  data = _data_config(tmp_path, val_anomaly_fraction=0.4)
  val, test = sources.get_source(data, "val"), sources.get_source(data, "test")
  assert not set(test.groups) & set(val.groups)  # no patient on both sides
  moved = np.char.startswith(val.ids, "test/")
  assert sorted([i.split("/", 1)[1] for i in val.ids[moved]] + list(test.ids)) == \
      sorted(f"test_{i}.png" for i in range(len(groups)))
  normal = sources.base.normal_labels(test, ("normal",), ())
  moved_lesions = int((~np.isin(val.labels[moved], normal)).sum())
  largest = max(sum(i in lesion for i in np.flatnonzero(groups == g)) for g in set(groups))
  assert 0 < moved_lesions < len(lesion) and abs(moved_lesions - 0.4 * len(lesion)) <= largest
  assert np.isin(val.labels[moved], normal).any()  # their normal images came along
  assert (~np.isin(test.labels, normal)).sum() == len(lesion) - moved_lesions


def test_val_anomaly_fraction_needs_a_validation_split(tmp_path):
  path = _write_npz(tmp_path / "pneumonia.npz")
  data = _npz_data(path, val_split="", val_fraction=0.0)
  for role in ("val", "test"):
    with pytest.raises(ConfigError, match="val_anomaly_fraction=0.3.*there is none"):
      pipeline.load_split(data, role)
  assert len(pipeline.load_split(data, "train").source) == 20


def test_validation_scores_see_the_moved_anomalies(tmp_path):
  """The score ranking and thresholds are chosen on the moved, labelled anomalies."""
  from conftest import fill_variables, tiny_config
  path = _write_npz(tmp_path / "pneumonia.npz")
  config = tiny_config(**{"eval.complexity": False, "eval.num_samples": 2,
                          "eval.batch_size": 16})
  config.data = _npz_data(path, val_anomaly_fraction=0.5)
  family, _ = state_lib.build(config, 2)
  variables = fill_variables(jax.eval_shape(
      functools.partial(family.init, shape=state_lib.image_shape(config, 2)),
      jax.random.key(0)))
  val = scoring.validation_scores(family, variables, config, parallel.make_mesh(), 2)
  assert val.describe() == "validation split: 11 images, 5 anomalous"
  assert val.has_both_classes and val.anomalous[6:].all() and not val.anomalous[:6].any()
  auroc = val.auroc()
  assert auroc is not None and 0.0 <= auroc["vae"] <= 1.0
