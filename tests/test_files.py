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
