"""Data sources: labels, ids, dtypes, masks, held-out splits and error messages."""

import csv
import dataclasses
import os
import struct
import zlib

import ml_collections
import numpy as np
import pytest
from PIL import Image

from jaxad.data import sources
from jaxad.errors import ConfigError, DataError


def _data(**fields) -> ml_collections.ConfigDict:
  base = dict(source="folder", path="", train_split="train", val_split="val",
              test_split="test", val_fraction=0.0)
  base.update(fields)
  return ml_collections.ConfigDict(base)


def _save(path, array, **kwargs):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path, **kwargs)


def _gray(value, shape=(6, 5)):
  return np.full(shape, value, np.uint8)


# ----------------------------------------------------------------------------------
# folder


@pytest.fixture
def oct_tree(tmp_path):
  """An OCT2017-like tree: mixed formats, an empty class, masks for some test images."""
  root = tmp_path / "oct"
  _save(str(root / "train/NORMAL/b.png"), _gray(10))
  _save(str(root / "train/NORMAL/a.PNG"), _gray(20))  # upper-case extension
  _save(str(root / "train/CNV/c.jpg"), np.full((6, 5, 3), 100, np.uint8), quality=95)
  (root / "train/NORMAL/notes.txt").write_text("not an image")
  (root / "train/EMPTY").mkdir()  # skipped: other classes have images
  _save(str(root / "test/NORMAL/n1.png"), np.full((6, 5), 40000, np.uint16))
  _save(str(root / "test/DME/d1.tif"), np.full((6, 5), 300, np.uint16))
  _save(str(root / "test/DME/d2.png"), np.full((6, 5, 4), 50, np.uint8))  # RGBA
  mask = np.zeros((6, 5), np.uint8)
  mask[1:3, 2:4] = 255
  _save(str(root / "test/masks/DME/d1.png"), mask)  # d2 has no mask
  return root


def test_folder_reads_labels_ids_and_dtypes(oct_tree):
  data = _data(path=str(oct_tree))
  train = sources.get_source(data, "train")
  # Class names are shared by every split the config names, so labels agree.
  assert train.class_names == ("CNV", "DME", "EMPTY", "NORMAL")
  assert list(train.ids) == ["CNV/c.jpg", "NORMAL/a.PNG", "NORMAL/b.png"]
  np.testing.assert_array_equal(train.labels, [0, 3, 3])
  assert train.labels.dtype == np.int32 and train.groups is None
  assert not train.has_masks and train.spatial_ndim == 2 and train.from_files
  gray, mask = train.read(1)
  assert gray.shape == (6, 5, 1) and gray.dtype == np.uint8 and gray[0, 0, 0] == 20
  assert mask is None
  rgb, _ = train.read(0)
  assert rgb.shape == (6, 5, 3) and rgb.dtype == np.uint8


def test_folder_keeps_16_bit_and_reads_masks(oct_tree):
  test = sources.get_source(_data(path=str(oct_tree)), "test")
  assert list(test.ids) == ["DME/d1.tif", "DME/d2.png", "NORMAL/n1.png"]
  assert test.has_masks
  tif, tif_mask = test.read(0)
  assert tif.dtype == np.uint16 and tif.shape == (6, 5, 1) and tif.max() == 300
  expected = np.zeros((6, 5, 1), np.uint8)
  expected[1:3, 2:4] = 1
  np.testing.assert_array_equal(tif_mask, expected)
  rgba, no_mask = test.read(1)
  assert rgba.shape == (6, 5, 3)  # alpha dropped
  assert no_mask.shape == (6, 5, 1) and no_mask.dtype == np.uint8 and not no_mask.any()
  png16, _ = test.read(2)
  assert png16.dtype == np.uint16 and png16.max() == 40000


@pytest.mark.parametrize("mode, dtype, channels", [
    ("P", np.uint8, 3), ("LA", np.uint8, 1), ("1", np.uint8, 1), ("F", np.float32, 1),
    ("I", np.uint16, 1)])
def test_decode_image_modes(tmp_path, mode, dtype, channels):
  path = str(tmp_path / ("x.tif" if mode in ("F", "I") else "x.png"))
  Image.fromarray(np.arange(30, dtype=np.uint8).reshape(6, 5)).convert(mode).save(path)
  image = sources.decode_image(path)
  assert image.dtype == dtype and image.shape == (6, 5, channels)


def write_png16(path, array):
  """A 16-bit grayscale PNG written byte by byte as the PNG spec lays it out (big-endian
  samples, as scanners and OpenCV write them), independently of Pillow's encoder.
  Pillow opens such a file in mode I;16."""
  h, w = array.shape
  rows = b"".join(b"\x00" + array[r].astype(">u2").tobytes() for r in range(h))
  chunk = lambda tag, body: (struct.pack(">I", len(body)) + tag + body
                             + struct.pack(">I", zlib.crc32(tag + body)))
  with open(path, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_16_bit_png_keeps_every_value(tmp_path):
  values = np.array([[0, 1, 255, 256], [258, 4095, 40000, 65535]], np.uint16)
  write_png16(tmp_path / "scan.png", values)
  image = sources.decode_image(str(tmp_path / "scan.png"))
  assert image.dtype == np.uint16 and image.shape == (2, 4, 1)
  np.testing.assert_array_equal(image[..., 0], values)  # 258 ≠ 513: byte order kept


def test_folder_errors_name_the_problem(oct_tree, tmp_path):
  with pytest.raises(DataError, match=r"splits under .*\['test', 'train'\].*val_split"):
    sources.get_source(_data(path=str(oct_tree)), "val")
  with pytest.raises(DataError, match="does not exist: check data.path"):
    sources.get_source(_data(path=str(tmp_path / "nowhere")), "train")
  (tmp_path / "empty/train/NORMAL").mkdir(parents=True)
  with pytest.raises(DataError, match=r"no images found under .*\*\.png"):
    sources.get_source(_data(path=str(tmp_path / "empty")), "train")
  broken = oct_tree / "train/NORMAL/c_broken.png"
  broken.write_bytes(b"not a png")
  train = sources.get_source(_data(path=str(oct_tree)), "train")
  with pytest.raises(DataError, match="cannot decode image .*c_broken.png.*replace"):
    train.read(list(train.ids).index("NORMAL/c_broken.png"))


# ----------------------------------------------------------------------------------
# held-out validation, subset, read


def test_held_out_val_is_fixed_disjoint_and_complete():
  data = _data(source="synthetic", val_split="", val_fraction=0.25,
               synthetic=dict(num_examples=40, image_size=8))
  full = sources.get_source(_data(source="synthetic", val_split="",
                                  synthetic=dict(num_examples=40, image_size=8)), "train")
  train, val = sources.get_source(data, "train"), sources.get_source(data, "val")
  assert len(full) == 40 and len(val) == 10 and len(train) == 30
  assert set(train.ids).isdisjoint(val.ids)
  assert set(train.ids) | set(val.ids) == set(full.ids)
  again = sources.get_source(data, "val")
  np.testing.assert_array_equal(again.ids, val.ids)
  k = int(val.ids[3].split("/")[1])
  np.testing.assert_array_equal(val.read(3)[0], full.read(k)[0])
  assert sources.get_source(_data(source="synthetic", val_split=""), "val") is None


def test_subset_and_read_bounds():
  source = sources.get_source(_data(source="digits"), "test")
  sub = source.subset([5, 2])
  assert sub.class_names == source.class_names
  np.testing.assert_array_equal(sub.labels, source.labels[[5, 2]])
  np.testing.assert_array_equal(sub.read(1)[0], source.read(2)[0])
  with pytest.raises(DataError, match="out of range"):
    sub.read(2)


def test_unknown_source_and_classes():
  with pytest.raises(ConfigError, match=r"unknown data.source 'nope'.*'folder'"):
    sources.get_source(_data(source="nope"), "train")
  with pytest.raises(ConfigError, match="data.test_split is empty"):
    sources.get_source(_data(source="synthetic", test_split=""), "test")
  source = sources.get_source(_data(source="synthetic"), "test")
  np.testing.assert_array_equal(sources.resolve_classes(source, ["anomalous", 0]), [1, 0])
  with pytest.raises(ConfigError, match=r"'tumour'.*names are \['normal', 'anomalous'\]"):
    sources.resolve_classes(source, ["tumour"])
  with pytest.raises(ConfigError, match="unknown class 2"):
    sources.resolve_classes(source, [2])


# ----------------------------------------------------------------------------------
# csv


def _write_csv(path, header, rows):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", newline="") as f:
    csv.writer(f).writerows([header, *rows])


@pytest.fixture
def isic(tmp_path):
  """ISIC 2018 Task 3 layout with a lesion_id group column and task 1 style masks."""
  root = tmp_path / "isic"
  header = ["image", "MEL", "NV", "BCC", "lesion_id"]
  _write_csv(str(root / "train.csv"), header, [
      ["ISIC_1", "0.0", "1.0", "0.0", "L1"],
      ["ISIC_2", "1.0", "0.0", "0.0", "L1"],
      ["ISIC_3.png", "0", "0", "1", "L2"]])
  for i, value in ((1, 10), (2, 20)):
    _save(str(root / f"images/train/ISIC_{i}.jpg"), np.full((6, 5, 3), value, np.uint8))
  _save(str(root / "images/train/ISIC_3.png"), np.full((6, 5, 3), 30, np.uint8))
  mask = np.zeros((6, 5), np.uint8)
  mask[2, 2] = 255
  _save(str(root / "masks/ISIC_2_segmentation.png"), mask)
  _save(str(root / "masks/ISIC_3.png"), mask)
  return root


def _isic_data(root, **fields):
  return _data(**{"source": "csv", "path": str(root / "{split}.csv"),
                  "image_dir": str(root / "images/{split}"), "image_ext": ".jpg",
                  "id_column": "image", "label_column": "", "group_column": "lesion_id",
                  **fields})


def test_csv_one_hot_groups_and_masks(isic):
  train = sources.get_source(_isic_data(isic, mask_dir=str(isic / "masks")), "train")
  assert train.class_names == ("MEL", "NV", "BCC")
  np.testing.assert_array_equal(train.labels, [1, 0, 2])
  assert list(train.ids) == ["ISIC_1.jpg", "ISIC_2.jpg", "ISIC_3.png"]
  assert list(train.groups) == ["L1", "L1", "L2"]
  assert train.has_masks
  image, mask = train.read(1)
  assert image.shape == (6, 5, 3) and image.dtype == np.uint8
  assert mask.sum() == 1 and mask[2, 2, 0] == 1
  assert train.read(2)[1].sum() == 1  # X.png naming
  assert not train.read(0)[1].any()  # no mask: all zero
  assert sources.get_source(_isic_data(isic), "train").read(0)[1] is None


def test_csv_label_column(isic):
  _write_csv(str(isic / "labels.csv"), ["image", "dx"],
             [["ISIC_1", "nv"], ["ISIC_2", "mel"]])
  data = _data(source="csv", path=str(isic / "labels.csv"),
               image_dir=str(isic / "images/train"), label_column="dx")
  source = sources.get_source(data, "train")
  assert source.class_names == ("mel", "nv") and list(source.labels) == [1, 0]
  assert source.groups is None


def test_csv_errors(isic):
  os.remove(isic / "images/train/ISIC_2.jpg")
  with pytest.raises(DataError, match=r"1 of the 3 images .* missing, e.g. .*ISIC_2\.jpg"):
    sources.get_source(_isic_data(isic), "train")
  with pytest.raises(DataError, match=r"no column 'img'.*\['image', 'MEL'"):
    sources.get_source(_isic_data(isic, id_column="img"), "train")
  with pytest.raises(DataError, match="test.csv not found"):
    sources.get_source(_isic_data(isic), "test")
  _write_csv(str(isic / "bad.csv"), ["image", "MEL", "NV"], [["ISIC_1", "1", "1"]])
  with pytest.raises(DataError, match=r"line 2 \('ISIC_1'\) is not one-hot"):
    sources.get_source(_data(source="csv", path=str(isic / "bad.csv")), "train")


ISIC_CLASSES = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")


def test_csv_reads_the_isic_2018_ground_truth_as_shipped(tmp_path):
  """ISIC2018_Task3_Training_GroundTruth.csv: one-hot float cells ("0.0"/"1.0"), ids
  without extension, images ISIC2018_Task3_Training_Input/<id>.jpg."""
  root = tmp_path / "isic2018"
  ids = ["ISIC_0024306", "ISIC_0024307", "ISIC_0024308", "ISIC_0024309", "ISIC_0024310"]
  classes = [1, 1, 0, 3, 6]  # NV, NV, MEL, AKIEC, VASC
  rows = [[i] + ["1.0" if k == c else "0.0" for k in range(7)] for i, c in zip(ids, classes)]
  _write_csv(str(root / "ISIC2018_Task3_Training_GroundTruth.csv"), ["image", *ISIC_CLASSES],
             rows)
  for n, i in enumerate(ids):
    _save(str(root / "ISIC2018_Task3_Training_Input" / f"{i}.jpg"),
          np.full((6, 5, 3), 40 * n, np.uint8), quality=95)
  data = _data(source="csv", path=str(root / "ISIC2018_Task3_Training_GroundTruth.csv"),
               image_dir=str(root / "ISIC2018_Task3_Training_Input"), image_ext=".jpg",
               id_column="image", label_column="", group_column="", mask_dir="")
  source = sources.get_source(data, "train")
  assert source.class_names == ISIC_CLASSES and source.from_files  # data.check_files
  np.testing.assert_array_equal(source.labels, classes)
  assert list(source.ids) == [f"{i}.jpg" for i in ids]
  image, mask = source.read(2)
  assert image.shape == (6, 5, 3) and image.dtype == np.uint8 and mask is None
  assert abs(int(image.mean()) - 80) <= 2  # JPEG is lossy, but barely on a flat image


# ----------------------------------------------------------------------------------
# nifti


def test_nifti_singleton_axis_and_integer_width(tmp_path):
  """(x, y, z, 1) volumes, as some tools save them; int16 stays 16-bit however dark."""
  nibabel = pytest.importorskip("nibabel")  # an install extra: jaxad[nifti]
  rng = np.random.default_rng(0)
  xyz = {"bright": rng.integers(0, 3000, (5, 4, 3)).astype(np.int16),
         "dark": rng.integers(0, 200, (5, 4, 3)).astype(np.int16)}
  for name, volume in xyz.items():
    folder = tmp_path / "mri/test/healthy"
    folder.mkdir(parents=True, exist_ok=True)
    nibabel.save(nibabel.Nifti1Image(volume[..., None], np.eye(4)),
                 str(folder / f"{name}.nii.gz"))
    assert nibabel.load(str(folder / f"{name}.nii.gz")).shape == (5, 4, 3, 1)
  source = sources.get_source(_data(source="nifti", path=str(tmp_path / "mri")), "test")
  assert list(source.ids) == ["healthy/bright.nii.gz", "healthy/dark.nii.gz"]
  assert source.from_files  # checked by data.check_files
  for i, name in enumerate(("bright", "dark")):
    volume, mask = source.read(i)
    assert volume.shape == (3, 4, 5, 1) and mask is None  # (z, y, x) = D×H×W
    assert volume.dtype == np.uint16  # one mapping to [-1, 1] for every file
    np.testing.assert_array_equal(volume[..., 0], xyz[name].transpose(2, 1, 0))


# ----------------------------------------------------------------------------------
# npz


def _npz(path, **arrays):
  np.savez(path, **arrays)
  return _data(source="npz", path=str(path), ndim=0)


def test_npz_2d_gray_and_rgb(tmp_path):
  rng = np.random.default_rng(0)
  gray = rng.integers(0, 256, (5, 7, 6), dtype=np.uint8)
  masks = np.zeros((5, 7, 6), np.uint8)
  masks[0, 1, 1] = 7
  data = _npz(tmp_path / "m.npz", train_images=gray, train_labels=np.arange(5)[:, None] % 3,
              train_masks=masks, test_images=rng.random((2, 7, 6, 3), np.float32),
              test_labels=np.array([0, 1]), class_names=np.array(["a", "b", "c"]))
  train = sources.get_source(data, "train")
  assert train.class_names == ("a", "b", "c") and train.spatial_ndim == 2
  np.testing.assert_array_equal(train.labels, [0, 1, 2, 0, 1])
  assert list(train.ids[:2]) == ["train/0", "train/1"] and train.has_masks
  image, mask = train.read(0)
  assert image.shape == (7, 6, 1) and image.dtype == np.uint8
  np.testing.assert_array_equal(image[..., 0], gray[0])
  assert mask.dtype == np.uint8 and mask.sum() == 1 and mask[1, 1, 0] == 1
  test = sources.get_source(data, "test")
  image, mask = test.read(1)
  assert image.shape == (7, 6, 3) and image.dtype == np.float32 and mask is None


def test_npz_3d_uint16_and_ndim_override(tmp_path):
  volumes = np.arange(2 * 4 * 5 * 6, dtype=np.uint16).reshape(2, 4, 5, 6) * 100
  data = _npz(tmp_path / "v.npz", train_images=volumes, train_labels=np.array([0, 1]),
              test_images=volumes[..., None], test_labels=np.array([1, 1]),
              val_images=np.zeros((2, 4, 5, 3), np.uint8), val_labels=np.array([0, 0]))
  train = sources.get_source(data, "train")
  assert train.spatial_ndim == 3 and train.class_names == ("0", "1")
  image, _ = train.read(1)
  assert image.shape == (4, 5, 6, 1) and image.dtype == np.uint16 and image.max() > 255
  assert sources.get_source(data, "test").read(0)[0].shape == (4, 5, 6, 1)
  assert sources.get_source(data, "val").spatial_ndim == 2  # last axis 3: RGB
  data.ndim = 3
  val = sources.get_source(data, "val")
  assert val.spatial_ndim == 3 and val.read(0)[0].shape == (4, 5, 3, 1)


def test_npz_errors(tmp_path):
  data = _npz(tmp_path / "m.npz", train_images=np.zeros((3, 4, 4), np.uint8),
              train_labels=np.eye(3, dtype=np.int64))
  with pytest.raises(DataError, match="multi-label data is not supported"):
    sources.get_source(data, "train")
  with pytest.raises(DataError, match=r"no array 'test_images' \(its keys: .*train_images"):
    sources.get_source(data, "test")
  with pytest.raises(DataError, match="not found: check data.path"):
    sources.get_source(_data(source="npz", path=str(tmp_path / "none.npz")), "train")


def _medmnist(path, image_shape, sizes=(6, 2, 3), label_dtype=np.uint8,
              label_shape=lambda n: (n, 1), seed=0):
  """An .npz laid out as MedMNIST ships it: {train,val,test}_{images,labels}, uint8
  images, uint8 labels of shape N×1, written with np.savez_compressed."""
  rng = np.random.default_rng(seed)
  arrays = {}
  for split, n in zip(("train", "val", "test"), sizes):
    arrays[f"{split}_images"] = rng.integers(0, 256, (n, *image_shape), dtype=np.uint8)
    arrays[f"{split}_labels"] = (np.arange(n) % 3 + (split == "test")).astype(
        label_dtype).reshape(label_shape(n))  # class 3 only in the test split
  np.savez_compressed(path, **arrays)
  return arrays


@pytest.mark.parametrize("image_shape, spatial_ndim, channels", [
    ((28, 28), 2, 1), ((28, 28, 3), 2, 3), ((28, 28, 28), 3, 1)])
def test_npz_reads_medmnist_files_as_shipped(tmp_path, image_shape, spatial_ndim, channels):
  arrays = _medmnist(tmp_path / "medmnist.npz", image_shape)
  data = _data(source="npz", path=str(tmp_path / "medmnist.npz"), ndim=0)
  for split in ("train", "val", "test"):
    source = sources.get_source(data, split)
    assert source.spatial_ndim == spatial_ndim and not source.from_files
    assert source.class_names == ("0", "1", "2", "3")  # the largest label of any split
    np.testing.assert_array_equal(source.labels, arrays[f"{split}_labels"][:, 0])
    assert source.labels.dtype == np.int32
    for i in range(len(source)):
      image, mask = source.read(i)
      assert image.dtype == np.uint8 and mask is None
      assert image.shape == (*image_shape[:spatial_ndim], channels)
      np.testing.assert_array_equal(image.reshape(image_shape),
                                    arrays[f"{split}_images"][i])


@pytest.mark.parametrize("label_dtype", [np.uint8, np.uint16, np.int32, np.int64])
@pytest.mark.parametrize("flat", [False, True])
def test_npz_labels_of_any_integer_dtype_and_shape(tmp_path, label_dtype, flat):
  shape = (lambda n: (n,)) if flat else (lambda n: (n, 1))
  arrays = _medmnist(tmp_path / "m.npz", (4, 4), label_dtype=label_dtype, label_shape=shape)
  test = sources.get_source(_data(source="npz", path=str(tmp_path / "m.npz")), "test")
  np.testing.assert_array_equal(test.labels, arrays["test_labels"].reshape(-1))
  assert test.class_names == ("0", "1", "2", "3")


def test_npz_empty_label_arrays_give_no_classes(tmp_path):
  np.savez_compressed(tmp_path / "m.npz", train_images=np.zeros((0, 4, 4), np.uint8),
                      train_labels=np.zeros((0, 1), np.uint8))
  train = sources.get_source(_data(source="npz", path=str(tmp_path / "m.npz")), "train")
  assert len(train) == 0 and train.class_names == ()


def test_npz_wide_integers_share_one_dtype_for_the_whole_array(tmp_path):
  images = np.zeros((2, 4, 4), np.int32)
  images[0, 0, 0], images[1, 0, 0] = 200, 300  # alone, image 0 would fit in uint8
  data = _npz(tmp_path / "w.npz", train_images=images, train_labels=np.array([0, 0]))
  train = sources.get_source(data, "train")
  for i in range(2):
    image, _ = train.read(i)
    assert image.dtype == np.uint16 and image[0, 0, 0] == images[i, 0, 0]


@pytest.mark.parametrize("key", ["images", "test_images"])
def test_unlabeled_npz_input_reads_every_row(tmp_path, key):
  arrays = _medmnist(tmp_path / "m.npz", (5, 4, 3), sizes=(0, 0, 3))
  images = arrays["test_images"]
  np.savez_compressed(tmp_path / "in.npz", **{key: images})
  source = sources.unlabeled_source(str(tmp_path / "in.npz"))
  assert source.class_names == ("unlabeled",) and list(source.labels) == [0, 0, 0]
  assert list(source.ids) == [f"{key}/{i}" for i in range(3)] and source.spatial_ndim == 2
  for i in range(3):
    np.testing.assert_array_equal(source.read(i)[0], images[i])
  with pytest.raises(DataError, match=r"one image array named 'images'.*test_images"):
    sources.unlabeled_source(str(tmp_path / "m.npz"))  # three *_images arrays


# ----------------------------------------------------------------------------------
# tfds


def test_tfds_mock_mnist():
  import tensorflow_datasets as tfds
  data = _data(source="tfds", name="mnist", data_dir="", val_split="", val_fraction=0.25)
  with tfds.testing.mock_data(num_examples=12):
    train = sources.get_source(data, "train")
    val = sources.get_source(data, "val")
    test = sources.get_source(data, "test")
  assert train.class_names == tuple(str(i) for i in range(10))
  assert len(train) == 9 and len(val) == 3 and len(test) == 12
  assert test.ids[0] == "test/0" and test.name == "tfds:mnist[test]"
  image, mask = test.read(11)
  assert image.shape == (28, 28, 1) and image.dtype == np.uint8 and mask is None
  assert test.labels.dtype == np.int32 and 0 <= test.labels.min() <= test.labels.max() < 10


def test_tfds_prepared_dataset_splits_and_errors(tmp_path):
  import tensorflow as tf
  import tensorflow_datasets as tfds
  images = np.arange(6 * 5 * 4, dtype=np.uint8).reshape(6, 5, 4, 1)
  split = lambda n: tf.data.Dataset.from_tensor_slices(
      {"image": images[:n], "label": np.arange(n) % 2})
  tfds.dataset_builders.store_as_tfds_dataset(
      name="tiny_scans", version="1.0.0", data_dir=str(tmp_path), disable_shuffling=True,
      split_datasets={"train": split(6), "test": split(4)},
      features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(5, 4, 1)),
          "label": tfds.features.ClassLabel(names=["healthy", "lesion"])}))
  data = _data(source="tfds", name="tiny_scans", data_dir=str(tmp_path),
               train_split="train[:50%]")
  train = sources.get_source(data, "train")
  assert train.class_names == ("healthy", "lesion") and len(train) == 3
  assert train.ids[2] == "train[:50%]/2"
  np.testing.assert_array_equal(train.read(2)[0], images[2])
  with pytest.raises(DataError, match=r"no split 'val'.*\['train', 'test'\].*val_split"):
    sources.get_source(data, "val")
  with pytest.raises(DataError, match="unknown tfds dataset 'no_such_dataset_xyz'"):
    sources.get_source(_data(source="tfds", name="no_such_dataset_xyz"), "train")


# ----------------------------------------------------------------------------------
# digits and synthetic


def test_digits_splits_cover_everything_stratified():
  splits = [sources.get_source(_data(source="digits"), r) for r in ("train", "val", "test")]
  assert sum(len(s) for s in splits) == 1797
  assert [len(s) for s in splits] == [1078, 359, 360]
  for s in splits:
    assert set(s.labels) == set(range(10)) and s.class_names[9] == "9"
  image, _ = splits[0].read(0)
  assert image.shape == (8, 8, 1) and image.dtype == np.uint8 and image.max() <= 255
  with pytest.raises(DataError, match=r"no split 'holdout'.*\['train', 'val', 'test'\]"):
    sources.get_source(_data(source="digits", test_split="holdout"), "test")


def test_synthetic_is_deterministic_with_exact_lesion_masks():
  cfg = dict(num_examples=20, image_size=16, channels=3, anomaly_fraction=0.25)
  test = sources.get_source(_data(source="synthetic", synthetic=cfg), "test")
  assert test.class_names == ("normal", "anomalous") and test.has_masks
  assert test.labels.sum() == 5
  for i in range(len(test)):
    image, mask = test.read(i)
    again, _ = test.read(i)
    np.testing.assert_array_equal(image, again)
    assert image.shape == (16, 16, 3) and image.dtype == np.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    normal, _ = sources._synthetic_example("test", i, 16, 3, anomalous=False)
    changed = np.any(image != normal, axis=-1)
    np.testing.assert_array_equal(mask[..., 0].astype(bool), changed)
    assert mask.any() == bool(test.labels[i])
  train = sources.get_source(_data(source="synthetic", synthetic=cfg), "train")
  assert train.labels.sum() == 0 and not train.read(0)[1].any()
  assert not np.array_equal(train.read(0)[0], test.read(0)[0])


# ----------------------------------------------------------------------------------
# one class rule for every source: numeric names sort by value, a name selects itself


def _selected(source, selector):
  """The ids of the images data.anomalous_classes=(selector,) marks anomalous."""
  from jaxad.data import pipeline
  data = _data(normal_classes=(), anomalous_classes=(selector,))
  split = pipeline.Split(source, pipeline.normal_labels(source, data))
  return sorted(source.ids[split.anomalous == 1])


NUMBERED = tuple(str(k) for k in range(12))


@pytest.mark.parametrize("selector", [9, "9"], ids=["int", "str"])
def test_csv_numeric_label_column_selects_class_9(tmp_path, selector):
  """Labels 0..11 in a label column: names sort by value, and 9 or '9' is class 9 (it
  was '7': the names sorted as strings, '0', '1', '10', '11', '2', ...)."""
  rows = []
  for k in range(12):
    for j in range(2):
      _save(str(tmp_path / f"images/c{k}_{j}.png"), _gray(k))
      rows.append([f"c{k}_{j}", str(k)])
  _write_csv(str(tmp_path / "labels.csv"), ["image", "label"], rows)
  source = sources.get_source(_data(source="csv", path=str(tmp_path / "labels.csv"),
                                    image_dir=str(tmp_path / "images"), image_ext=".png",
                                    label_column="label"), "train")
  assert _selected(source, selector) == ["c9_0.png", "c9_1.png"]
  assert source.class_names == NUMBERED
  assert [source.class_names[i] for i in source.labels] == [r[1] for r in rows]


@pytest.mark.parametrize("selector", [9, "9"], ids=["int", "str"])
def test_folder_numbered_class_folders_select_class_9(tmp_path, selector):
  for k in range(12):
    _save(str(tmp_path / f"train/{k}/a.png"), _gray(k))
  _save(str(tmp_path / "test/10/b.png"), _gray(10))  # names come from every split
  source = sources.get_source(_data(path=str(tmp_path)), "train")
  assert _selected(source, selector) == ["9/a.png"]
  assert source.class_names == NUMBERED
  assert source.read(list(source.ids).index("9/a.png"))[0][0, 0, 0] == 9


def test_class_selectors_by_name_then_index():
  def source(*names):
    return sources.Source(name="t", class_names=names, labels=np.zeros(0, np.int32),
                          ids=np.zeros(0, str), groups=None, has_masks=False,
                          spatial_ndim=2, reader=lambda i: None)
  assert sources.sorted_class_names({"b", "10", "9"}) == ("10", "9", "b")  # strings
  assert sources.sorted_class_names({"10", "09", "2"}) == ("2", "09", "10")
  # 1-based numeric labels: the int is the name, not the index.
  np.testing.assert_array_equal(sources.resolve_classes(source("1", "2", "3"), [1, "3"]),
                                [0, 2])
  np.testing.assert_array_equal(sources.resolve_classes(source("08", "09", "10"), 9), [1])
  # Not a name: an index, as before.
  np.testing.assert_array_equal(sources.resolve_classes(source("cat", "dog"), [1]), [1])
  with pytest.raises(ConfigError, match=r"class 9 is ambiguous.*\['9', '09'\].*string"):
    sources.resolve_classes(source("9", "09"), [9])


# ----------------------------------------------------------------------------------
# CSV ids stay inside data.image_dir


@pytest.mark.parametrize("bad_id", ["../outside.png", "sub/../../outside.png", "ABS"])
def test_csv_ids_outside_the_image_dir_are_refused(tmp_path, bad_id):
  _save(str(tmp_path / "outside.png"), _gray(1))  # exists: the old code read it
  _save(str(tmp_path / "data/images/ok.png"), _gray(2))
  (tmp_path / "data/images/sub").mkdir()
  if bad_id == "ABS":
    bad_id = str(tmp_path / "outside.png")
  _write_csv(str(tmp_path / "data/labels.csv"), ["image", "dx"],
             [["ok.png", "nv"], [bad_id, "mel"]])
  data = _data(source="csv", path=str(tmp_path / "data/labels.csv"),
               image_dir=str(tmp_path / "data/images"), label_column="dx")
  with pytest.raises(DataError) as e:
    sources.get_source(data, "train")
  message = str(e.value)
  assert message.startswith(f"{tmp_path / 'data/labels.csv'} line 3: image id {bad_id!r}")
  assert "outside data.image_dir" in message and "'outside.png'" in message


# ----------------------------------------------------------------------------------
# npz labels must be class indices


@pytest.mark.parametrize("labels, problem", [
    (np.array([["nv"], ["mel"], ["nv"]]), r"train_labels has dtype <U3 \(e.g. 'nv'\)"),
    (np.array([0.0, 0.5, 1.0], np.float32), r"train_labels \(float32\) holds 0.5"),
    (np.array([0.0, np.nan, 1.0]), r"train_labels \(float64\) holds nan"),
    (np.array([[0], [-1], [1]], np.int64), r"train_labels holds the label -1"),
])
def test_npz_labels_that_are_not_class_indices_are_named(tmp_path, labels, problem):
  path = tmp_path / "m.npz"
  np.savez(path, train_images=np.zeros((3, 28, 28), np.uint8), train_labels=labels,
           test_images=np.zeros((1, 28, 28), np.uint8),
           test_labels=np.zeros((1, 1), np.uint8))
  for split in ("train", "test"):  # every split's labels count for the class names
    with pytest.raises(DataError, match=f"m.npz: {problem}.*class ind"):
      sources.get_source(_data(source="npz", path=str(path)), split)


def test_npz_whole_float_labels_are_class_indices(tmp_path):
  data = _npz(tmp_path / "m.npz", train_images=np.zeros((3, 28, 28), np.uint8),
              train_labels=np.array([[0.0], [2.0], [1.0]]))
  train = sources.get_source(data, "train")
  np.testing.assert_array_equal(train.labels, [0, 2, 1])
  assert train.class_names == ("0", "1", "2")


def test_npz_float_blocks_cover_every_image_once_and_follow_subsets(tmp_path):
  """Source.blocks (the pipeline's vectorised pixel check) serves what `read` serves."""
  rng = np.random.default_rng(0)
  images = rng.random((300, 28, 28, 4)).astype(np.float64)  # alpha dropped, float32
  data = _npz(tmp_path / "f.npz", train_images=images,
              train_labels=np.zeros(300, np.uint8))
  train = sources.get_source(data, "train")
  for source in (train, train.subset([250, 3, 17], "sub")):
    seen = {}
    for indices, block in source.blocks():
      assert block.dtype == np.float32 and block.shape[1:] == (28, 28, 3)
      seen.update(zip(indices.tolist(), block))
    assert sorted(seen) == list(range(len(source)))
    for i in range(len(source)):
      np.testing.assert_array_equal(seen[i], source.read(i)[0])
  uint8 = _npz(tmp_path / "u.npz", train_images=np.zeros((2, 4, 4), np.uint8),
               train_labels=np.zeros(2, np.uint8))
  assert sources.get_source(uint8, "train").blocks is None  # nothing to check


def test_concatenate_joins_two_splits_of_one_dataset(tmp_path):
  """base.concatenate (validation + anomalies moved from test): reader, ids, labels,
  masks and the pixel-check blocks of both parts, in order."""
  rng = np.random.default_rng(1)
  data = _npz(tmp_path / "f.npz", val_images=rng.random((5, 4, 4)).astype(np.float32),
              val_labels=np.zeros(5, np.uint8),
              test_images=rng.random((7, 4, 4)).astype(np.float32),
              test_labels=np.arange(7, dtype=np.uint8) % 2,
              test_masks=np.ones((7, 4, 4), np.uint8))
  val, test = sources.get_source(data, "val"), sources.get_source(data, "test")
  part = test.subset([6, 1, 3])
  joined = sources.base.concatenate(val, part, "joined")
  assert len(joined) == 8 and joined.name == "joined" and joined.groups is None
  assert list(joined.ids) == [*(f"val/{i}" for i in range(5)), "test/6", "test/1", "test/3"]
  np.testing.assert_array_equal(joined.labels, [0] * 5 + [0, 1, 1])
  assert joined.labels.dtype == np.int32 and not joined.has_masks  # val has none
  for i, (source, j) in enumerate([(val, k) for k in range(5)] + [(part, k) for k in range(3)]):
    np.testing.assert_array_equal(joined.read(i)[0], source.read(j)[0])
  seen = {}
  for indices, block in joined.blocks():
    seen.update(zip(indices.tolist(), block))
  assert sorted(seen) == list(range(8))
  for i in range(8):
    np.testing.assert_array_equal(seen[i], joined.read(i)[0])
  with pytest.raises(DataError, match="out of range"):
    joined.read(8)
  both = sources.base.concatenate(test.subset([0]), part, "both")  # masks on each side
  assert both.has_masks and both.read(2)[1].shape == (4, 4, 1) and both.read(2)[1].all()
  other = dataclasses.replace(part, class_names=("a", "b", "c"))
  with pytest.raises(DataError, match="must come from one dataset"):
    sources.base.concatenate(val, other, "x")
  grouped = dataclasses.replace(part, groups=np.array(["p", "q", "p"]))
  with pytest.raises(DataError, match="only one has groups.*data.group_column"):
    sources.base.concatenate(val, grouped, "x")
