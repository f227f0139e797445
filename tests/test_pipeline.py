"""The tf.data pipeline: order from the seed, exact resume, process slices, eval coverage."""

import numpy as np
import pytest
from PIL import Image

from jaxad.data import pipeline, sources
from jaxad.errors import DataError


def _split(make_config, **overrides):
  config = make_config(**overrides)
  return pipeline.load_split(config.data, "train"), config


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_batches_are_deterministic_and_scaled(make_config):
  split, config = _split(make_config)
  a = _take(pipeline.train_batches(split, config.data, seed=3, global_batch=16), 6)
  b = _take(pipeline.train_batches(split, config.data, seed=3, global_batch=16), 6)
  c = _take(pipeline.train_batches(split, config.data, seed=4, global_batch=16), 6)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
  assert not all(np.array_equal(x["index"], y["index"]) for x, y in zip(a, c))
  image = a[0]["image"]
  assert image.shape == (16, 8, 8, 1) and image.dtype == np.float32
  assert image.min() >= -1.0 and image.max() <= 1.0 and image.std() > 0.05


def test_every_epoch_visits_each_normal_image_once(make_config):
  split, config = _split(make_config)
  steps = pipeline.steps_per_epoch(split, 16)
  batches = _take(pipeline.train_batches(split, config.data, seed=0, global_batch=16),
                  2 * steps)
  first = np.concatenate([b["index"] for b in batches[:steps]])
  second = np.concatenate([b["index"] for b in batches[steps:]])
  assert len(set(first)) == len(first) == steps * 16
  assert set(first) <= set(split.normal_indices)
  assert not np.array_equal(first, second)  # reshuffled every epoch


def test_resume_continues_the_same_stream(make_config):
  split, config = _split(make_config)
  full = _take(pipeline.train_batches(split, config.data, seed=0, global_batch=16), 9)
  resumed = _take(pipeline.train_batches(split, config.data, seed=0, global_batch=16,
                                         start_step=5), 4)
  for x, y in zip(full[5:], resumed):
    np.testing.assert_array_equal(x["index"], y["index"])
    np.testing.assert_array_equal(x["image"], y["image"])


def test_process_slices_make_the_global_batch(make_config):
  split, config = _split(make_config)
  whole = _take(pipeline.train_batches(split, config.data, seed=0, global_batch=16), 5)
  parts = [_take(pipeline.train_batches(split, config.data, seed=0, global_batch=16,
                                        process_index=p, process_count=2), 5)
           for p in range(2)]
  for step in range(5):
    joined = np.concatenate([parts[0][step]["index"], parts[1][step]["index"]])
    np.testing.assert_array_equal(joined, whole[step]["index"])


def test_training_keeps_only_normal_classes(make_config):
  split, config = _split(make_config, **{"data.source": "digits", "data.image_size": 8,
                                         "data.normal_classes": (),
                                         "data.anomalous_classes": (9,)})
  labels = np.concatenate([b["label"] for b in _take(
      pipeline.train_batches(split, config.data, seed=0, global_batch=16), 30)])
  assert 9 not in labels and set(labels) == set(range(9))


@pytest.mark.parametrize("n_procs", [1, 3])
def test_eval_scores_every_example_exactly_once(make_config, n_procs):
  config = make_config()
  split = pipeline.load_split(config.data, "test")
  n = len(split.source)
  seen, valid = [], []
  for p in range(n_procs):
    for b in pipeline.eval_batches(split, config.data, global_batch=12, process_index=p,
                                   process_count=n_procs):
      seen.append(b["index"][b["valid"] > 0])
      valid.append(b["valid"])
      assert "mask" in b and b["mask"].shape[1:] == (8, 8, 1)
  seen = np.concatenate(seen)
  assert sorted(seen) == list(range(n))
  assert np.concatenate(valid).sum() == n


def test_uint16_and_rgb_are_converted(make_config, tmp_path):
  for split, cls in [("train", "NORMAL"), ("test", "NORMAL")]:
    folder = tmp_path / split / cls
    folder.mkdir(parents=True)
    for i in range(4):
      Image.fromarray(np.full((10, 12), 1000 * (i + 1), np.uint16)).save(folder / f"{i}.png")
  config = make_config(**{"data.source": "folder", "data.path": str(tmp_path),
                          "data.normal_classes": ("NORMAL",), "data.val_split": "",
                          "data.channels": 3, "data.intensity_range": (0, 4000)})
  split = pipeline.load_split(config.data, "test")
  batch = next(pipeline.eval_batches(split, config.data, global_batch=4))
  assert batch["image"].shape == (4, 8, 8, 3)
  # 1000·(i+1) in a 0..4000 window → [0.25, 0.5, 0.75, 1] → [-0.5, 0, 0.5, 1]
  np.testing.assert_allclose(batch["image"][:, 3, 3, 0], [-0.5, 0.0, 0.5, 1.0], atol=1e-5)


def test_corrupt_file_is_named_through_the_pipeline(make_config, tmp_path):
  folder = tmp_path / "train" / "NORMAL"
  folder.mkdir(parents=True)
  for i in range(3):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / f"{i}.png")
  (folder / "3_broken.png").write_bytes(b"not a png at all")
  config = make_config(**{"data.source": "folder", "data.path": str(tmp_path),
                          "data.normal_classes": ("NORMAL",), "data.val_split": "",
                          "data.check_files": False})
  split = pipeline.load_split(config.data, "train")
  with pytest.raises(DataError, match="3_broken.png"):
    list(pipeline.eval_batches(split, config.data, global_batch=4))


def _folder_with_bad_files(root, good=3):
  """ROOT/train/NORMAL: `good` fine PNGs, a truncated PNG and a file that is no image."""
  folder = root / "train" / "NORMAL"
  folder.mkdir(parents=True)
  for i in range(good):
    Image.fromarray(np.full((32, 32), i, np.uint8)).save(folder / f"{i}.png")
  noisy = np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)
  Image.fromarray(noisy).save(folder / "cut.png")
  (folder / "cut.png").write_bytes((folder / "cut.png").read_bytes()[:300])  # a cut copy
  (folder / "junk.png").write_bytes(b"<html>404</html>")
  return folder


def test_check_files_names_every_bad_file_before_any_batch(make_config, tmp_path, caplog):
  folder = _folder_with_bad_files(tmp_path)
  config = make_config(**{"data.source": "folder", "data.path": str(tmp_path),
                          "data.normal_classes": ("NORMAL",), "data.val_split": ""})
  with caplog.at_level("INFO", logger="jaxad"):
    with pytest.raises(DataError) as e:
      pipeline.load_split(config.data, "train")
  message = str(e.value)
  assert message.startswith("2 of the 5 examples of folder:")
  assert str(folder / "cut.png") in message and "truncated" in message
  assert str(folder / "junk.png") in message
  assert "remove or replace these files, or set data.check_files=False" in message
  assert "read the 5 examples of folder:" in caplog.text  # its cost is logged
  (folder / "cut.png").unlink()
  (folder / "junk.png").unlink()
  assert len(pipeline.load_split(config.data, "train").source) == 3


def test_check_files_switch_and_size_limit(make_config, tmp_path, caplog):
  _folder_with_bad_files(tmp_path)
  base = {"data.source": "folder", "data.path": str(tmp_path),
          "data.normal_classes": ("NORMAL",), "data.val_split": ""}
  off = make_config(**base, **{"data.check_files": False})
  assert len(pipeline.load_split(off.data, "train").source) == 5
  with caplog.at_level("INFO", logger="jaxad"):
    large = make_config(**base, **{"data.check_files_max": 4})
    assert len(pipeline.load_split(large.data, "train").source) == 5
  assert "5 examples, more than data.check_files_max=4: not checked" in caplog.text
  exact = make_config(**base, **{"data.check_files_max": 5})
  with pytest.raises(DataError, match="2 of the 5 examples"):
    pipeline.load_split(exact.data, "train")
  # In-memory sources have nothing to check.
  assert pipeline.load_split(make_config().data, "train") is not None


def test_training_stops_on_a_bad_file_before_building_anything(make_config, tmp_path):
  from jaxad import trainer
  _folder_with_bad_files(tmp_path / "data")
  config = make_config(**{"data.source": "folder", "data.path": str(tmp_path / "data"),
                          "data.normal_classes": ("NORMAL",), "data.val_split": ""})
  workdir = tmp_path / "workdir"
  with pytest.raises(DataError, match=r"cut\.png.*\n.*junk\.png"):
    trainer.train_and_evaluate(config, str(workdir))
  assert not (workdir / "config.json").exists() and not (workdir / "checkpoints").exists()


# ----------------------------------------------------------------------------------
# pixel values: NaN / inf and float images outside [0, 1] are named, never trained on


def _float_npz(path, bad=None, scale=1.0, seed=0):
  """MedMNIST keys with float32 images in [0, 1]·scale; bad = (split, row, value)."""
  rng = np.random.default_rng(seed)
  arrays = {}
  for split, n in (("train", 20), ("val", 6), ("test", 6)):
    arrays[f"{split}_images"] = (rng.random((n, 28, 28)) * scale).astype(np.float32)
    arrays[f"{split}_labels"] = (np.arange(n) % 2).astype(np.uint8)[:, None]
  if bad is not None:
    split, row, value = bad
    arrays[f"{split}_images"][row, 5, 7] = value
  np.savez(path, **arrays)


def _npz_config(make_config, path, **overrides):
  return make_config(**{"data.source": "npz", "data.path": str(path),
                        "data.normal_classes": (0,), **overrides})


@pytest.mark.parametrize("role, row, value", [
    ("train", 4, np.nan), ("train", 4, np.inf), ("val", 3, -np.inf), ("test", 5, np.nan)])
def test_non_finite_npz_pixels_are_named_when_the_split_loads(make_config, tmp_path, role,
                                                              row, value):
  _float_npz(tmp_path / "f.npz", bad=(role, row, value))
  config = _npz_config(make_config, tmp_path / "f.npz")
  with pytest.raises(DataError) as e:
    pipeline.load_split(config.data, role)
  assert str(e.value).startswith(f"1 of the {20 if role == 'train' else 6} examples of "
                                 f"npz:{tmp_path / 'f.npz'}[{role}] have NaN or infinite")
  assert f"example {role}/{row} has 1 NaN or infinite pixels (of 784)" in str(e.value)
  assert "np.nan_to_num" in str(e.value)


def test_non_finite_pixels_in_a_held_out_val_set_are_named(make_config, tmp_path):
  _float_npz(tmp_path / "f.npz", bad=("train", 7, np.nan))
  config = _npz_config(make_config, tmp_path / "f.npz", **{"data.val_split": "",
                                                           "data.val_fraction": 0.25})
  val = sources.get_source(config.data, "val")
  role = "val" if "train/7" in set(val.ids) else "train"
  with pytest.raises(DataError, match=r"held-out val 0.25 have NaN.*example train/7 has"):
    pipeline.load_split(config.data, role)
  other = "train" if role == "val" else "val"
  assert pipeline.load_split(config.data, other) is not None  # its part has no NaN


def test_training_on_a_nan_pixel_stops_before_building_anything(make_config, tmp_path):
  from jaxad import trainer
  _float_npz(tmp_path / "f.npz", bad=("train", 2, np.nan))
  config = _npz_config(make_config, tmp_path / "f.npz", **{"train.batch_size": 8})
  with pytest.raises(DataError, match=r"example train/2 has 1 NaN"):
    trainer.train_and_evaluate(config, str(tmp_path / "workdir"))
  assert not (tmp_path / "workdir" / "config.json").exists()  # stopped at load_split


def test_float_npz_stored_as_0_255_needs_an_intensity_range(make_config, tmp_path):
  _float_npz(tmp_path / "f.npz", scale=255.0)
  config = _npz_config(make_config, tmp_path / "f.npz")
  with pytest.raises(DataError) as e:
    pipeline.load_split(config.data, "test")
  message = str(e.value)
  assert message.startswith(f"6 of the 6 examples of npz:{tmp_path / 'f.npz'}[test] have "
                            "float pixels outside [0, 1]")
  assert "pixels of example test/0 lie in [" in message
  assert "but float images must be in [0, 1]" in message
  assert "set data.intensity_range=(0, 255)" in message and "store uint8" in message
  # With the range it names, the same file maps as if it were uint8.
  config = _npz_config(make_config, tmp_path / "f.npz",
                       **{"data.intensity_range": (0, 255)})
  split = pipeline.load_split(config.data, "test")
  batch = next(pipeline.eval_batches(split, config.data, global_batch=6))
  assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
  assert batch["image"].std() > 0.1  # not saturated at 1
  minmax = _npz_config(make_config, tmp_path / "f.npz", **{"data.intensity": "minmax"})
  assert pipeline.load_split(minmax.data, "test") is not None


def test_float_npz_in_the_unit_range_passes(make_config, tmp_path):
  _float_npz(tmp_path / "f.npz")
  config = _npz_config(make_config, tmp_path / "f.npz")
  for role in ("train", "val", "test"):
    assert len(pipeline.load_split(config.data, role).source) > 0


def _float_tiffs(root, bad_value=None, scale=1.0):
  """ROOT/train/NORMAL: four 32-bit float TIFFs (mode F), b.tif with one bad pixel."""
  folder = root / "train" / "NORMAL"
  folder.mkdir(parents=True)
  for k, name in enumerate("abcd"):
    x = np.full((10, 12), 0.2 * k, np.float32) * scale
    if name == "b" and bad_value is not None:
      x[3, 4] = bad_value
    Image.fromarray(x, mode="F").save(folder / f"{name}.tif")
  return folder


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_float_tiff_is_named(make_config, tmp_path, value):
  folder = _float_tiffs(tmp_path, bad_value=value)
  base = {"data.source": "folder", "data.path": str(tmp_path),
          "data.normal_classes": ("NORMAL",), "data.val_split": ""}
  with pytest.raises(DataError) as e:  # data.check_files: before anything compiles
    pipeline.load_split(make_config(**base).data, "train")
  assert str(e.value).startswith("1 of the 4 examples of folder:")
  assert (f"example NORMAL/b.tif of folder:{tmp_path}[train] has 1 NaN or infinite "
          "pixels (of 120)") in str(e.value)
  unchecked = make_config(**base, **{"data.check_files": False})
  split = pipeline.load_split(unchecked.data, "train")
  with pytest.raises(DataError, match=r"^example NORMAL/b.tif of folder:.* has 1 NaN"):
    list(pipeline.eval_batches(split, unchecked.data, global_batch=4))
  with pytest.raises(DataError, match="example NORMAL/b.tif"):  # and in training
    next(pipeline.train_batches(split, unchecked.data, seed=0, global_batch=4))


def test_float_tiff_outside_the_unit_range_is_named(make_config, tmp_path):
  _float_tiffs(tmp_path, scale=255.0)
  base = {"data.source": "folder", "data.path": str(tmp_path),
          "data.normal_classes": ("NORMAL",), "data.val_split": ""}
  with pytest.raises(DataError, match=r"example NORMAL/c.tif of folder:.* lie in "
                     r"\[102, 102\] but float images must be in \[0, 1\].*"
                     r"data.intensity_range=\(0, 255\)"):
    pipeline.load_split(make_config(**base).data, "train")
  ranged = make_config(**base, **{"data.intensity_range": (0, 255)})
  split = pipeline.load_split(ranged.data, "train")
  batch = next(pipeline.eval_batches(split, ranged.data, global_batch=4))
  np.testing.assert_allclose(batch["image"][:, 0, 0, 0], [-1.0, -0.6, -0.2, 0.2],
                             atol=1e-5)


def test_unlabeled_npz_input_with_a_nan_pixel_is_named(make_config, tmp_path):
  """python -m jaxad.evaluate --input=X.npz: the input is checked as evaluation._job
  does (check_files), and each image again when it is read."""
  images = np.random.default_rng(0).random((5, 28, 28)).astype(np.float32)
  images[3, 0, 0] = np.nan
  np.savez(tmp_path / "in.npz", images=images)
  config = make_config()
  source = sources.unlabeled_source(str(tmp_path / "in.npz"))
  with pytest.raises(DataError, match=r"1 of the 5 examples of input:.*in\.npz have NaN"
                     r".*example images/3 has 1 NaN"):
    pipeline.check_files(source, config.data)
  split = pipeline.Split(source, np.array([0]))
  with pytest.raises(DataError, match=r"^example images/3 of input:.* has 1 NaN"):
    list(pipeline.eval_batches(split, config.data, global_batch=5))


def test_unlabeled_folder_input_with_a_nan_pixel_is_named(make_config, tmp_path):
  _float_tiffs(tmp_path, bad_value=np.nan)
  source = sources.unlabeled_source(str(tmp_path))
  with pytest.raises(DataError, match=r"example train/NORMAL/b.tif of input:.* has 1 NaN"):
    pipeline.check_files(source, make_config().data)


@pytest.mark.parametrize("shape, size, masks", [((12, 28, 28), 28, True),
                                                ((12, 28, 28), 16, True),
                                                ((12, 8, 8, 8), 4, False)])
def test_batched_reads_equal_per_example_reads(make_config, tmp_path, shape, size, masks):
  """In-memory sources are read a batch at a time: the same pixels, masks, labels and
  padding as one example at a time (same size: no resize at all; 2D; volumes)."""
  rng = np.random.default_rng(0)
  arrays = {"test_images": rng.integers(0, 256, shape, dtype=np.uint8),
            "test_labels": (np.arange(shape[0]) % 2)[:, None]}
  if masks:
    arrays["test_masks"] = rng.random(shape) > 0.7
  np.savez(tmp_path / "a.npz", **arrays)
  config = _npz_config(make_config, tmp_path / "a.npz", **{"data.image_size": size,
                                                           "data.depth": 0})
  split = pipeline.load_split(config.data, "test")
  indices, valid = pipeline.padded_indices(np.arange(len(split.source)), 8)
  one, batched = (list(pipeline._numpy_batches(pipeline._dataset(
      split, config.data, indices, 8, valid=valid, per_example=p))) for p in (True, False))
  assert len(one) == len(batched) == 2
  for a, b in zip(one, batched):
    assert a.keys() == b.keys() and a["image"].shape[1] == size
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("per_example", [True, False])
def test_nearest_resize_keeps_the_stored_levels(make_config, tmp_path, per_example):
  """data.resize=nearest (for a discrete decoder): 28→32 repeats rows and columns, so
  every value stays one of the 256 levels, and each output pixel is an input pixel."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
  np.savez(tmp_path / "a.npz", test_images=images, test_labels=np.zeros((5, 1), int))
  config = _npz_config(make_config, tmp_path / "a.npz",
                       **{"data.image_size": 32, "data.resize": "nearest"})
  split = pipeline.load_split(config.data, "test")
  indices, valid = pipeline.padded_indices(np.arange(5), 8)
  batch = next(pipeline._numpy_batches(pipeline._dataset(
      split, config.data, indices, 8, valid=valid, per_example=per_example)))
  levels = (batch["image"][:5, ..., 0] + 1) / 2 * 255
  np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)
  rows = np.floor((np.arange(32) + 0.5) * 28 / 32).astype(int)  # half-pixel centres
  np.testing.assert_array_equal(np.round(levels).astype(np.uint8),
                                images[:, rows][:, :, rows])
  bilinear = _npz_config(make_config, tmp_path / "a.npz", **{"data.image_size": 32})
  other = next(pipeline._numpy_batches(pipeline._dataset(
      pipeline.load_split(bilinear.data, "test"), bilinear.data, indices, 8, valid=valid,
      per_example=per_example)))["image"][:5, ..., 0]
  assert np.abs((other + 1) / 2 * 255 - np.round((other + 1) / 2 * 255)).max() > 0.1
