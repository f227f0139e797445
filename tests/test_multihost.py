"""Multi-process data parallel: two CPU processes on localhost (gloo collectives).

Two `python -m jaxad.train` processes (2 CPU devices each) train, stop, resume and end
with the loss and parameters of one process on 4 devices with the same global batch;
two `python -m jaxad.evaluate` processes write one scores file holding every test image
once, with the single-process scores (started by launch/local_multiprocess.sh). An audit
hook in every process lists the files it opens for writing: process 1 writes nothing but
its checkpoint shards.
"""

import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import jax
import numpy as np
import pytest

from jaxad import checkpoint, evaluation, parallel, trainer
from jaxad import config as config_lib
from jaxad.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES_PER_PROCESS = 2
# Subprocesses share compiled programs (the resumed run recompiles nothing) via the cache.
ENV = dict(os.environ, XLA_FLAGS="", TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu",
           JAX_NUM_CPU_DEVICES=str(DEVICES_PER_PROCESS), PYTHONPATH=ROOT,
           JAX_COMPILATION_CACHE_DIR=os.path.join(tempfile.gettempdir(),
                                                  "jaxad-test-jax-cache"),
           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
TIMEOUT_S = 240  # a hang fails the test instead of blocking it

CONFIG = '''
from jaxad import defaults

def get_config():
  """A conv VAE on 8x8 synthetic images, 5 steps per epoch (validation at step 5)."""
  c = defaults.get_config()
  c.data.source = "synthetic"
  c.data.synthetic.num_examples = 40
  c.data.synthetic.image_size = 8
  c.data.normal_classes = ("normal",)
  c.data.image_size = 8
  c.model.widths = (8,)
  c.model.latent_dim = 4
  c.train.batch_size = 8
  c.train.num_steps = 8
  c.train.learning_rate = 1e-3
  c.train.plateau_patience = 1
  c.train.log_every_steps = 2
  c.train.checkpoint_every_steps = 4
  c.eval.batch_size = 12  # 40 images: the last batch is 4 real + 8 padding rows
  c.eval.num_samples = 3
  c.eval.bootstrap = 5
  c.eval.save_maps = True
  return c
'''

# On PYTHONPATH as sitecustomize.py: a jaxad process started with --process_id=I lists
# each file it opens for writing under $AUDIT_WORKDIR in $AUDIT_DIR/$AUDIT_NAME.writes.I.
# (TensorFlow's event writer and orbax's tensorstore write from C++, unseen here.)
AUDIT = r'''
import os, sys

def _install():
  folder, workdir, name = (os.environ.get(k)
                           for k in ("AUDIT_DIR", "AUDIT_WORKDIR", "AUDIT_NAME"))
  ids = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--process_id=")]
  if not (folder and ids):
    return
  workdir = os.path.realpath(workdir)
  log = open(os.path.join(folder, f"{name}.writes.{ids[0]}"), "w", buffering=1)
  write = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

  def hook(event, args):
    if event != "open" or not isinstance(args[0], (str, bytes)):
      return
    path, mode, flags = args
    if isinstance(mode, str):
      writing = any(c in mode for c in "wax+")
    else:
      writing = bool(flags & write)
    path = os.path.realpath(os.fsdecode(path))
    if writing and path.startswith(workdir + os.sep):
      log.write(os.path.relpath(path, workdir) + "\n")

  sys.addaudithook(hook)

_install()
'''

# Plain JAX, no jaxad: if this fails, the platform cannot run multi-process CPU collectives.
PROBE = '''
import sys, jax, numpy as np
from jax.experimental import multihost_utils
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]), initialization_timeout=60)
got = multihost_utils.process_allgather(np.array([jax.process_index()]), tiled=True)
assert got.tolist() == [0, 1], got
'''


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start(folder, name: str, argvs: list[list[str]], env=ENV):
  """Starts one process per argv, output to files in `folder`: [(proc, out, err)]."""
  started = []
  for i, argv in enumerate(argvs):
    out, err = (open(folder / f"{name}.{i}.{s}", "w+") for s in ("out", "err"))
    started.append((subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=err,
                                     text=True), out, err))
  return started


def _finish(started, timeout: float = TIMEOUT_S) -> list[tuple[int, str, str]]:
  """Waits for every process (killing all of them after `timeout`); (rc, out, err) each."""
  deadline, hung = time.monotonic() + timeout, False
  for proc, _, _ in started:
    try:
      proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      hung = True
  results = []
  for proc, out, err in started:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
    out.seek(0)
    err.seek(0)
    results.append((proc.returncode, out.read(), err.read()))
    out.close()
    err.close()
  if hung:
    pytest.fail(f"processes still running after {timeout}s: "
                + " | ".join(e[-1500:] for _, _, e in results))
  return results


def _check_ok(results, what: str) -> None:
  for i, (rc, _, err) in enumerate(results):
    assert rc == 0, f"{what}: process {i} exited with {rc}:\n{err[-3000:]}"


def _audited_env(folder, workdir, name: str) -> dict:
  return dict(ENV, PYTHONPATH=os.pathsep.join([str(folder / "audit"), ROOT]),
              AUDIT_DIR=str(folder), AUDIT_WORKDIR=str(workdir), AUDIT_NAME=name)


def _writes(folder, name: str) -> list[list[str]]:
  """Per process, the files (relative to the workdir) it opened for writing."""
  return [sorted(set((folder / f"{name}.writes.{i}").read_text().split()))
          for i in range(2)]


def _run_pair(folder, workdir, name: str, module: str, *args):
  """`python -m module args` as processes 0 and 1 of a two-process run; both succeed."""
  address = f"localhost:{_free_port()}"
  started = _start(folder, name, [
      [sys.executable, "-m", module, *args, f"--coordinator_address={address}",
       "--num_processes=2", f"--process_id={i}"] for i in range(2)],
      env=_audited_env(folder, workdir, name))
  results = _finish(started)
  _check_ok(results, name)
  return results, _writes(folder, name)


def _run_launcher(folder, workdir, name: str, *args):
  """launch/local_multiprocess.sh 2 args (one output stream for both processes)."""
  env = dict(_audited_env(folder, workdir, name), PYTHON=sys.executable,
             DEVICES_PER_PROCESS=str(DEVICES_PER_PROCESS))
  script = os.path.join(ROOT, "launch", "local_multiprocess.sh")
  results = _finish(_start(folder, name, [["bash", script, "2", *args]], env=env))
  _check_ok(results, name)
  return results[0], _writes(folder, name)


@pytest.fixture(scope="module")
def collectives(tmp_path_factory):
  """Skips the module (saying why) if two CPU processes cannot run a collective."""
  folder = tmp_path_factory.mktemp("probe")
  address = f"localhost:{_free_port()}"
  started = _start(folder, "probe", [[sys.executable, "-c", PROBE, address, str(i)]
                                     for i in range(2)])
  results = _finish(started, timeout=120)
  failed = [err for rc, _, err in results if rc != 0]
  if failed:
    reason = ("this platform cannot run multi-process CPU collectives (JAX's gloo "
              f"backend); a plain jax.distributed probe failed: {failed[0][-600:]}")
    print(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def runs(collectives, tmp_path_factory):
  """Two-process train (stopped at step 4, resumed to 8) and eval; the same in one."""
  folder = tmp_path_factory.mktemp("multihost")
  (folder / "audit").mkdir()
  (folder / "audit" / "sitecustomize.py").write_text(AUDIT)
  config_path = folder / "tiny_config.py"
  config_path.write_text(CONFIG)
  workdir = folder / "two"
  t = time.perf_counter()
  first = _run_pair(folder, workdir, "train4", "jaxad.train", f"--config={config_path}",
                    f"--workdir={workdir}", "--config.train.num_steps=4")
  second = _run_pair(folder, workdir, "train8", "jaxad.train", f"--config={config_path}",
                     f"--workdir={workdir}")
  evaluated = _run_launcher(folder, workdir, "eval", "evaluate", f"--workdir={workdir}")
  timings = {"two_processes_s": time.perf_counter() - t}

  # One process, 4 devices, the config the two processes saved.
  t = time.perf_counter()
  config = config_lib.load_workdir_config(str(workdir))
  ref_dir = str(folder / "one")
  devices = jax.devices()[:2 * DEVICES_PER_PROCESS]
  ref_state, ref_summary = trainer.train_and_evaluate(config, ref_dir, devices=devices)
  evaluation.evaluate(ref_dir, devices=devices)
  timings["one_process_s"] = time.perf_counter() - t
  print(f"multihost timings: {timings}")
  return {"workdir": workdir, "ref_dir": ref_dir, "first": first, "second": second,
          "eval": evaluated, "ref_state": ref_state, "ref_summary": ref_summary}


def _summary(stdout: str) -> dict:
  """The `key=value ...` line the train binary prints at the end."""
  line = [l for l in stdout.splitlines() if "step=" in l][-1]
  return dict(kv.split("=", 1) for kv in line.split())


def test_two_processes_train_like_one(runs):
  (_, out0, err0), _ = runs["second"][0]
  assert "resumed from step 4" in err0  # every process restored the step-4 checkpoint
  summary = _summary(out0)
  assert summary["step"] == "8" and summary["devices"] == str(2 * DEVICES_PER_PROCESS)
  ref = runs["ref_summary"]
  assert ref["devices"] == 2 * DEVICES_PER_PROCESS
  np.testing.assert_allclose(float(summary["train_loss"]), ref["train_loss"], rtol=1e-4)
  np.testing.assert_allclose(float(summary["val_neg_elbo"]), ref["val_neg_elbo"], rtol=1e-4)
  ckpt = checkpoint.Checkpoints(str(runs["workdir"]))
  try:
    assert ckpt.latest_step() == 8
    two = ckpt.restore(runs["ref_state"])
  finally:
    ckpt.close()
  one = runs["ref_state"]
  for a, b in zip(jax.tree.leaves((one.params, one.model_state, one.opt_state)),
                  jax.tree.leaves((two.params, two.model_state, two.opt_state))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6)


def test_only_process_0_writes_logs_and_files(runs):
  for name in ("first", "second", "eval"):
    writes0, writes1 = runs[name][1]
    # process 1 writes only its shards of the checkpoints (orbax: every process saves)
    assert [w for w in writes1 if not w.startswith("checkpoints" + os.sep)] == [], name
    assert writes0, f"{name}: the audit hook saw no write from process 0"
  for name in ("first", "second"):
    (_, out0, err0), (_, out1, err1) = runs[name][0]
    assert "step=" in out0 and "step=" not in out1, name
    assert "training conv_vae" in err0 and "training conv_vae" not in err1, name
    assert "step/s" in err0 and "step/s" not in err1, name  # the progress bar
  assert "train.log" in runs["first"][1][0]
  assert any(w.endswith("config.json") or ".config.json." in w for w in runs["first"][1][0])
  events = os.listdir(runs["workdir"] / "events")
  assert len([f for f in events if f.startswith("events.out.tfevents")]) == 2  # 1 per run
  # The launcher merges both processes' output: one headline table, one progress bar.
  _, out, err = runs["eval"][0]
  assert out.count("results in ") == 1 and err.count("scoring test:   0%") == 1, \
      (out, err[-2000:])
  eval0 = runs["eval"][1][0]
  for name in ("scores.csv", "scores.npz", "maps.npz", "metrics.json", "report.html"):
    assert any(w.endswith(name) or f".{name}." in w for w in eval0), (name, eval0)


def test_eval_gathers_one_scores_file_in_single_process_order(runs):
  two = np.load(os.path.join(runs["workdir"], "eval", "test", "scores.npz"))
  one = np.load(os.path.join(runs["ref_dir"], "eval", "test", "scores.npz"))
  assert len(two["id"]) == 40 and len(set(two["id"].tolist())) == 40  # every image once
  np.testing.assert_array_equal(two["index"], np.arange(40))
  np.testing.assert_array_equal(two["id"], one["id"])
  np.testing.assert_array_equal(two["anomalous"], one["anomalous"])
  for k in ("vae", "vae_rec", "vae_kl", "iwae"):
    np.testing.assert_allclose(two[k], one[k], rtol=1e-4, atol=1e-4, err_msg=k)
  with open(os.path.join(runs["workdir"], "eval", "test", "scores.csv")) as f:
    assert len(f.read().splitlines()) == 41
  maps_two = np.load(os.path.join(runs["workdir"], "eval", "test", "maps.npz"))
  maps_one = np.load(os.path.join(runs["ref_dir"], "eval", "test", "maps.npz"))
  np.testing.assert_array_equal(maps_two["index"], np.arange(40))
  for k in maps_one.files:
    if k not in ("index", "id"):
      np.testing.assert_allclose(maps_two[k], maps_one[k], rtol=1e-3, atol=1e-4, err_msg=k)


# Flags and errors: each names the problem and what to check.

def test_single_process_without_flags_does_nothing(monkeypatch):
  monkeypatch.setattr(parallel, "cluster_environment", lambda: None)
  assert parallel.initialize() is False
  assert not jax.distributed.is_initialized()


@pytest.mark.parametrize("args, message", [
    (("localhost:1234", 2, 2), "--process_id=2 is out of range for --num_processes=2"),
    (("localhost:1234", 2, -1), "--process_id=-1 is out of range"),
    (("localhost:1234", 0, 0), "--num_processes=0"),
    (("localhost", 2, 1), "is not host:port"),
    ((None, 2, 1), "--coordinator_address not set"),
    (("localhost:1234", None, None), "--num_processes, --process_id not set"),
])
def test_bad_flags_are_named(monkeypatch, args, message):
  monkeypatch.setattr(parallel, "cluster_environment", lambda: None)
  with pytest.raises(ConfigError, match=message):
    parallel.initialize(*args)


def test_unreachable_coordinator_says_what_to_check(tmp_path):
  code = textwrap.dedent(f"""
      from jaxad import parallel
      parallel.initialize("localhost:{_free_port()}", 2, 1, timeout_s=2)
      """)
  done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, text=True,
                        capture_output=True, timeout=120)
  assert done.returncode != 0
  assert "nothing accepted connections at --coordinator_address=localhost:" in done.stderr
  assert "process 0 is running" in done.stderr


def test_slurm_environment_is_detected(monkeypatch):
  """JAX's own SLURM detection (a private registry jaxad reads: this fails if it moves)."""
  slurm = {"SLURM_JOB_ID": "1234", "SLURM_STEP_NODELIST": "node[001-004]",
           "SLURM_NTASKS": "16", "SLURM_PROCID": "3", "SLURM_LOCALID": "3"}
  for key, value in slurm.items():
    monkeypatch.setenv(key, value)
  assert parallel.cluster_environment() == ("slurm", 16)
  monkeypatch.setenv("SLURM_NTASKS", "1")
  assert parallel.initialize() is False  # a one-task job has nothing to join
