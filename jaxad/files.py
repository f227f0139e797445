"""Atomic writes: a reader never sees a half-written results file.

Each writer writes a temporary file in the destination folder and renames it over the
target (`os.replace` is atomic on POSIX), so an interrupted run leaves the old file.
"""

import contextlib
import json
import os
import tempfile


@contextlib.contextmanager
def atomic_path(path: str):
  """Yields a temporary path beside `path`; renames it to `path` on success."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  os.close(fd)
  try:
    yield tmp
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are meant to be shared
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text(path: str, text: str) -> None:
  with atomic_path(path) as tmp, open(tmp, "w") as f:
    f.write(text)


def write_json(path: str, obj) -> None:
  write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str):
  with open(path) as f:
    return json.load(f)
