""".npz members read row by row: same values as np.load, flat memory, clear errors."""

import io
import tracemalloc
import zipfile

import numpy as np
import pytest

from jaxad.data import npz
from jaxad.errors import DataError


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_rows_equal_np_load(tmp_path, save):
  rng = np.random.default_rng(0)
  arrays = {"images": rng.integers(0, 256, (7, 5, 4, 3), dtype=np.uint8),
            "wide": rng.integers(-9, 9, (4, 3)).astype(">i4"),  # big-endian
            "labels": np.arange(7, dtype=np.uint8)[:, None]}
  save(tmp_path / "a.npz", **arrays)
  assert npz.member_names(str(tmp_path / "a.npz")) == list(arrays)
  for name, want in arrays.items():
    a = npz.NpzArray(str(tmp_path / "a.npz"), name)
    assert a.shape == want.shape and a.dtype == want.dtype and len(a) == len(want)
    for i in range(len(want)):
      np.testing.assert_array_equal(a[i], want[i])
    np.testing.assert_array_equal(a.rows(2, 100), want[2:])
    assert a.value_range() == (want.min(), want.max())
  row = npz.NpzArray(str(tmp_path / "a.npz"), "images")[0]
  row[0, 0, 0] = 1  # rows are writable copies, like rows of an in-memory array


def test_fortran_order_is_read_whole(tmp_path):
  f_ordered = np.asfortranarray(np.arange(24, dtype=np.uint16).reshape(4, 3, 2))
  np.savez(tmp_path / "f.npz", images=f_ordered)
  a = npz.NpzArray(str(tmp_path / "f.npz"), "images")
  for i in range(4):
    np.testing.assert_array_equal(a[i], f_ordered[i])


def test_compressed_member_is_inflated_in_chunks_not_in_memory(tmp_path):
  images = np.zeros((64, 512, 1024), np.uint8)  # 32 MiB, compresses to almost nothing
  images[:, 0, 0] = np.arange(64)
  np.savez_compressed(tmp_path / "big.npz", images=images)
  del images
  tracemalloc.start()
  try:
    a = npz.NpzArray(str(tmp_path / "big.npz"), "images")
    firsts = [int(a[i][0, 0]) for i in range(len(a))]
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert firsts == list(range(64))
  assert peak < 8 * 2**20, peak  # a few 1 MiB chunks and one row, not 32 MiB


def test_errors_name_the_file_and_the_fix(tmp_path):
  np.savez(tmp_path / "a.npz", images=np.zeros((50, 40), np.uint8))
  with pytest.raises(DataError, match=r"has no array 'labels'"):
    npz.NpzArray(str(tmp_path / "a.npz"), "labels")
  buf = io.BytesIO()
  np.save(buf, np.zeros((50, 40), np.uint8))
  # The member cut short in a valid zip directory: what a truncated copy leaves.
  with zipfile.ZipFile(tmp_path / "cut.npz", "w", zipfile.ZIP_STORED) as zf:
    zf.writestr("images.npy", buf.getvalue()[:500])
  with pytest.raises(DataError, match=r"'images' of .*cut.npz is truncated.*re-download"):
    npz.NpzArray(str(tmp_path / "cut.npz"), "images")
  (tmp_path / "junk.npz").write_bytes(b"not a zip")
  with pytest.raises(DataError, match=r"cannot read npz file .*junk.npz"):
    npz.member_names(str(tmp_path / "junk.npz"))
  np.savez(tmp_path / "o.npz", names=np.array([{"a": 1}], dtype=object))
  with pytest.raises(DataError, match="holds Python objects"):
    npz.NpzArray(str(tmp_path / "o.npz"), "names")
