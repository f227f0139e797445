"""An on-disk cache of lossless code lengths, so a test set is coded once, not per run.

Scoring many checkpoints (or a grid) on one test set codes the same images with the
same coders each time; JPEG XL at effort 7 costs milliseconds per image on a host
thread. `LengthCache` keeps each image's code length in bytes, keyed by a blake2b
digest of the quantised image (its bytes, shape and dtype), in one folder per coder
setting (coder, effort or level, bit depth, library versions: `settings_folder`), so
any change to what the coder would write misses instead of returning a stale length.

Concurrency without locks: every batch of new lengths is a new file (`<unique>.npz`,
written to a temporary file and renamed), never a rewrite of an old one, so two
processes writing at once both land. When a folder holds many files, a reader merges
the ones it read into one new file and only then deletes them, so no length is ever
lost. A file that cannot be parsed is ignored with a warning (and deleted): its
images are coded again. The cache only grows by what is coded: 24 bytes per image and
coder, merged duplicates dropped.
"""

import hashlib
import json
import logging
import os
import threading
import time
import uuid

import numpy as np

from jaxad import files

log = logging.getLogger("jaxad")

DIGEST_SIZE = 16  # bytes of blake2b: collisions are out of reach at any dataset size
COMPACT_AT = 16  # files in a folder before a reader merges them into one


def default_dir() -> str:
  """$JAXAD_CACHE_DIR, else $XDG_CACHE_HOME/jaxad/complexity, else
  ~/.cache/jaxad/complexity."""
  if os.environ.get("JAXAD_CACHE_DIR"):
    return os.path.abspath(os.path.expanduser(os.environ["JAXAD_CACHE_DIR"]))
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(os.path.abspath(base), "jaxad", "complexity")


def resolve_dir(setting: str | None) -> str | None:
  """A cache setting as a folder: "auto" → `default_dir()`; "" or None → no cache;
  anything else is the folder itself (~ expanded)."""
  if not setting:
    return None
  if setting == "auto":
    return default_dir()
  return os.path.abspath(os.path.expanduser(setting))


def digests(quantized: np.ndarray) -> list[bytes]:
  """One blake2b digest per image of a quantised batch (B, ...): bytes, shape, dtype."""
  out = []
  for image in quantized:
    h = hashlib.blake2b(digest_size=DIGEST_SIZE)
    h.update(f"{image.dtype.str}{image.shape}".encode())
    h.update(np.ascontiguousarray(image).data)
    out.append(h.digest())
  return out


def settings_folder(cache_dir: str, settings: dict) -> str:
  """CACHE_DIR/<coder>-<hash of the settings>, one folder per coder setting."""
  text = json.dumps(settings, sort_keys=True)
  tag = hashlib.blake2b(text.encode(), digest_size=8).hexdigest()
  return os.path.join(cache_dir, f"{settings.get('coder', 'coder')}-{tag}")


def write_lengths(path: str, keys: list[bytes], nbytes: list[int]) -> None:
  """An .npz of (N, 16) uint8 digests and (N,) int64 lengths, written atomically."""
  table = np.frombuffer(b"".join(keys), np.uint8).reshape(len(keys), DIGEST_SIZE)
  with files.atomic_path(path) as tmp, open(tmp, "wb") as f:
    np.savez(f, digests=table, nbytes=np.asarray(nbytes, np.int64))


def read_lengths(path: str) -> dict[bytes, int]:
  """{digest: length in bytes} of one file; ValueError when it is not a valid one."""
  try:
    with np.load(path, allow_pickle=False) as data:
      table, nbytes = data["digests"], data["nbytes"]
  except OSError:  # missing or unreadable: not the file's content
    raise
  except Exception as e:  # noqa: BLE001: whatever np.load makes of a damaged file
    raise ValueError(f"not a code-length file ({type(e).__name__}: {e})") from e
  if (table.dtype != np.uint8 or table.ndim != 2 or table.shape[1] != DIGEST_SIZE
      or nbytes.dtype != np.int64 or nbytes.shape != (len(table),) or
      not np.all(nbytes > 0)):
    raise ValueError(f"unexpected arrays: digests {table.dtype}{table.shape}, "
                     f"nbytes {nbytes.dtype}{nbytes.shape}")
  return dict(zip((bytes(row) for row in table), (int(n) for n in nbytes)))


class LengthCache:
  """The code lengths (bytes) of one coder setting under `cache_dir`, read once.

  `get(keys)` gives each digest's length or None; `add(keys, nbytes)` keeps new ones in
  memory and writes them as one new file. Thread-safe; never raises for a bad cache.
  """

  def __init__(self, cache_dir: str, settings: dict, compact_at: int | None = None):
    self.folder = settings_folder(cache_dir, settings)
    self._lock = threading.Lock()
    self._writable = True
    self._known = {}
    try:
      os.makedirs(self.folder, exist_ok=True)
      info = os.path.join(self.folder, "settings.json")
      if not os.path.exists(info):
        files.write_json(info, settings)
    except OSError as e:
      self._unwritable(e)
    self._load(COMPACT_AT if compact_at is None else compact_at)

  def _paths(self) -> list[str]:
    try:
      names = os.listdir(self.folder)
    except OSError:
      return []
    return sorted(os.path.join(self.folder, n) for n in names
                  if n.endswith(".npz") and not n.startswith("."))

  def _load(self, compact_at: int) -> None:
    """Reads every file; merges them into one when there are more than `compact_at`."""
    read = []
    for path in self._paths():
      try:
        self._known.update(read_lengths(path))
        read.append(path)
      except FileNotFoundError:  # merged and removed by another process meanwhile
        continue
      except (OSError, ValueError) as e:
        self._corrupt(path, e)
    if len(read) > compact_at and self._writable:
      self._merge(read)

  def _corrupt(self, path: str, error: Exception) -> None:
    log.warning("complexity cache: ignoring unreadable file %s (%s); its images are "
                "coded again. Delete the folder %s to reset this cache.", path, error,
                self.folder)
    if isinstance(error, ValueError):  # a bad file, not a permission problem: drop it
      try:
        os.remove(path)
      except OSError:
        pass

  def _merge(self, read: list[str]) -> None:
    """One file holding everything read, then the files it replaces deleted."""
    if not self._write(list(self._known), list(self._known.values())):
      return
    for path in read:
      try:
        os.remove(path)
      except OSError:
        pass

  def _write(self, keys: list[bytes], nbytes: list[int]) -> bool:
    name = f"{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:12]}.npz"
    try:
      write_lengths(os.path.join(self.folder, name), keys, nbytes)
      return True
    except OSError as e:
      self._unwritable(e)
      return False

  def _unwritable(self, error: OSError) -> None:
    if self._writable:
      log.warning("complexity cache: cannot write to %s (%s); coding without saving "
                  "the lengths. Set eval.complexity_cache to a writable folder, or "
                  "to \"\" to turn the cache off.", self.folder, error)
    self._writable = False

  def __len__(self) -> int:
    return len(self._known)

  def get(self, keys: list[bytes]) -> list[int | None]:
    """The length in bytes of each digest, None where it is not cached."""
    with self._lock:
      return [self._known.get(k) for k in keys]

  def add(self, keys: list[bytes], nbytes: list[int]) -> None:
    """Remembers new lengths and writes those not yet known as one new file."""
    with self._lock:
      new = {k: int(n) for k, n in zip(keys, nbytes) if k not in self._known}
      self._known.update(new)
    if new and self._writable:
      self._write(list(new), list(new.values()))
