"""The code-length cache: the same lengths bit for bit, each image coded once across
pools and processes, misses on any change to the image or the coder, and a damaged or
unwritable cache coded around with a warning, never an error."""

import logging
import math
import os
import subprocess
import sys
import textwrap
import threading

import imagecodecs
import numpy as np
import pytest

from jaxad.scores import complexity
from jaxad.scores import complexity_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _images(n, seed=0, shape=(8, 8, 1)):
  """[-1, 1] images of graded complexity (different code lengths), one repeated."""
  rng = np.random.default_rng(seed)
  x = rng.uniform(-1, 1, (n, *shape)) * rng.uniform(0, 1, (n, 1, 1, 1))
  x[-1] = x[0]
  return x


def _assert_same(got, want):
  assert set(got) == set(want) == set(complexity.ComplexityPool.names)
  for k in want:
    assert got[k].dtype == np.float64
    np.testing.assert_array_equal(got[k], want[k])


def _npz_files(cache_dir):
  return sorted(os.path.join(root, f) for root, _, names in os.walk(cache_dir)
                for f in names if f.endswith(".npz"))


def _code(images, cache_dir, batch=None, bit_depth=8, threads=2):
  """Every batch's lengths from one fresh pool, concatenated, and its stats."""
  batch = batch or len(images)
  with complexity.ComplexityPool(bit_depth, threads=threads, cache_dir=cache_dir) as pool:
    futures = [pool.submit(images[i:i + batch]) for i in range(0, len(images), batch)]
    parts = [f.result() for f in futures]
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, pool.stats()


def test_cached_lengths_are_the_coded_ones_and_a_second_pass_codes_nothing(tmp_path):
  images = _images(12)
  want = complexity.lengths(images, 8)  # the serial, uncached path
  got, stats = _code(images, None)
  _assert_same(got, want)
  assert stats["images"] == stats["coded"] == 12 and stats["cached"] == 0
  assert stats["encodes"] == 24  # both coders

  cache = str(tmp_path / "cache")
  with complexity.ComplexityPool(8, threads=3, cache_dir=cache) as pool:
    future = pool.submit(images)
    pool.close(wait=False)  # as the grid does: the batch still finishes and is saved
    _assert_same(future.result(), want)
  stats = pool.stats()
  assert (stats["images"], stats["cached"], stats["coded"], stats["encodes"]) == (12, 0, 12, 24)
  assert stats["coder_busy_s"] >= stats["coder_wall_s"] > 0
  assert stats["images_per_s"] == pytest.approx(12 / stats["coder_wall_s"])
  assert len(_npz_files(cache)) == 2  # one file per coder for the one batch
  assert not [f for _, _, names in os.walk(cache) for f in names if f.endswith(".tmp")]

  got, stats = _code(images, cache, batch=5)  # other batches, a fresh pool
  _assert_same(got, want)
  assert (stats["images"], stats["cached"], stats["coded"], stats["encodes"]) == (12, 12, 0, 0)
  assert stats["coder_busy_s"] == stats["coder_wall_s"] == 0 and math.isnan(stats["images_per_s"])
  assert len(_npz_files(cache)) == 2  # nothing new written

  more = np.concatenate([images[3:7], _images(6, seed=1)[1:]])  # partial hits: code misses
  got, stats = _code(more, cache, batch=4)
  _assert_same(got, complexity.lengths(more, 8))
  assert (stats["cached"], stats["coded"], stats["encodes"]) == (4, 5, 10)


def test_a_changed_image_or_coder_setting_misses(tmp_path, monkeypatch):
  images = _images(6)
  cache = str(tmp_path / "cache")
  base, _ = _code(images, cache)
  changed = images.copy()
  changed[2, 3, 4, 0] += 2 / 255  # one pixel, one level up
  got, stats = _code(changed, cache)
  _assert_same(got, complexity.lengths(changed, 8))
  assert (stats["cached"], stats["coded"]) == (5, 1)

  got, stats = _code(images, cache, bit_depth=7)  # the same images at another depth
  _assert_same(got, complexity.lengths(images, 7))
  assert stats["coded"] == 6

  monkeypatch.setattr(complexity, "JPEGXL_EFFORT", 1)  # JPEG XL's setting only
  got, stats = _code(images, cache)
  _assert_same(got, complexity.lengths(images, 8))
  assert not np.array_equal(got["jpegxl_bpd"], base["jpegxl_bpd"])  # really recoded
  np.testing.assert_array_equal(got["png_bpd"], base["png_bpd"])
  assert (stats["coded"], stats["encodes"]) == (6, 6)  # PNG's lengths were hits
  monkeypatch.undo()

  monkeypatch.setattr(imagecodecs, "__version__", "0.0.0")  # another library version
  _, stats = _code(images, cache)
  assert (stats["coded"], stats["encodes"]) == (6, 12)
  monkeypatch.undo()
  _, stats = _code(images, cache)
  assert stats["cached"] == 6


def test_a_damaged_cache_is_ignored_with_a_warning_and_recoded(tmp_path, caplog):
  images = _images(8)
  want = complexity.lengths(images, 8)
  cache = str(tmp_path / "cache")
  _code(images, cache)
  jxl, png = _npz_files(cache)
  with open(jxl, "r+b") as f:  # truncated mid-file
    f.truncate(os.path.getsize(jxl) // 2)
  with open(png, "wb") as f:
    f.write(b"not a cache file at all")
  wrong = os.path.join(os.path.dirname(png), "wrong.npz")  # a valid .npz, wrong arrays
  with open(wrong, "wb") as f:
    np.savez(f, digests=np.zeros((2, 16), np.uint8), nbytes=np.array([5, -1]))

  with caplog.at_level(logging.WARNING, logger="jaxad"):
    got, stats = _code(images, cache)
  _assert_same(got, want)
  assert stats["coded"] == 8 and stats["cached"] == 0
  warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
  for path in (jxl, png, wrong):
    assert path in warned
    assert not os.path.exists(path)  # dropped, replaced by the recoded lengths
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="jaxad"):
    got, stats = _code(images, cache)
  _assert_same(got, want)
  assert stats["cached"] == 8 and not caplog.records

  blocked = tmp_path / "a_file"  # a cache folder that cannot be created
  blocked.write_text("")
  with caplog.at_level(logging.WARNING, logger="jaxad"):
    got, stats = _code(images, str(blocked / "cache"))
  _assert_same(got, want)
  assert stats["coded"] == 8 and "cannot write" in caplog.text


def test_writers_at_once_lose_nothing_while_files_are_merged(tmp_path):
  """Threads each opening the cache (merging when it holds over 2 files) and adding
  lengths: every length added is there afterwards, with its value."""
  cache, settings = str(tmp_path / "cache"), {"coder": "test", "bit_depth": 8}
  rng = np.random.default_rng(0)
  added = {rng.bytes(16): int(n) for n in rng.integers(1, 10**6, 4 * 6 * 3)}
  items = list(added.items())

  def writer(t):
    for r in range(6):
      chunk = items[(t * 6 + r) * 3:(t * 6 + r + 1) * 3]
      lengths = complexity_cache.LengthCache(cache, settings, compact_at=2)
      lengths.add([k for k, _ in chunk], [n for _, n in chunk])

  threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  final = complexity_cache.LengthCache(cache, settings)
  assert final.get(list(added)) == list(added.values())
  assert len(final) == len(added)
  assert len(_npz_files(cache)) < 24  # merged, not one file per add


def test_two_processes_coding_into_one_cache_leave_it_whole(tmp_path):
  images = _images(24, seed=3)
  path, cache = str(tmp_path / "images.npy"), str(tmp_path / "cache")
  np.save(path, images)
  script = textwrap.dedent(f"""
      import sys
      import numpy as np
      from jaxad.scores import complexity, complexity_cache
      complexity_cache.COMPACT_AT = 2  # merge often, while the other process writes
      images = np.load({path!r})
      start = int(sys.argv[1])
      for i in range(start, start + 16, 2):  # a fresh pool per batch: many reads, merges
        with complexity.ComplexityPool(8, threads=1, cache_dir={cache!r}) as pool:
          pool.submit(images[i:i + 2]).result()
      """)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, "-c", script, str(start)], cwd=ROOT, env=env,
                            stderr=subprocess.PIPE, text=True) for start in (0, 8)]
  for p in procs:
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert "WARNING" not in err and "ignoring" not in err, err
  got, stats = _code(images, cache)
  _assert_same(got, complexity.lengths(images, 8))
  assert (stats["cached"], stats["coded"]) == (24, 0)
  # Merged along the way: per coder at most the 2 files a reader leaves, each process's
  # last merge and last batch (without merging, one per coded batch: 24 or more).
  assert len(_npz_files(cache)) <= 2 * (2 + 2 + 2)


def test_cache_folder_settings(tmp_path, monkeypatch):
  monkeypatch.setenv("JAXAD_CACHE_DIR", str(tmp_path / "mine"))
  assert complexity_cache.resolve_dir("auto") == str(tmp_path / "mine")
  monkeypatch.delenv("JAXAD_CACHE_DIR")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert complexity_cache.default_dir() == str(tmp_path / "xdg" / "jaxad" / "complexity")
  monkeypatch.delenv("XDG_CACHE_HOME")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert complexity_cache.default_dir() == str(
      tmp_path / "home" / ".cache" / "jaxad" / "complexity")
  assert complexity_cache.resolve_dir("") is None and complexity_cache.resolve_dir(None) is None
  assert complexity_cache.resolve_dir(str(tmp_path / "x")) == str(tmp_path / "x")
  jxl8 = complexity.coder_settings("jpegxl", 8)
  assert jxl8["effort"] == complexity.JPEGXL_EFFORT and "libjxl" in jxl8["libjxl"]
  folders = {complexity_cache.settings_folder("c", complexity.coder_settings(c, b))
             for c in complexity.CODERS for b in (8, 12)}
  assert len(folders) == 4
  with pytest.raises(ValueError, match="coder"):
    complexity.coder_settings("gif", 8)
