r"""Builds the .npz files jaxad's `npz` source reads, from datasets as they are shipped.

  python -m jaxad.data.prepare --dataset=mnist --src=DIR --out=mnist.npz \
      [--val_fraction=0.1] [--seed=0]
  python -m jaxad.data.prepare --dataset=fashion_mnist --src=DIR --out=fashion_mnist.npz
  python -m jaxad.data.prepare --dataset=medmnist --flag=pneumoniamnist --size=64 \
      --out=pneumonia64.npz [--src=pneumoniamnist_64.npz]

MNIST and Fashion-MNIST: DIR holds the four idx files as downloaded
(`train-images-idx3-ubyte.gz`, `train-labels-idx1-ubyte.gz`, `t10k-images-idx3-ubyte.gz`,
`t10k-labels-idx1-ubyte.gz`), gzip'd or unpacked, also spelt `train-images.idx3-ubyte`.
They are parsed here (big-endian magic 0x00000803 + dims for images, 0x00000801 for
labels) and checked: magic numbers, image and label counts, truncated files. The
validation part is drawn from train, stratified by class (`val_fraction` of each class,
largest remainders so that the total is round(val_fraction × N)), by a permutation
seeded with `seed`; test is the official test set.

MedMNIST: a file as the MedMNIST team ships it (`{flag}.npz` at 28, `{flag}_{size}.npz`
otherwise), given with --src or downloaded into --cache_dir with the URL and MD5 of the
`medmnist` package's INFO table (only that table is used: `pip install --no-deps
'medmnist>=3'` is enough; it is imported only here). Its keys, dtypes and shapes are
checked, the official splits kept, RGB kept; multi-label ChestMNIST becomes normal (no
finding) vs abnormal with --multi_label=any.

The output is the MedMNIST layout: `{train,val,test}_images` uint8 (N×H×W, N×H×W×3 or
N×D×H×W), `{split}_labels` uint8 N×1 and `class_names` (str) when the names are known.
Members are stored uncompressed (jaxad reads them in place; --compress deflates them,
and jaxad then inflates each array into $TMPDIR when it loads). MedMNIST images are
streamed member to member, so memory stays flat at any size. The file is written
atomically, never over an existing one without --overwrite, and the same inputs and
flags give the same bytes.
"""

import contextlib
import dataclasses
import gzip
import hashlib
import http.client
import io
import logging
import math
import os
import re
import shutil
import struct
import urllib.request
import zipfile
import zlib

import numpy as np
from absl import flags

from jaxad import cli, files
from jaxad.errors import ConfigError, DataError

log = logging.getLogger("jaxad")

IDX_IMAGES, IDX_LABELS = 0x00000803, 0x00000801  # ubyte data with 3 dims / 1 dim
_IDX_KINDS = {IDX_IMAGES: "an images file", IDX_LABELS: "a labels file"}
_IDX_STEMS = {"train": ("train-images", "train-labels"), "test": ("t10k-images", "t10k-labels")}
CLASS_NAMES = {
    "mnist": tuple(str(i) for i in range(10)),
    "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                      "Shirt", "Sneaker", "Bag", "Ankle boot"),  # tfds's names, in order
}
MEDMNIST_2D = ("pathmnist", "chestmnist", "dermamnist", "octmnist", "pneumoniamnist",
               "retinamnist", "breastmnist", "bloodmnist", "tissuemnist", "organamnist",
               "organcmnist", "organsmnist")
MEDMNIST_3D = ("organmnist3d", "nodulemnist3d", "adrenalmnist3d", "fracturemnist3d",
               "vesselmnist3d", "synapsemnist3d")
SIZES_2D, SIZES_3D = (28, 64, 128, 224), (28, 64)
MEDMNIST_RECORD = "https://zenodo.org/records/10519652"  # MedMNIST v3 (MedMNIST+) files
MEDMNIST_INSTALL = "pip install --no-deps 'medmnist>=3'"  # only its INFO table is used
SPLITS = ("train", "val", "test")
MULTI_LABEL_NAMES = ("normal", "abnormal")  # --multi_label=any: no finding / any finding
CHUNK_BYTES = 1 << 20
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed member times: same inputs, same bytes
_ZIP64_MARGIN = 1 << 20  # npy header and rounding, below zipfile's 2 GiB member limit


# --- output ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MemberCopy:
  """The member `name` (an .npy) of the .npz archive `path`, copied byte for byte."""
  path: str
  name: str
  size: int  # uncompressed bytes


def check_out(out: str, overwrite: bool, src: str = "") -> None:
  """Refuses a missing --out, a folder, an existing file (without `overwrite`) or src."""
  if not out:
    raise ConfigError("--out is required: the .npz file to write (e.g. --out=mnist.npz)")
  if os.path.isdir(out):
    raise ConfigError(f"--out={out} is a folder: give the .npz file to write")
  if src and os.path.exists(src) and os.path.realpath(src) == os.path.realpath(out):
    raise ConfigError(f"--out={out} is the input file itself: write to another path")
  if os.path.exists(out) and not overwrite:
    raise ConfigError(f"{out} exists: pass --overwrite to replace it, or choose "
                      "another --out")


def write_npz(path: str, members: dict, compress: bool = False) -> None:
  """Writes `members` (name → array or MemberCopy) as an .npz archive, atomically."""
  with files.atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", allowZip64=True) as zf:
    for name, value in members.items():
      info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_TIME)
      info.compress_type = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
      info.external_attr = 0o644 << 16
      if isinstance(value, MemberCopy):
        _copy_member(zf, info, value)
      else:
        array = np.asarray(value)
        big = array.nbytes > zipfile.ZIP64_LIMIT - _ZIP64_MARGIN
        with zf.open(info, "w", force_zip64=big) as dst:
          np.lib.format.write_array(dst, array, allow_pickle=False)


def _copy_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, member: MemberCopy) -> None:
  """Streams `member` into `zf` as `info`, 1 MiB at a time (flat memory at any size)."""
  big = member.size > zipfile.ZIP64_LIMIT - _ZIP64_MARGIN
  try:
    with zipfile.ZipFile(member.path) as source, \
        source.open(f"{member.name}.npy") as src, zf.open(info, "w", force_zip64=big) as dst:
      shutil.copyfileobj(src, dst, CHUNK_BYTES)
  except (zipfile.BadZipFile, zlib.error, EOFError) as e:
    raise DataError(f"cannot read {member.name} of {member.path} ({e}): the file is "
                    "damaged: re-download it") from None


# --- MNIST and Fashion-MNIST idx files -----------------------------------------------

def _read_bytes(path: str) -> bytes:
  """The file's bytes, gunzipped when it starts with gzip's magic (whatever its name)."""
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise DataError(f"cannot read {path} ({e.strerror}): check --src") from None
  if not raw.startswith(b"\x1f\x8b"):
    return raw
  try:
    return gzip.decompress(raw)
  except (OSError, EOFError, zlib.error) as e:
    raise DataError(f"{path} is not a complete gzip file ({e}): re-download it (or "
                    "gunzip a good copy and point --src at the unpacked files)") from None


def read_idx(path: str, magic: int) -> np.ndarray:
  """The uint8 array of an idx file (gzip'd or not) whose magic number must be `magic`."""
  raw = _read_bytes(path)
  got = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
  if got != magic:
    if got in _IDX_KINDS:
      fix = f"it is {_IDX_KINDS[got]}: check which file is which in --src"
    else:
      fix = ("not an idx file (an HTML page or a partial download?): re-download it")
    shown = "none (empty file)" if got is None else f"0x{got:08x}"
    raise DataError(f"{path}: magic number {shown}, expected 0x{magic:08x} "
                    f"({_IDX_KINDS[magic]}): {fix}")
  ndim = magic & 0xFF
  start = 4 + 4 * ndim
  if len(raw) < start:
    raise DataError(f"{path} is truncated inside its header: re-download it")
  dims = struct.unpack(f">{ndim}I", raw[4:start])
  want, have = math.prod(dims), len(raw) - start
  shape = "×".join(str(d) for d in dims)
  if have < want:
    raise DataError(f"{path} is truncated: its header says {shape} = {want} bytes of "
                    f"data but it holds {have}: re-download it")
  if have > want:
    raise DataError(f"{path} has {have - want} bytes after its {shape} data (a damaged "
                    "or concatenated file?): re-download it")
  return np.frombuffer(raw, np.uint8, count=want, offset=start).reshape(dims)


def find_idx_file(src: str, stem: str, ndim: int) -> str:
  """The path of idx file `stem` (e.g. 't10k-images') in `src`, in any shipped spelling."""
  names = [f"{stem}-idx{ndim}-ubyte", f"{stem}-idx{ndim}-ubyte.gz",
           f"{stem}.idx{ndim}-ubyte", f"{stem}.idx{ndim}-ubyte.gz"]
  for name in names:
    if os.path.isfile(os.path.join(src, name)):
      return os.path.join(src, name)
  raise DataError(f"{src} has no {names[1]} (nor {names[0]} or {names[2]}): put the four "
                  "idx files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
                  "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) in --src")


def load_idx_split(src: str, split: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  """(images N×H×W, labels N) of split 'train' or 'test', checked against each other."""
  image_path = find_idx_file(src, _IDX_STEMS[split][0], 3)
  label_path = find_idx_file(src, _IDX_STEMS[split][1], 1)
  images, labels = read_idx(image_path, IDX_IMAGES), read_idx(label_path, IDX_LABELS)
  if len(images) != len(labels):
    raise DataError(f"{image_path} holds {len(images)} images but {label_path} "
                    f"{len(labels)} labels: the files are of different sets or one is "
                    "damaged: re-download them")
  if labels.size and labels.max() >= num_classes:
    raise DataError(f"{label_path} holds the label {labels.max()}, but the dataset has "
                    f"{num_classes} classes (0..{num_classes - 1}): check --dataset, or "
                    "re-download the file")
  return images, labels


def _allocate(sizes: np.ndarray, fraction: float) -> np.ndarray:
  """How many of each class to hold out: fraction × size, rounded so that the total is
  round(fraction × sum) (largest remainders; ties to the lower class index)."""
  exact = sizes * fraction
  counts = np.floor(exact).astype(np.int64)
  extra = int(math.floor(fraction * sizes.sum() + 0.5)) - counts.sum()
  order = np.argsort(-(exact - counts), kind="stable")
  counts[order[:extra]] += 1
  return counts


def stratified_split(labels: np.ndarray, fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(train, val) sorted indices: `fraction` of each class held out, by a seeded draw."""
  if not 0 <= fraction < 1:
    raise ConfigError(f"--val_fraction={fraction} must be in [0, 1) (0: no val split)")
  rng = np.random.default_rng(seed)
  labels = np.asarray(labels).reshape(-1)
  members = [np.flatnonzero(labels == c) for c in np.unique(labels)]
  counts = _allocate(np.array([len(m) for m in members], np.int64), fraction)
  held = [rng.permutation(m)[:k] for m, k in zip(members, counts)]
  val = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
  return np.setdiff1d(np.arange(len(labels)), val), val


def prepare_mnist(src: str, out: str, *, dataset: str = "mnist", val_fraction: float = 0.1,
                  seed: int = 0, overwrite: bool = False, compress: bool = False) -> dict:
  """MNIST or Fashion-MNIST idx files in folder `src` → `out`; returns `summary`'s dict."""
  if dataset not in CLASS_NAMES:
    raise ConfigError(f"--dataset={dataset} has no idx reader; use one of "
                      f"{sorted(CLASS_NAMES)}")
  if not src or not os.path.isdir(src):
    raise ConfigError(f"--src={src!r} must be the folder that holds the {dataset} idx "
                      "files (train-images-idx3-ubyte.gz, ...)")
  check_out(out, overwrite)
  names = CLASS_NAMES[dataset]
  train_x, train_y = load_idx_split(src, "train", len(names))
  test_x, test_y = load_idx_split(src, "test", len(names))
  if train_x.shape[1:] != test_x.shape[1:]:
    raise DataError(f"train images in {src} are {train_x.shape[1:]} but test images "
                    f"{test_x.shape[1:]}: the files are of different datasets")
  train, val = stratified_split(train_y, val_fraction, seed)
  parts = {"train": (train_x[train], train_y[train]), "test": (test_x, test_y)}
  if len(val):
    parts["val"] = (train_x[val], train_y[val])
  members = {}
  for split in SPLITS:
    if split in parts:
      images, labels = parts[split]
      members[f"{split}_images"] = images
      members[f"{split}_labels"] = labels.astype(np.uint8).reshape(-1, 1)
  members["class_names"] = np.array(names)
  write_npz(out, members, compress)
  counts = {s: len(parts[s][1]) for s in SPLITS if s in parts}
  return summary(out, counts, train_x.shape[1:], names)


# --- MedMNIST -------------------------------------------------------------------------

def medmnist_file_name(flag: str, size: int) -> str:
  """The name MedMNIST ships a file under: `{flag}.npz` at 28, else `{flag}_{size}.npz`."""
  return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def parse_medmnist_name(path: str) -> tuple[str, int] | None:
  """(flag, size) from a shipped file name such as `pneumoniamnist_64.npz`, else None."""
  m = re.fullmatch(r"([a-z0-9]+?)(?:_(\d+))?\.npz", os.path.basename(path))
  if not m or m[1] not in MEDMNIST_2D + MEDMNIST_3D:
    return None
  return m[1], int(m[2] or 28)


def check_flag_and_size(flag: str, size: int) -> None:
  """A ConfigError unless `flag` is a MedMNIST dataset available at `size` (0: any)."""
  if flag not in MEDMNIST_2D + MEDMNIST_3D:
    raise ConfigError(f"--flag={flag!r} is not a MedMNIST dataset; 2D: "
                      f"{', '.join(MEDMNIST_2D)}; 3D: {', '.join(MEDMNIST_3D)}")
  sizes = SIZES_3D if flag in MEDMNIST_3D else SIZES_2D
  if size and size not in sizes:
    raise ConfigError(f"--size={size}: {flag} ships at sizes {sizes}")


def medmnist_info(required: bool) -> dict | None:
  """The `medmnist` package's INFO table; None (or, if `required`, a DataError saying
  how to install it) when the package is missing."""
  try:
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a hint without torch
      import medmnist
  except ImportError:
    if not required:
      return None
    raise DataError(f"downloading MedMNIST needs the medmnist package: {MEDMNIST_INSTALL} "
                    "(only its table of URLs and checksums is used), or download the "
                    f"file yourself from {MEDMNIST_RECORD} and pass --src=FILE") from None
  return medmnist.INFO


def _md5(path: str) -> str:
  digest = hashlib.md5()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
      digest.update(chunk)
  return digest.hexdigest()


def download_medmnist(flag: str, size: int, cache_dir: str, info: dict) -> str:
  """The path of `{flag}[_{size}].npz` in `cache_dir`, downloaded unless a copy with the
  right MD5 is there already; the MD5 is checked before the file appears."""
  suffix = "" if size == 28 else f"_{size}"
  entry = info.get(flag, {})
  url, md5 = entry.get(f"url{suffix}"), entry.get(f"MD5{suffix}")
  if not url:
    raise DataError(f"the installed medmnist package lists no {flag} file at size {size} "
                    "(sizes beyond 28 came with MedMNIST v3): pip install -U --no-deps "
                    f"'medmnist>=3', or download it from {MEDMNIST_RECORD}")
  name = medmnist_file_name(flag, size)
  path = os.path.join(os.path.expanduser(cache_dir), name)
  if os.path.isfile(path) and (not md5 or _md5(path) == md5):
    log.info("using %s (already downloaded)", path)
    return path
  log.info("downloading %s into %s", url, path)
  with files.atomic_path(path) as tmp:
    try:
      with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
        shutil.copyfileobj(response, f, CHUNK_BYTES)
    except (OSError, http.client.HTTPException) as e:  # URLError is an OSError
      reason = getattr(e, "reason", None) or e
      raise DataError(f"cannot download {url} ({reason}): offline? download {name} "
                      f"from {MEDMNIST_RECORD} by hand and pass --src=PATH/{name}") from None
    if md5 and _md5(tmp) != md5:
      raise DataError(f"the download of {url} has the wrong MD5 (expected {md5}): an "
                      "interrupted or altered download; run the command again")
  return path


def _member_headers(path: str) -> dict[str, tuple[tuple[int, ...], np.dtype, int]]:
  """name → (shape, dtype, uncompressed size) of every .npy member, reading only headers."""
  if not zipfile.is_zipfile(path):
    raise DataError(f"{path} is not an .npz archive: re-download it")
  headers = {}
  try:
    with zipfile.ZipFile(path) as zf:
      for info in zf.infolist():
        if not info.filename.endswith(".npy"):
          continue
        with zf.open(info) as f:
          version = np.lib.format.read_magic(f)
          shape, _, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                             else np.lib.format.read_array_header_2_0(f))
          data_bytes = info.file_size - f.tell()
        name = info.filename[:-len(".npy")]
        if dtype.hasobject or data_bytes != dtype.itemsize * math.prod(shape):
          raise DataError(f"{path}: array {name} holds {data_bytes} bytes but its header "
                          f"says {shape} {dtype}: a damaged file: re-download it")
        headers[name] = (tuple(shape), dtype, info.file_size)
  except DataError:
    raise
  except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
    raise DataError(f"cannot read the arrays of {path} ({e}): re-download it") from None
  return headers


def _images_fit(shape: tuple, flag: str, size: int | None, channels: int | None) -> bool:
  """Whether images of `shape` (N first) are what `flag` ships: N×S×S, N×S×S×3 (RGB) or,
  in 3D, N×S×S×S; S = size when known, and channels as INFO says when known."""
  if flag in MEDMNIST_3D:
    rank_ok, spatial = len(shape) == 4, shape[1:4]
  else:
    grey, rgb = len(shape) == 3, len(shape) == 4 and shape[3] == 3
    rank_ok = {1: grey, 3: rgb}.get(channels, grey or rgb)
    spatial = shape[1:3]
  return rank_ok and len(set(spatial)) == 1 and (size is None or spatial[0] == size)


def _check_images(path: str, split: str, shape: tuple, dtype: np.dtype, flag: str,
                  size: int | None, channels: int | None) -> None:
  """A DataError unless a split's images are uint8 and `_images_fit`."""
  if dtype == np.uint8 and _images_fit(shape, flag, size, channels):
    return
  side = str(size) if size else "S"
  want = ("×".join([side] * 3) if flag in MEDMNIST_3D
          else "×".join([side] * 2) + {1: "", 3: "×3"}.get(channels, "[×3]"))
  raise DataError(f"{path}: {split}_images is {dtype} of shape {shape}, but {flag} ships "
                  f"uint8 N×{want}: pass the file of this --flag and --size, or "
                  "re-download it")


def check_medmnist_file(path: str, flag: str, size: int | None,
                        entry: dict | None) -> dict:
  """Checks a shipped MedMNIST file's keys, dtypes and shapes (against `entry`, its
  INFO row, when known); returns `_member_headers`'s dict."""
  headers = _member_headers(path)
  wanted = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels")]
  missing = [k for k in wanted if k not in headers]
  if missing:
    raise DataError(f"{path} lacks {missing} (its arrays: {sorted(headers)}): a MedMNIST "
                    "file has train/val/test _images and _labels: re-download it")
  channels = entry.get("n_channels") if entry else None
  for split in SPLITS:
    shape, dtype, _ = headers[f"{split}_images"]
    _check_images(path, split, shape, dtype, flag, size, channels)
    label_shape, label_dtype, _ = headers[f"{split}_labels"]
    if label_dtype.kind not in "iub" or len(label_shape) != 2 or label_shape[0] != shape[0]:
      raise DataError(f"{path}: {split}_labels is {label_dtype} of shape {label_shape} "
                      f"for {shape[0]} images; MedMNIST ships integer N×1 (N×14 for "
                      "chestmnist): re-download the file")
    expected = (entry or {}).get("n_samples", {}).get(split)
    if expected is not None and expected != shape[0]:
      raise DataError(f"{path} holds {shape[0]} {split} images but MedMNIST's {flag} has "
                      f"{expected}: a partial or different file: re-download it")
  return headers


def _single_labels(labels: np.ndarray, path: str, split: str, flag: str,
                   multi_label: str) -> np.ndarray:
  """One class per image (uint8 N×1): N×1 as shipped, or N×L reduced by `multi_label`."""
  if labels.size and (labels.min() < 0 or labels.max() > 255):
    raise DataError(f"{path}: {split}_labels holds {labels.min()}..{labels.max()}, not "
                    "MedMNIST's class indices 0..255: re-download the file")
  if labels.shape[1] == 1:
    return labels.astype(np.uint8)
  if multi_label != "any":
    raise DataError(f"{path}: {flag} is multi-label ({labels.shape[1]} findings per "
                    f"image, {split}_labels {labels.shape}) but jaxad needs one class per "
                    "image: pass --multi_label=any (0 = normal: no finding, 1 = abnormal: "
                    "at least one)")
  return (labels != 0).any(axis=1, keepdims=True).astype(np.uint8)


def _class_names(entry: dict | None, multi: bool, max_label: int, path: str) -> tuple | None:
  """The names stored with the labels: normal/abnormal for a reduced multi-label file,
  INFO's label names when the medmnist package is there, else None (indices)."""
  if multi:
    return MULTI_LABEL_NAMES
  if not entry or "label" not in entry:
    return None
  names = tuple(entry["label"][str(i)] for i in range(len(entry["label"])))
  if max_label >= len(names):
    raise DataError(f"{path} holds the label {max_label} but the dataset has "
                    f"{len(names)} classes: re-download the file")
  return names


def _resolve_medmnist(flag: str, size: int, src: str) -> tuple[str, int, str]:
  """(flag, size, src file or '') from the flags and, where they say nothing, from the
  --src file's name; size 0 (unknown: any square side) only with a renamed --src file."""
  if src and os.path.isdir(src):
    if not flag:
      raise ConfigError(f"--src={src} is a folder: pass --flag (and --size) to pick the "
                        "file in it, or give the file itself")
    src = os.path.join(src, medmnist_file_name(flag, size or 28))
  if src and not os.path.isfile(src):
    raise DataError(f"--src={src} not found: give a MedMNIST .npz file as downloaded "
                    f"(e.g. {medmnist_file_name(flag or 'pneumoniamnist', size or 64)})")
  named = parse_medmnist_name(src) if src else None
  if not flag and named is None:
    raise ConfigError("pass --flag=NAME, the MedMNIST dataset (e.g. pneumoniamnist)"
                      + (f": {os.path.basename(src)} is not a name MedMNIST ships"
                         if src else ""))
  flag = flag or named[0]
  if not size:
    size = named[1] if named and named[0] == flag else (0 if src else 28)
  check_flag_and_size(flag, size)
  return flag, size, src


def prepare_medmnist(out: str, *, flag: str = "", size: int = 0, src: str = "",
                     cache_dir: str = "~/.medmnist", multi_label: str = "error",
                     overwrite: bool = False, compress: bool = False) -> dict:
  """A MedMNIST file (`src`, or downloaded) → `out`, checked; returns `summary`'s dict."""
  if multi_label not in ("error", "any"):
    raise ConfigError(f"--multi_label={multi_label} must be 'error' or 'any'")
  flag, size, src = _resolve_medmnist(flag, size, src)
  check_out(out, overwrite, src)
  info = medmnist_info(required=not src)
  path = src or download_medmnist(flag, size, cache_dir, info)
  entry = (info or {}).get(flag)
  headers = check_medmnist_file(path, flag, size or None, entry)
  with np.load(path, allow_pickle=False) as arrays:
    raw = {s: arrays[f"{s}_labels"] for s in SPLITS}
  labels = {s: _single_labels(raw[s], path, s, flag, multi_label) for s in SPLITS}
  multi = raw["train"].shape[1] > 1
  max_label = max(int(v.max(initial=0)) for v in labels.values())
  names = _class_names(entry, multi, max_label, path)
  members = {}
  for s in SPLITS:
    members[f"{s}_images"] = MemberCopy(path, f"{s}_images", headers[f"{s}_images"][2])
    members[f"{s}_labels"] = labels[s]
  if names is not None:
    members["class_names"] = np.array(names)
  else:
    log.info("class names unknown without the medmnist package: labels stay indices "
             "0..%d (%s to store their names)", max_label, MEDMNIST_INSTALL)
  write_npz(out, members, compress)
  counts = {s: len(labels[s]) for s in SPLITS}
  return summary(out, counts, headers["train_images"][0][1:], names)


# --- the binary -----------------------------------------------------------------------

def summary(path: str, counts: dict, image_shape, class_names) -> dict:
  """What a prepare call wrote: path, images per split, image shape, class names."""
  return {"path": path, "counts": dict(counts), "image_shape": tuple(image_shape),
          "class_names": None if class_names is None else list(class_names)}


def summary_line(result: dict) -> str:
  """One line for the terminal, e.g. 'wrote mnist.npz: train 54000, val 6000, ...'."""
  counts = ", ".join(f"{s} {n}" for s, n in result["counts"].items())
  shape = "×".join(str(d) for d in result["image_shape"])
  names = result["class_names"]
  if not names or names == [str(i) for i in range(len(names))]:
    classes = "labels are class indices" + (f" 0..{len(names) - 1}" if names else "")
  else:
    classes = "classes " + ", ".join(f"{i} = {n}" for i, n in enumerate(names))
  return f"wrote {result['path']}: {counts} images of {shape} uint8; {classes}"


def define_flags() -> None:
  """The binary's flags (defined only when it runs, so importing this module defines none)."""
  flags.DEFINE_enum("dataset", None, ["mnist", "fashion_mnist", "medmnist"],
                    "What to convert: MNIST / Fashion-MNIST idx files, or a MedMNIST file.")
  flags.DEFINE_string("src", "", "mnist, fashion_mnist: the folder with the four idx files "
                      "(.gz or unpacked). medmnist: the downloaded {flag}[_{size}].npz "
                      "(or the folder holding it); without it the file is downloaded.")
  flags.DEFINE_string("out", None, "The .npz file to write (MedMNIST layout).")
  flags.DEFINE_boolean("overwrite", False, "Replace --out if it exists.")
  flags.DEFINE_boolean("compress", False, "Deflate the arrays (smaller file; jaxad then "
                       "inflates each into $TMPDIR when it loads). Default: stored, read "
                       "in place.")
  flags.DEFINE_float("val_fraction", 0.1, "mnist, fashion_mnist: the part of each class "
                     "of train held out as val_* (0: none).")
  flags.DEFINE_integer("seed", 0, "mnist, fashion_mnist: seed of the validation draw.")
  flags.DEFINE_string("flag", "", "medmnist: the dataset, e.g. pneumoniamnist, chestmnist, "
                      "nodulemnist3d (default: from the --src file name).")
  flags.DEFINE_integer("size", 0, "medmnist: image side 28, 64, 128 or 224 (3D: 28, 64); "
                       "0: from the --src file name, else 28.")
  flags.DEFINE_string("cache_dir", "~/.medmnist", "medmnist: where downloads are kept "
                      "(medmnist's own folder, so its downloads are reused).")
  flags.DEFINE_enum("multi_label", "error", ["error", "any"], "medmnist: multi-label "
                    "files (chestmnist): 'any' makes 0 = normal (no finding), 1 = abnormal.")
  flags.mark_flags_as_required(["dataset", "out"])


def _check_flag_use(FLAGS) -> None:
  """A ConfigError for flags given to a --dataset that ignores them."""
  if FLAGS.dataset == "medmnist":
    ignored, scope = ("val_fraction", "seed"), ("--dataset=mnist and fashion_mnist "
                                                "(MedMNIST keeps its official val split)")
  else:
    ignored, scope = ("flag", "size", "cache_dir", "multi_label"), "--dataset=medmnist"
  given = [f"--{name}" for name in ignored if FLAGS[name].present]
  if given:
    raise ConfigError(f"{', '.join(given)} only apply to {scope}: remove "
                      f"{'them' if len(given) > 1 else 'it'}")


def main(argv):
  cli.check_no_args(argv)
  FLAGS = flags.FLAGS
  with cli.session():
    _check_flag_use(FLAGS)
    if FLAGS.dataset == "medmnist":
      result = prepare_medmnist(
          FLAGS.out, flag=FLAGS.flag, size=FLAGS.size, src=FLAGS.src,
          cache_dir=FLAGS.cache_dir, multi_label=FLAGS.multi_label,
          overwrite=FLAGS.overwrite, compress=FLAGS.compress)
    else:
      result = prepare_mnist(FLAGS.src, FLAGS.out, dataset=FLAGS.dataset,
                             val_fraction=FLAGS.val_fraction, seed=FLAGS.seed,
                             overwrite=FLAGS.overwrite, compress=FLAGS.compress)
  print(summary_line(result))


if __name__ == "__main__":
  define_flags()
  cli.run(main)
