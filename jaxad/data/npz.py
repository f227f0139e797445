""".npz members read one row at a time, so memory stays flat however large the array.

`np.load` reads an .npz member whole (its `mmap_mode` is ignored for archives), which
for a MedMNIST+ 224×224 split is gigabytes. `NpzArray` reads rows from disk instead:

- a stored member (`np.savez`) is read in place, at its offset inside the zip;
- a compressed member (`np.savez_compressed`, as MedMNIST ships) is first inflated, in
  1 MiB chunks, into an anonymous temporary file (under $TMPDIR: set it to a roomy
  disk for large files, or re-save them with `np.savez` to skip this step).

Reads are positional (`os.pread`), so tf.data's threads can share one file, and they go
through the page cache rather than into the process's resident memory (a memory map
would count every page it touched).
"""

import logging
import math
import os
import shutil
import struct
import tempfile
import time
import weakref
import zipfile

import numpy as np

from jaxad.errors import DataError

log = logging.getLogger("jaxad")
CHUNK_BYTES = 1 << 20  # inflate and scan in 1 MiB pieces
LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., name length, extra length


def member_names(path: str) -> list[str]:
  """The array names of an .npz archive (its members without `.npy`), in stored order."""
  try:
    with zipfile.ZipFile(path) as zf:
      names = zf.namelist()
  except (OSError, zipfile.BadZipFile) as e:
    raise DataError(f"cannot read npz file {path} ({e}): check the path, or re-save "
                    "it with np.savez / np.savez_compressed") from None
  return [n[:-len(".npy")] for n in names if n.endswith(".npy")]


class NpzArray:
  """One array of an .npz archive: `shape`, `dtype`, `len` and `array[i]` (one row)."""

  def __init__(self, path: str, name: str):
    self.path, self.name = path, name
    what = f"array {name!r} of {path}"
    try:
      with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(f"{name}.npy")
        stored = info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 0x1
        self._file = open(path, "rb") if stored else _inflate(zf, info, what)
    except KeyError:
      raise DataError(f"{path} has no array {name!r}: check the array names") from None
    except (OSError, zipfile.BadZipFile, EOFError) as e:
      raise DataError(f"cannot read {what} ({e}): re-download or re-save the file") from None
    weakref.finalize(self, self._file.close)
    start = _data_offset(self._file, info, what) if stored else 0
    self.shape, self.dtype, fortran = _read_header(self._file, start, what)
    if not self.shape:
      raise DataError(f"{what} is a scalar: store one row per example")
    self._start = self._file.tell()
    self._row_bytes = self.dtype.itemsize * math.prod(self.shape[1:])
    end = self._start + self._row_bytes * self.shape[0]
    if os.fstat(self._file.fileno()).st_size < end:
      raise DataError(f"{what} is truncated (shorter than its {self.shape} "
                      f"{self.dtype} header says): re-download or re-save the file")
    self._whole = None
    if fortran:  # rows are not contiguous on disk: rare (np.save of an F-ordered array)
      log.warning("%s is stored in Fortran order: reading it whole into memory", what)
      self._whole = np.load(path, allow_pickle=False)[name]

  def __len__(self) -> int:
    return self.shape[0]

  def __getitem__(self, i) -> np.ndarray:
    """Row `i` as a fresh, writable array."""
    i = int(i)
    if not 0 <= i < len(self):
      raise IndexError(f"row {i} out of range for {len(self)} rows of {self.name!r}")
    if self._whole is not None:
      return np.array(self._whole[i])
    return self.rows(i, i + 1)[0]

  def rows(self, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) as one array."""
    if self._whole is not None:
      return np.array(self._whole[start:stop])
    n = max(0, min(stop, len(self)) - start)
    offset, left, parts = self._start + start * self._row_bytes, n * self._row_bytes, []
    while left:
      part = os.pread(self._file.fileno(), left, offset)
      if not part:
        raise DataError(f"array {self.name!r} of {self.path} ended early (truncated?): "
                        "re-download or re-save the file")
      parts.append(part)
      offset, left = offset + len(part), left - len(part)
    buf = bytearray(b"".join(parts))  # writable, like a row of an in-memory array
    return np.frombuffer(buf, self.dtype).reshape((n, *self.shape[1:]))

  def chunks(self):
    """Every row, in blocks of about CHUNK_BYTES (for a scan such as min/max)."""
    step = max(1, CHUNK_BYTES // max(1, self._row_bytes))
    for start in range(0, len(self), step):
      yield self.rows(start, start + step)

  def value_range(self) -> tuple[float, float]:
    """(min, max) over every element, scanned in chunks; (0, 0) when empty."""
    lo, hi = math.inf, -math.inf
    for block in self.chunks():
      if block.size:
        lo, hi = min(lo, block.min().item()), max(hi, block.max().item())
    return (0, 0) if lo > hi else (lo, hi)


def _data_offset(f, info: zipfile.ZipInfo, what: str) -> int:
  """Where a stored member's bytes start: after its local header, name and extra field."""
  f.seek(info.header_offset)
  head = f.read(LOCAL_HEADER.size)
  if len(head) < LOCAL_HEADER.size:
    raise DataError(f"{what}: the zip entry is truncated: re-download or re-save the file")
  signature, name_len, extra_len = LOCAL_HEADER.unpack(head)
  if signature != b"PK\x03\x04":
    raise DataError(f"{what}: bad zip entry header: re-download or re-save the file")
  return info.header_offset + LOCAL_HEADER.size + name_len + extra_len


def _inflate(zf: zipfile.ZipFile, info: zipfile.ZipInfo, what: str):
  """A compressed member, decompressed chunk by chunk into an anonymous temporary file."""
  t0 = time.perf_counter()
  tmp = tempfile.TemporaryFile()
  try:
    with zf.open(info) as src:
      shutil.copyfileobj(src, tmp, CHUNK_BYTES)
  except BaseException:
    tmp.close()
    raise
  log.info("inflated %s (%.1f MB) into a temporary file in %.2f s", what,
           info.file_size / 1e6, time.perf_counter() - t0)
  return tmp


def _read_header(f, start: int, what: str):
  """(shape, dtype, fortran_order) of the .npy member starting at `start`."""
  f.seek(start)
  try:
    version = np.lib.format.read_magic(f)
    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
            else np.lib.format.read_array_header_2_0)
    shape, fortran, dtype = read(f)
  except ValueError as e:
    raise DataError(f"{what} is not a valid .npy array ({e}): re-save the file") from None
  if dtype.hasobject:
    raise DataError(f"{what} holds Python objects: store plain numeric arrays (and "
                    "names as a str array, dtype=str)")
  return tuple(shape), dtype, fortran
