"""`python -m jaxad.data.prepare`: shipped files in, npz files jaxad's `npz` source reads out.

Inputs are written as they ship: idx files byte for byte (big-endian magic and dims,
then the pixels), gzip'd like the downloads; MedMNIST files with their real keys, uint8
images, uint8 N×1 (ChestMNIST N×14) labels, saved with np.savez_compressed. No network.
"""

import gzip
import hashlib
import importlib.util
import io
import math
import os
import pathlib
import struct
import subprocess
import sys
import types
import zipfile

import numpy as np
import pytest

from jaxad import defaults
from jaxad.data import pipeline, prepare
from jaxad.errors import ConfigError, DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_TRAIN, N_TEST = 250, 60
LAYOUTS = {  # how the four files may be named: the downloads, gunzipped, an old mirror
    "gz": ("{stem}-idx{n}-ubyte.gz", True),
    "raw": ("{stem}-idx{n}-ubyte", False),
    "dotted": ("{stem}.idx{n}-ubyte", False),
}


def _idx(array: np.ndarray, magic: int) -> bytes:
  """An idx file's bytes: magic, each dim (big-endian uint32), then the uint8 data."""
  return (struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
          + array.astype(np.uint8).tobytes())


def _digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """n random 28×28 uint8 images whose first two pixels spell their index, and labels."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
  images[:, 0, 0], images[:, 0, 1] = np.arange(n) % 256, np.arange(n) // 256
  return images, rng.integers(0, 10, n).astype(np.uint8)


def _index_of(images: np.ndarray) -> np.ndarray:
  images = images.reshape(len(images), 28, 28).astype(np.int64)
  return images[:, 0, 0] + 256 * images[:, 0, 1]


@pytest.fixture(scope="module")
def mnist():
  return {"train": _digits(N_TRAIN, 0), "test": _digits(N_TEST, 1)}


def _write_idx_dir(folder: pathlib.Path, mnist: dict, layout: str = "gz",
                   change=None) -> pathlib.Path:
  """The four idx files in `folder`; `change(name, bytes) -> bytes | None` alters one
  (None: leave it out)."""
  pattern, gz = LAYOUTS[layout]
  folder.mkdir(parents=True, exist_ok=True)
  for split, stem in (("train", "train"), ("test", "t10k")):
    images, labels = mnist[split]
    for kind, n, array, magic in (("images", 3, images, 0x803), ("labels", 1, labels, 0x801)):
      name = pattern.format(stem=f"{stem}-{kind}", n=n)
      data = _idx(array, magic)
      data = change(name, data) if change else data
      if data is None:
        continue
      (folder / name).write_bytes(gzip.compress(data, mtime=0) if gz else data)
  return folder


def _mnist_config(path: str):
  """configs/mnist_vae.py pointed at the npz, reading its val_* part."""
  spec = importlib.util.spec_from_file_location("mnist_vae", os.path.join(ROOT, "configs",
                                                                          "mnist_vae.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.data.source, c.data.path, c.data.val_split = "npz", path, "val"
  return c


def _read_all(split: pipeline.Split) -> np.ndarray:
  return np.stack([split.source.read(i)[0] for i in range(len(split.source))])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, mnist):
  folder = tmp_path_factory.mktemp("mnist")
  src = _write_idx_dir(folder / "src", mnist)
  out = str(folder / "mnist.npz")
  result = prepare.prepare_mnist(str(src), out, val_fraction=0.2, seed=3)
  return src, out, result


def test_idx_header_is_parsed_byte_for_byte(tmp_path):
  raw = bytes.fromhex("00000803 00000002 00000001 00000003") + bytes(range(1, 7))
  (tmp_path / "x").write_bytes(raw)
  np.testing.assert_array_equal(prepare.read_idx(str(tmp_path / "x"), 0x803),
                                [[[1, 2, 3]], [[4, 5, 6]]])
  (tmp_path / "y.gz").write_bytes(gzip.compress(bytes.fromhex("00000801 00000003 070809")))
  np.testing.assert_array_equal(prepare.read_idx(str(tmp_path / "y.gz"), 0x801), [7, 8, 9])


def test_mnist_round_trip_through_the_npz_source(prepared, mnist):
  _, out, result = prepared
  config = _mnist_config(out)
  splits = {role: pipeline.load_split(config.data, role) for role in ("train", "val", "test")}
  taken = {}
  for role, split in splits.items():
    images = _read_all(split)
    assert images.dtype == np.uint8 and images.shape[1:] == (28, 28, 1)
    source_split = "test" if role == "test" else "train"
    want_images, want_labels = mnist[source_split]
    index = _index_of(images)
    taken[role] = index
    np.testing.assert_array_equal(images[..., 0], want_images[index])
    np.testing.assert_array_equal(split.source.labels, want_labels[index])
    assert split.source.class_names == tuple(str(i) for i in range(10))
    np.testing.assert_array_equal(split.anomalous, (want_labels[index] == 9))
    assert result["counts"][role] == len(index)
  np.testing.assert_array_equal(taken["test"], np.arange(N_TEST))  # the official test set
  train, val = taken["train"], taken["val"]
  assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)  # original order kept
  assert not set(train) & set(val) and len(train) + len(val) == N_TRAIN  # disjoint, complete
  labels = mnist["train"][1]
  assert len(val) == math.floor(0.2 * N_TRAIN + 0.5)
  for c in range(10):  # stratified: each class within one image of its share
    assert abs(np.sum(labels[val] == c) - 0.2 * np.sum(labels == c)) < 1


def test_same_files_any_spelling_same_bytes_and_seed_decides_val(prepared, mnist, tmp_path):
  _, out, _ = prepared
  want = pathlib.Path(out).read_bytes()
  for layout in ("raw", "dotted"):
    src = _write_idx_dir(tmp_path / layout, mnist, layout)
    prepare.prepare_mnist(str(src), str(tmp_path / f"{layout}.npz"), val_fraction=0.2, seed=3)
    assert (tmp_path / f"{layout}.npz").read_bytes() == want
  src = str(tmp_path / "raw")
  prepare.prepare_mnist(src, str(tmp_path / "seed4.npz"), val_fraction=0.2, seed=4)
  with np.load(out) as a, np.load(tmp_path / "seed4.npz") as b:
    assert len(a["val_images"]) == len(b["val_images"])
    assert not np.array_equal(_index_of(a["val_images"]), _index_of(b["val_images"]))
  prepare.prepare_mnist(src, str(tmp_path / "none.npz"), dataset="fashion_mnist",
                        val_fraction=0.0)
  with np.load(tmp_path / "none.npz") as f:
    assert "val_images" not in f and len(f["train_images"]) == N_TRAIN
    assert f["train_labels"].dtype == np.uint8 and f["train_labels"].shape == (N_TRAIN, 1)
    assert list(f["class_names"])[:2] == ["T-shirt/top", "Trouser"]


def _cut(n):
  return lambda data: data[:-n]


CORRUPTIONS = {  # file changed → words the error must contain
    "swapped": ("train-images-idx3-ubyte.gz", lambda data: _idx(np.zeros(3), 0x801),
                "a labels file"),
    "truncated": ("train-images-idx3-ubyte.gz", _cut(100), "truncated"),
    "header": ("t10k-labels-idx1-ubyte.gz", lambda data: data[:6], "truncated inside"),
    "trailing": ("t10k-images-idx3-ubyte.gz", lambda data: data + b"\0" * 5, "5 bytes after"),
    "html": ("t10k-images-idx3-ubyte.gz", lambda data: b"<!DOCTYPE html>", "not an idx file"),
    "count": ("train-labels-idx1-ubyte.gz",
              lambda data: _idx(np.zeros(N_TRAIN - 1), 0x801), "249 labels"),
    "label": ("train-labels-idx1-ubyte.gz",
              lambda data: _idx(np.full(N_TRAIN, 10), 0x801), "label 10"),
    "missing": ("t10k-labels-idx1-ubyte.gz", lambda data: None, "put the four idx files"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS) + ["bad_gzip"])
def test_damaged_idx_files_name_the_file_and_write_nothing(tmp_path, mnist, case):
  if case == "bad_gzip":  # a download cut short: gzip's end-of-stream marker is missing
    src = _write_idx_dir(tmp_path / "src", mnist)
    path = src / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:2000])
    name, words = path.name, "not a complete gzip file"
  else:
    name, change, words = CORRUPTIONS[case]
    src = _write_idx_dir(tmp_path / "src", mnist,
                         change=lambda n, data: change(data) if n == name else data)
  with pytest.raises(DataError) as e:
    prepare.prepare_mnist(str(src), str(tmp_path / "out.npz"))
  assert name.split("-idx")[0] in str(e.value) and words in str(e.value), str(e.value)
  assert ("re-download" in str(e.value) or "--src" in str(e.value)
          or "check" in str(e.value))
  assert not (tmp_path / "out.npz").exists()
  assert [p.name for p in tmp_path.iterdir()] == ["src"]  # no temporary file left


def test_cli_writes_the_same_file_and_refuses_to_overwrite(prepared):
  src, out, _ = prepared
  target = os.path.join(os.path.dirname(out), "cli.npz")
  args = [sys.executable, "-m", "jaxad.data.prepare", "--dataset=mnist", f"--src={src}",
          f"--out={target}", "--val_fraction=0.2", "--seed=3"]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
  assert done.returncode == 0, done.stderr[-2000:]
  assert f"wrote {target}: train 200, val 50, test 60 images of 28×28 uint8" in done.stdout
  assert pathlib.Path(target).read_bytes() == pathlib.Path(out).read_bytes()
  again = subprocess.run(args + ["--flag=pathmnist"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
  assert again.returncode == 1 and "Traceback" not in again.stderr
  assert again.stderr.strip().splitlines() == [
      "error: --flag only apply to --dataset=medmnist: remove it"], again.stderr
  with pytest.raises(ConfigError, match="exists: pass --overwrite"):
    prepare.prepare_mnist(str(src), target)
  prepare.prepare_mnist(str(src), target, overwrite=True)  # the default 10%
  with np.load(target) as f:
    assert len(f["val_labels"]) == 25


# --- MedMNIST -------------------------------------------------------------------------

COUNTS = {"train": 20, "val": 6, "test": 8}


def _medmnist_file(path: pathlib.Path, image_shape, label_width=1, num_classes=2,
                   seed=0) -> dict:
  """A file as MedMNIST ships it: uint8 images, uint8 labels N×1 (N×14 multi-label)."""
  rng = np.random.default_rng(seed)
  arrays = {}
  for split, n in COUNTS.items():
    arrays[f"{split}_images"] = rng.integers(0, 256, (n, *image_shape), dtype=np.uint8)
    if label_width == 1:
      labels = rng.integers(0, num_classes, (n, 1))
    else:
      labels = (rng.random((n, label_width)) < 0.08)
    arrays[f"{split}_labels"] = labels.astype(np.uint8)
  np.savez_compressed(path, **arrays)
  return arrays


@pytest.fixture
def no_medmnist(monkeypatch):
  """As on this machine: the medmnist package is not installed."""
  monkeypatch.setitem(sys.modules, "medmnist", None)


def _npz_data(path, **overrides):
  data = defaults.get_config().data
  data.source, data.path, data.normal_classes = "npz", str(path), (0,)
  for key, value in overrides.items():
    data[key] = value
  return data


def test_downloaded_medmnist_file_loads(tmp_path, no_medmnist):
  src = tmp_path / "pneumoniamnist_64.npz"
  arrays = _medmnist_file(src, (64, 64))
  result = prepare.prepare_medmnist(str(tmp_path / "p.npz"), src=str(src))  # flag, size
  assert result["image_shape"] == (64, 64) and result["class_names"] is None
  data = _npz_data(tmp_path / "p.npz", image_size=64)
  for split in ("train", "val", "test"):
    loaded = pipeline.load_split(data, split)
    np.testing.assert_array_equal(_read_all(loaded)[..., 0], arrays[f"{split}_images"])
    np.testing.assert_array_equal(loaded.source.labels, arrays[f"{split}_labels"][:, 0])
  prepare.prepare_medmnist(str(tmp_path / "c.npz"), src=str(src), compress=True)
  with zipfile.ZipFile(tmp_path / "p.npz") as a, zipfile.ZipFile(tmp_path / "c.npz") as b:
    assert {i.compress_type for i in a.infolist()} == {zipfile.ZIP_STORED}
    assert {i.compress_type for i in b.infolist()} == {zipfile.ZIP_DEFLATED}
  with np.load(tmp_path / "p.npz") as p, np.load(tmp_path / "c.npz") as c:
    assert sorted(p) == sorted(c) == sorted(arrays)
    for key in arrays:
      np.testing.assert_array_equal(p[key], arrays[key])
      np.testing.assert_array_equal(c[key], arrays[key])


def test_rgb_and_3d_files_keep_their_shape(tmp_path, no_medmnist):
  rgb = _medmnist_file(tmp_path / "dermamnist.npz", (28, 28, 3), num_classes=7)
  cubes = _medmnist_file(tmp_path / "nodulemnist3d.npz", (28, 28, 28))
  prepare.prepare_medmnist(str(tmp_path / "d.npz"), src=str(tmp_path / "dermamnist.npz"))
  prepare.prepare_medmnist(str(tmp_path / "n.npz"), src=str(tmp_path / "nodulemnist3d.npz"))
  d = pipeline.load_split(_npz_data(tmp_path / "d.npz", channels=3, image_size=28,
                                    normal_classes=("*",)), "val")
  n = pipeline.load_split(_npz_data(tmp_path / "n.npz", image_size=28), "test")
  assert d.source.spatial_ndim == 2 and n.source.spatial_ndim == 3
  np.testing.assert_array_equal(_read_all(d), rgb["val_images"])
  np.testing.assert_array_equal(_read_all(n)[..., 0], cubes["test_images"])


def test_multi_label_chestmnist_needs_a_choice(tmp_path, no_medmnist):
  src = tmp_path / "chestmnist.npz"
  arrays = _medmnist_file(src, (28, 28), label_width=14)
  with pytest.raises(DataError, match="multi-label .*--multi_label=any"):
    prepare.prepare_medmnist(str(tmp_path / "x.npz"), src=str(src))
  assert not (tmp_path / "x.npz").exists()
  result = prepare.prepare_medmnist(str(tmp_path / "x.npz"), src=str(src), multi_label="any")
  assert result["class_names"] == ["normal", "abnormal"]
  data = _npz_data(tmp_path / "x.npz", normal_classes=("normal",), image_size=28)
  test = pipeline.load_split(data, "test")
  want = arrays["test_labels"].any(axis=1)
  assert 0 < want.sum() < len(want)
  np.testing.assert_array_equal(test.anomalous, want)


@pytest.mark.parametrize("case", ["missing_key", "float_images", "wrong_size", "labels",
                                  "not_zip", "short_member"])
def test_bad_medmnist_files_are_named(tmp_path, no_medmnist, case):
  src = tmp_path / "breastmnist.npz"
  arrays = _medmnist_file(src, (28, 28))
  kwargs, words = {}, {"missing_key": "lacks ['test_labels']", "float_images": "float32",
                       "wrong_size": "uint8 N×64×64", "labels": "val_labels is",
                       "not_zip": "not an .npz archive",
                       "short_member": "array val_images holds"}[case]
  if case == "missing_key":
    del arrays["test_labels"]
  elif case == "float_images":
    arrays["train_images"] = arrays["train_images"].astype(np.float32)
  elif case == "wrong_size":
    kwargs = {"size": 64}
  elif case == "labels":
    arrays["val_labels"] = arrays["val_labels"][:-1]
  if case == "not_zip":
    src.write_bytes(b"<html>not found</html>")
  elif case == "short_member":  # the npy header promises more pixels than the member has
    with zipfile.ZipFile(src, "w", zipfile.ZIP_DEFLATED) as zf:
      for key, array in arrays.items():
        buffer = io.BytesIO()
        np.save(buffer, array)
        data = buffer.getvalue()
        zf.writestr(f"{key}.npy", data[:-100] if key == "val_images" else data)
  else:
    np.savez_compressed(src, **arrays)
  with pytest.raises(DataError, match="re-download|--flag") as e:
    prepare.prepare_medmnist(str(tmp_path / "o.npz"), src=str(src), **kwargs)
  assert words in str(e.value) and str(src) in str(e.value), str(e.value)
  assert not (tmp_path / "o.npz").exists()


def test_flags_are_checked_and_missing_medmnist_says_what_to_do(tmp_path, no_medmnist):
  with pytest.raises(ConfigError, match="not a MedMNIST dataset.*pneumoniamnist"):
    prepare.prepare_medmnist(str(tmp_path / "o.npz"), flag="pneumonia")
  with pytest.raises(ConfigError, match=r"ships at sizes \(28, 64\)"):
    prepare.prepare_medmnist(str(tmp_path / "o.npz"), flag="nodulemnist3d", size=128)
  with pytest.raises(DataError) as e:
    prepare.prepare_medmnist(str(tmp_path / "o.npz"), flag="pneumoniamnist", size=64)
  message = str(e.value)
  assert "pip install --no-deps 'medmnist>=3'" in message and "--src=FILE" in message
  assert "zenodo.org/records/10519652" in message
  assert not (tmp_path / "o.npz").exists()


def _fake_medmnist(monkeypatch, url: str, md5: str):
  """The medmnist package's INFO row for pneumoniamnist at 64 (the real keys), its URL
  pointing at a local file: the download, checksum and names run for real."""
  module = types.ModuleType("medmnist")
  module.INFO = {"pneumoniamnist": {
      "python_class": "PneumoniaMNIST", "url_64": url, "MD5_64": md5,
      "task": "binary-class", "label": {"0": "normal", "1": "pneumonia"},
      "n_channels": 1, "n_samples": dict(COUNTS), "license": "CC BY 4.0"}}
  monkeypatch.setitem(sys.modules, "medmnist", module)


def test_download_checks_the_md5_and_is_reused(tmp_path, monkeypatch):
  shipped = tmp_path / "zenodo" / "pneumoniamnist_64.npz"
  shipped.parent.mkdir()
  arrays = _medmnist_file(shipped, (64, 64))
  cache = tmp_path / "cache"
  _fake_medmnist(monkeypatch, shipped.as_uri(), "0" * 32)
  with pytest.raises(DataError, match="wrong MD5"):
    prepare.prepare_medmnist(str(tmp_path / "o.npz"), flag="pneumoniamnist", size=64,
                             cache_dir=str(cache))
  assert not (tmp_path / "o.npz").exists() and not any(cache.iterdir())
  md5 = hashlib.md5(shipped.read_bytes()).hexdigest()
  _fake_medmnist(monkeypatch, shipped.as_uri(), md5)
  result = prepare.prepare_medmnist(str(tmp_path / "o.npz"), flag="pneumoniamnist",
                                    size=64, cache_dir=str(cache))
  assert (cache / "pneumoniamnist_64.npz").read_bytes() == shipped.read_bytes()
  assert result["class_names"] == ["normal", "pneumonia"]
  shipped.unlink()  # a second run reads the cached copy
  prepare.prepare_medmnist(str(tmp_path / "o2.npz"), flag="pneumoniamnist", size=64,
                           cache_dir=str(cache))
  assert (tmp_path / "o2.npz").read_bytes() == (tmp_path / "o.npz").read_bytes()
  data = _npz_data(tmp_path / "o.npz", normal_classes=("normal",), image_size=64)
  train = pipeline.load_split(data, "train")
  assert train.source.class_names == ("normal", "pneumonia")
  np.testing.assert_array_equal(train.source.labels, arrays["train_labels"][:, 0])
  _fake_medmnist(monkeypatch, (tmp_path / "gone.npz").as_uri(), md5)
  with pytest.raises(DataError, match="cannot download .*--src=PATH/pneumoniamnist_64.npz"):
    prepare.prepare_medmnist(str(tmp_path / "o3.npz"), flag="pneumoniamnist", size=64,
                             cache_dir=str(tmp_path / "empty"))
