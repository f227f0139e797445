"""Atomic writes: a reader never sees a half-written results file.

Each writer writes a temporary file in the destination folder and renames it over the
target (`os.replace` is atomic on POSIX), so an interrupted run leaves the old file.
A written file gets the mode `open()` would give it (0o666 less the process umask),
not mkstemp's 0600. JSON is strict: NaN and ±inf, which JSON cannot express, are
written as null.
`log_to_file` keeps a plain-text log of the "jaxad" logger in a workdir.
"""

import contextlib
import fcntl
import json
import logging
import math
import os
import tempfile
import threading

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
  """The process umask, read without changing it where Linux shows it
  (/proc/self/status, "Umask:"); elsewhere set to 0o077 and restored under a lock (a
  file another thread creates in between is at worst private, never world-writable)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except OSError:
    pass
  with _UMASK_LOCK:
    mask = os.umask(0o077)
    os.umask(mask)
  return mask


@contextlib.contextmanager
def atomic_path(path: str):
  """Yields a temporary path beside `path`; renames it to `path` on success."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  os.close(fd)
  try:
    yield tmp
    os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; open() honours the umask
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text(path: str, text: str) -> None:
  with atomic_path(path) as tmp, open(tmp, "w") as f:
    f.write(text)


def write_json(path: str, obj) -> None:
  """Writes `obj` as standard JSON, non-finite floats as null (see `finite_or_none`)."""
  text = json.dumps(finite_or_none(obj), indent=2, sort_keys=True, allow_nan=False)
  write_text(path, text + "\n")


def finite_or_none(obj):
  """`obj` with every NaN or ±inf float replaced by None, in nested dicts and lists.

  Python's json writes them as `NaN` / `-Infinity`, which are not JSON: strict readers
  (jq, JavaScript, most other languages) reject the whole file.
  """
  if isinstance(obj, float):
    return obj if math.isfinite(obj) else None
  if isinstance(obj, dict):
    return {k: finite_or_none(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [finite_or_none(v) for v in obj]
  return obj


def update_json(path: str, key: str, value) -> dict:
  """Sets `key` of the JSON object at `path` (created if missing) to `value`, the other
  keys kept; the read-modify-write holds an exclusive lock on the folder, so two runs
  updating different keys at once both land. Returns the whole object written."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd = os.open(folder, os.O_RDONLY)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:  # a file system without locks: the update is still atomic
      pass
    everything = read_json(path) if os.path.exists(path) else {}
    everything[key] = value
    write_json(path, everything)
    return everything
  finally:
    os.close(fd)  # releases the lock


def read_json(path: str):
  with open(path) as f:
    return json.load(f)


def log_to_file(workdir: str, filename: str = "train.log") -> None:
  """Adds WORKDIR/filename as a plain-text log of the "jaxad" logger (once per path)."""
  log = logging.getLogger("jaxad")
  log.setLevel(logging.INFO)
  path = os.path.join(os.path.abspath(workdir), filename)
  if not any(getattr(h, "baseFilename", None) == path for h in log.handlers):
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
