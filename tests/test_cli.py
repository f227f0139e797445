"""The binaries' shared edge: help without other flags, one-line errors, no tracebacks."""

import importlib.util
import os
import subprocess
import sys
import tomllib

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
                                         ("jaxad.bench", "--help"),
                                         ("jaxad.export", "--help"),
                                         ("jaxad.predict", "-h"),
                                         ("jaxad.data.prepare", "--help")])
def test_help_needs_no_other_flag(binary, flag):
  out = _cli(binary, flag)
  assert out.returncode == 0, out.stderr[-2000:]
  expected = {"jaxad.bench": ("--case",), "jaxad.export": ("--workdir", "--platforms"),
              "jaxad.predict": ("--workdir", "--scorer", "--input"),
              "jaxad.data.prepare": ("--dataset", "--src", "--out")}.get(
                  binary, ("--workdir", "--config"))
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


def test_jaxad_command_runs_each_binary_with_its_own_flags():
  out = _cli("jaxad", "--help")
  assert out.returncode == 0, out.stderr[-2000:]
  from jaxad.__main__ import COMMANDS
  assert all(f"  {name}" in out.stdout for name in COMMANDS)
  out = _cli("jaxad", "evaluate", "-h")  # the evaluate module's own help, exit 0
  assert out.returncode == 0 and "--workdir" in out.stdout, out.stderr[-2000:]
  out = _cli("jaxad", "evalute")
  assert out.returncode == 1 and out.stderr.startswith("error: unknown command 'evalute'")
  for module, _ in COMMANDS.values():  # every command names a module that exists
    assert importlib.util.find_spec(module) is not None, module


def test_console_script_is_declared():
  project = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]
  assert project["scripts"]["jaxad"] == "jaxad.__main__:main"


def test_importing_the_pipeline_prints_nothing():
  """TensorFlow's start-up lines (INFO logs, the oneDNN notice) are silenced by jaxad
  itself, not only by variables the user must know to set."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")}
  out = subprocess.run(
      [sys.executable, "-c", "import jaxad.data.pipeline as p, tensorflow as tf; "
       "tf.image.resize(tf.zeros((1, 4, 4, 1)), (8, 8)).numpy()"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stderr.strip() == "", out.stderr[-2000:]
