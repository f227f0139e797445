"""Where an evaluation writes: the split's folder or a new folder per --input run, and
the scratch folders pixel maps are collected in (removed when a killed run left them).

Scratch folders are named `.maps.<host>.<pid>.<random>`, so a later run can tell a live
run's scratch (kept) from a killed run's (removed): this host's with a dead process,
another host's untouched for a day, or one of an older jaxad made before the run began.
"""

import os
import re
import shutil
import socket
import tempfile
import time
import zipfile

import jax
import numpy as np

from jaxad import files, parallel

SCRATCH = ".maps."  # prefix of MapFile's scratch folders: .maps.<host>.<pid>.<random>
_LIVE_SCRATCH = set()  # this process's scratch folders in use
OTHER_HOST_STALE_S = 24 * 3600  # another host's scratch untouched this long is stale


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's live process
    return True
  return True


def _is_stale(path: str, started: float) -> bool:
  """Whether a scratch folder was left by a run that is gone: this host's with a dead
  process (or this process's, not in use); another host's untouched for a day; one of
  an older jaxad (no host and process in its name) made before this run started."""
  parts = os.path.basename(path)[len(SCRATCH):].rsplit(".", 2)
  try:
    mtime = os.path.getmtime(path)
  except OSError:
    return False
  if len(parts) != 3 or not parts[1].isdigit():
    return mtime < started
  host, pid = parts[0], int(parts[1])
  if host != socket.gethostname():
    return time.time() - mtime > OTHER_HOST_STALE_S
  if pid == os.getpid():
    return os.path.abspath(path) not in _LIVE_SCRATCH
  return not _pid_alive(pid)


def remove_stale_scratch(folder: str, started: float) -> list[str]:
  """Removes the `.maps.*` scratch folders killed runs left in `folder`; their paths."""
  removed = []
  try:
    names = os.listdir(folder)
  except FileNotFoundError:
    return removed
  for name in names:
    path = os.path.join(folder, name)
    if name.startswith(SCRATCH) and os.path.isdir(path) and _is_stale(path, started):
      shutil.rmtree(path, ignore_errors=True)
      removed.append(path)
  return removed


class MapFile:
  """Pixel maps (and masks) written to per-name .npy memmaps, zipped into maps.npz."""

  def __init__(self, path: str, n: int, spatial: tuple[int, ...], names, with_mask: bool):
    self.path = path
    self.tmp = os.path.abspath(tempfile.mkdtemp(
        dir=os.path.dirname(path), prefix=f"{SCRATCH}{socket.gethostname()}.{os.getpid()}."))
    _LIVE_SCRATCH.add(self.tmp)
    types = {**{k: np.float32 for k in names}, **({"mask": np.uint8} if with_mask else {})}
    self.arrays = {k: np.lib.format.open_memmap(os.path.join(self.tmp, f"{k}.npy"), "w+",
                                                t, (n, *spatial)) for k, t in types.items()}

  def write(self, positions: np.ndarray, maps: dict) -> None:
    for k, v in maps.items():
      self.arrays[k][positions] = v

  def close(self, extra: dict) -> None:
    for a in self.arrays.values():
      a.flush()
    with files.atomic_path(self.path) as tmp:
      with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for k in self.arrays:
          with open(os.path.join(self.tmp, f"{k}.npy"), "rb") as src, \
               zf.open(f"{k}.npy", "w", force_zip64=True) as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
        for k, v in extra.items():
          with zf.open(f"{k}.npy", "w", force_zip64=True) as dst:
            np.lib.format.write_array(dst, np.asarray(v))
    self.discard()

  def discard(self) -> None:
    """Removes the scratch folder (after close, or when the run fails)."""
    self.arrays = {}
    shutil.rmtree(self.tmp, ignore_errors=True)
    _LIVE_SCRATCH.discard(self.tmp)


def input_name(input_path: str) -> str:
  """The base name of an --input folder or file (extension dropped), safe as a folder."""
  path = os.path.normpath(input_path)
  name = os.path.basename(path)
  if not os.path.isdir(path):
    name = os.path.splitext(name)[0]
  return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip(".") or "input"


def claim_folder(parent: str, name: str) -> int:
  """Creates parent/name, else parent/name-2, name-3, ... (the first free one: mkdir is
  atomic, so two runs never share one); returns the number (1 for the bare name)."""
  os.makedirs(parent, exist_ok=True)
  number = 1
  while True:
    try:
      os.mkdir(os.path.join(parent, name if number == 1 else f"{name}-{number}"))
      return number
    except FileExistsError:
      number += 1


def input_dir(workdir: str, input_path: str) -> str:
  """A new folder for this --input run (process 0 claims it; the others are told)."""
  parent, name = os.path.join(workdir, "eval", "input"), input_name(input_path)
  number = claim_folder(parent, name) if parallel.is_main_process() else 0
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    number = int(multihost_utils.broadcast_one_to_all(np.int32(number)))
  return os.path.join(parent, name if number == 1 else f"{name}-{number}")


def clean_scratch(out_dir: str, is_input: bool, started: float) -> None:
  """Removes stale scratch from this run's folder (and, for an --input run, from the
  earlier --input runs' folders, removing one left empty: a killed run's)."""
  remove_stale_scratch(out_dir, started)
  if not is_input:
    return
  parent = os.path.dirname(out_dir)
  for name in sorted(os.listdir(parent)):
    folder = os.path.join(parent, name)
    if folder != out_dir and remove_stale_scratch(folder, started):
      try:
        os.rmdir(folder)
      except OSError:  # it holds results
        pass
