"""The binaries' shared edge: help without other flags, one-line errors, no tracebacks."""

import os
import subprocess
import sys

import pytest
from absl import app

from jaxad import cli
from jaxad.errors import CheckpointError, ConfigError, DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(binary, *args):
  env = dict(os.environ, XLA_FLAGS="", TF_CPP_MIN_LOG_LEVEL="2", TF_ENABLE_ONEDNN_OPTS="0")
  return subprocess.run([sys.executable, "-m", binary, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("binary,flag", [("jaxad.train", "--help"),
                                         ("jaxad.evaluate", "-h"),
                                         ("jaxad.grid", "--help"),
                                         ("jaxad.bench", "--help")])
def test_help_needs_no_other_flag(binary, flag):
  out = _cli(binary, flag)
  assert out.returncode == 0, out.stderr[-2000:]
  expected = ("--case",) if binary == "jaxad.bench" else ("--workdir", "--config")
  assert all(flag in out.stdout for flag in expected), out.stdout[-2000:]
  assert "Traceback" not in out.stderr


def test_evaluate_on_missing_workdir_is_one_line(tmp_path):
  out = _cli("jaxad.evaluate", f"--workdir={tmp_path / 'nope'}")
  assert out.returncode != 0
  assert "Traceback" not in out.stderr
  errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "config.json not found" in errors[0], out.stderr[-2000:]


@pytest.mark.parametrize("error", [ConfigError("bad key\n  model.latnet_dim"),
                                   DataError("no files"), CheckpointError("no checkpoint"),
                                   FloatingPointError("training diverged at step 3")])
def test_exit_on_error_is_one_line(error):
  with pytest.raises(SystemExit) as e, cli.exit_on_error():
    raise error
  assert isinstance(e.value.code, str)  # Python prints it to stderr and exits 1
  assert e.value.code.startswith("error: ") and "\n" not in e.value.code
  assert str(error).split()[-1] in e.value.code


def test_exit_on_error_lets_other_errors_through():
  with pytest.raises(KeyError), cli.exit_on_error():
    raise KeyError("a bug, with its traceback")


def test_help_requested_and_check_no_args():
  for flag in ("-h", "--help", "--helpfull", "-?", "--helpshort"):
    assert cli.help_requested(["prog", "--workdir=x", flag])
  assert not cli.help_requested(["prog", "--workdir=x"])
  assert not cli.help_requested(["prog", "--", "--help"])  # a positional after --
  cli.check_no_args(["prog"])
  with pytest.raises(app.UsageError, match="extra"):
    cli.check_no_args(["prog", "extra"])
