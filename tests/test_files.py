"""Results files: atomic writes and strict JSON."""

import json
import math
import os

import numpy as np
import pytest

from jaxad import files


def _strict_load(path):
  """json.load that rejects NaN / Infinity, as jq or JavaScript would."""
  def reject(token):
    raise ValueError(f"non-standard JSON token {token}")
  with open(path) as f:
    return json.load(f, parse_constant=reject)


def test_write_json_is_strict_and_writes_non_finite_as_null(tmp_path):
  path = str(tmp_path / "sub" / "metrics.json")
  obj = {"threshold": -math.inf, "auroc": 0.75,
         "nested": [math.nan, {"x": np.float64(np.inf)}], "pair": (1.5, -2.0), "n": 3,
         "name": "vae", "ok": True, "none": None}
  files.write_json(path, obj)
  text = open(path).read()
  assert "Infinity" not in text and "NaN" not in text
  assert _strict_load(path) == {"threshold": None, "auroc": 0.75,
                                "nested": [None, {"x": None}], "pair": [1.5, -2.0], "n": 3,
                                "name": "vae", "ok": True, "none": None}
  assert oct(os.stat(path).st_mode & 0o777) == "0o644"
  assert os.listdir(tmp_path / "sub") == ["metrics.json"]  # no temporary left behind


def test_write_json_still_rejects_what_json_cannot_hold(tmp_path):
  with pytest.raises(TypeError):
    files.write_json(str(tmp_path / "x.json"), {"a": object()})
  assert not os.path.exists(tmp_path / "x.json")


@pytest.fixture
def umask():
  """Sets the process umask for a test (and restores it)."""
  old = os.umask(0o022)
  os.umask(old)
  yield lambda mask: os.umask(mask)
  os.umask(old)


def _modes(folder):
  return {f: oct(os.stat(os.path.join(folder, f)).st_mode & 0o777)
          for f in sorted(os.listdir(folder))}


@pytest.mark.parametrize("proc", [True, False], ids=["proc_status", "umask_call"])
def test_written_files_honour_the_umask(tmp_path, umask, monkeypatch, proc):
  # mkstemp makes 0600 files; results used to be chmod 0644 whatever the umask.
  if not proc:  # no /proc/self/status: the umask is read by setting and restoring it
    def no_proc(path, *args, **kwargs):
      if str(path).startswith("/proc/"):
        raise OSError("no /proc")
      return open(path, *args, **kwargs)
    monkeypatch.setattr(files, "open", no_proc, raising=False)
  for mask, mode in ((0o077, "0o600"), (0o022, "0o644"), (0o002, "0o664")):
    folder = tmp_path / oct(mask)
    umask(mask)
    assert files.current_umask() == mask and os.umask(mask) == mask  # left as it was
    files.write_json(str(folder / "metrics.json"), {"a": 1})
    files.write_text(str(folder / "scores.csv"), "id\n")
    with files.atomic_path(str(folder / "scores.npz")) as tmp, open(tmp, "wb") as f:
      np.savez(f, x=np.zeros(2))
    assert _modes(folder) == {"metrics.json": mode, "scores.csv": mode,
                              "scores.npz": mode}, mask


def test_update_json_keeps_every_key_when_runs_update_it_at_once(tmp_path):
  # Two evaluations of different splits update metrics.json together: without the lock,
  # one's read-modify-write could drop the other's split.
  import threading
  path = str(tmp_path / "eval" / "metrics.json")
  files.write_json(path, {"old": 1})

  def writer(t):
    for i in range(15):
      files.update_json(path, f"split{t}_{i}", {"auroc": 0.5})

  threads = [threading.Thread(target=writer, args=(t,)) for t in range(6)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  saved = _strict_load(path)
  assert len(saved) == 1 + 6 * 15 and saved["old"] == 1
