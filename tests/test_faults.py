"""Fault injection: kills mid-write, and bad inputs through the real binaries.

Each probe runs what a user runs (`python -m jaxad.train`, `python -m jaxad.evaluate`)
in a fresh process and checks three things: the exit (code and one `error:` line, no
traceback), the message (names the problem and the fix), and the files left behind (no
checkpoint or result file written or changed by a failed run). The README's
"Reliability" section lists every probe and its outcome.
"""

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, XLA_FLAGS="", TF_CPP_MIN_LOG_LEVEL="2", TF_ENABLE_ONEDNN_OPTS="0",
           JAX_PLATFORMS="cpu")

# A conv VAE on 8×8 synthetic images (as conftest.tiny_config), as a config file.
TINY_CONFIG = textwrap.dedent("""
    from jaxad import defaults

    def get_config():
      c = defaults.get_config()
      c.data.source = "synthetic"
      c.data.synthetic.num_examples = 64
      c.data.synthetic.image_size = 8
      c.data.normal_classes = ("normal",)
      c.data.image_size = 8
      c.model.widths = (8,)
      c.model.latent_dim = 4
      c.train.batch_size = 16
      c.train.num_steps = 12
      c.train.learning_rate = 1e-3
      c.train.log_every_steps = 4
      c.train.checkpoint_every_steps = 4
      c.train.progress_bar = False
      c.eval.num_samples = 2
      c.eval.bootstrap = 0
      c.eval.complexity = False
      return c
    """)

# Runs a jaxad binary with orbax's final rename (the commit of checkpoint step
# $KILL_AT_STEP) replaced by SIGKILL: the process dies with the step's files written
# to the temporary folder and not yet committed, the worst moment of a save.
KILL_DURING_SAVE = textwrap.dedent("""
    import os, runpy, signal, sys
    from orbax.checkpoint._src.path import atomicity
    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def killed(self, *args, **kwargs):
      if self._final_path.name == os.environ["KILL_AT_STEP"]:
        os.kill(os.getpid(), signal.SIGKILL)
      return await finalize(self, *args, **kwargs)

    atomicity.AtomicRenameTemporaryPath.finalize = killed
    sys.argv = [sys.argv[1], *sys.argv[2:]]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
    """)


def _run(binary, *args, env=None, code=None):
  command = [sys.executable, "-m", binary, *args] if code is None else \
      [sys.executable, "-c", code, binary, *args]
  return subprocess.run(command, cwd=ROOT, env={**ENV, **(env or {})},
                        capture_output=True, text=True, timeout=300)


def _one_error_line(out, *patterns):
  """The run failed with exactly one `error:` line matching every pattern, no traceback."""
  assert out.returncode == 1, (out.returncode, out.stderr[-3000:])
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, out.stderr[-3000:]
  for pattern in patterns:
    assert pattern in errors[0], errors[0]
  return errors[0]


def _files(folder) -> dict:
  """Every file under `folder` (relative path → bytes)."""
  found = {}
  for root, _, names in os.walk(folder):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        found[os.path.relpath(path, folder)] = f.read()
  return found


def _final_parameters(workdir) -> list[np.ndarray]:
  directory = os.path.join(workdir, "checkpoints")
  step = max(int(s) for s in os.listdir(directory) if s.isdigit())
  with ocp.StandardCheckpointer() as checkpointer:
    tree = checkpointer.restore(os.path.join(directory, str(step), "default"))
  return [np.asarray(x) for x in
          __import__("jax").tree.leaves((tree["params"], tree["model_state"],
                                         tree["opt_state"]))]


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("config") / "tiny.py"
  path.write_text(TINY_CONFIG)
  return str(path)


@pytest.fixture(scope="module")
def trained(config_file, tmp_path_factory):
  """A finished tiny training workdir, made by the train binary."""
  workdir = str(tmp_path_factory.mktemp("trained"))
  out = _run("jaxad.train", f"--config={config_file}", f"--workdir={workdir}")
  assert out.returncode == 0, out.stderr[-3000:]
  return workdir


def test_kill_9_during_checkpoint_save_then_resume_equals_uninterrupted(
    config_file, trained, tmp_path):
  workdir = str(tmp_path / "killed")
  args = (f"--config={config_file}", f"--workdir={workdir}")
  killed = _run("jaxad.train", *args, code=KILL_DURING_SAVE, env={"KILL_AT_STEP": "8"})
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  committed = sorted(s for s in os.listdir(os.path.join(workdir, "checkpoints"))
                     if s.isdigit())
  assert committed == ["4"]  # step 8 was written but never committed
  resumed = _run("jaxad.train", *args)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from step 4" in resumed.stderr
  for a, b in zip(_final_parameters(trained), _final_parameters(workdir), strict=True):
    np.testing.assert_array_equal(a, b)


def test_unknown_config_key_is_one_line(config_file, tmp_path):
  out = _run("jaxad.train", f"--config={config_file}", f"--workdir={tmp_path}",
             "--config.model.latnet_dim=8")
  _one_error_line(out, "--config.model.latnet_dim", "no such key", "latent_dim")
  assert not os.listdir(tmp_path)


def test_missing_config_file_is_one_line(tmp_path):
  out = _run("jaxad.train", "--config=configs/no_such_config.py", f"--workdir={tmp_path}")
  _one_error_line(out, "cannot load --config=configs/no_such_config.py", "No such file")


def test_diverged_training_is_one_line_and_saves_no_non_finite_state(config_file, tmp_path):
  out = _run("jaxad.train", f"--config={config_file}", f"--workdir={tmp_path}",
             "--config.train.learning_rate=1e30", "--config.train.checkpoint_every_steps=1")
  _one_error_line(out, "training diverged", "train.learning_rate")
  directory = tmp_path / "checkpoints"
  steps = [s for s in os.listdir(directory) if s.isdigit()] if directory.exists() else []
  for step in steps:  # whatever was saved is finite
    with ocp.StandardCheckpointer() as checkpointer:
      tree = checkpointer.restore(str(directory / step / "default"))
    assert all(np.all(np.isfinite(x)) for x in __import__("jax").tree.leaves(tree["params"]))


def test_workdir_reused_with_another_seed_is_refused(config_file, trained):
  before = _files(trained)
  out = _run("jaxad.train", f"--config={config_file}", f"--workdir={trained}",
             "--config.seed=7", "--config.data.normal_classes=('anomalous',)")
  _one_error_line(out, "seed: 0 in the workdir, 7 now", "data.normal_classes")
  assert _files(trained) == before


def test_eval_override_of_a_trained_value_is_refused(trained):
  before = _files(trained)
  out = _run("jaxad.evaluate", f"--workdir={trained}", "--config.model.likelihood=bernoulli")
  _one_error_line(out, "model.likelihood: 'gaussian' in the workdir, 'bernoulli' now")
  assert _files(trained) == before


# Runs a jaxad binary whose pixel-map file is never finished: SIGKILL when the maps
# collected in the .maps.* scratch folder would be zipped into maps.npz.
KILL_DURING_MAPS = textwrap.dedent("""
    import os, runpy, signal, sys
    from jaxad import eval_folders
    eval_folders.MapFile.close = lambda self, extra: os.kill(os.getpid(), signal.SIGKILL)
    sys.argv = [sys.argv[1], *sys.argv[2:]]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
    """)


def _scratch(folder) -> list[str]:
  return [os.path.relpath(os.path.join(root, name), folder)
          for root, dirs, names in os.walk(folder) for name in dirs + names
          if name.startswith(".maps.") or name.endswith(".tmp")]


def test_kill_9_of_evaluate_keeps_old_results_and_the_next_run_cleans_up(trained):
  maps = ("--config.eval.save_maps=True",)
  first = _run("jaxad.evaluate", f"--workdir={trained}", *maps)
  assert first.returncode == 0, first.stderr[-3000:]
  results = os.path.join(trained, "eval")
  before = _files(results)
  assert "test/scores.csv" in before and "test/maps.npz" in before
  killed = _run("jaxad.evaluate", f"--workdir={trained}", *maps, code=KILL_DURING_MAPS)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  left = _scratch(results)
  assert left and all(p.startswith("test/.maps.") for p in left)  # the killed run's
  assert {k: v for k, v in _files(results).items() if ".maps." not in k} == before
  again = _run("jaxad.evaluate", f"--workdir={trained}", *maps)
  assert again.returncode == 0, again.stderr[-3000:]
  assert _scratch(results) == []
  assert set(_files(results)) == set(before)


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory):
  """Files a user might hand jaxad, each wrong in one way."""
  root = tmp_path_factory.mktemp("bad_data")
  rng = np.random.default_rng(0)
  good = rng.random((40, 8, 8)).astype(np.float32)
  labels = np.repeat([[0], [1]], 20, axis=0).astype(np.int64)
  arrays = {f"{s}_{k}": v for s in ("train", "val", "test")
            for k, v in (("images", good), ("labels", labels))}
  nan = good.copy()
  nan[3, 2, 2] = np.nan
  np.savez(root / "nan_pixel.npz", **{**arrays, "train_images": nan})
  np.savez(root / "float_0_255.npz", **{k: v * 255 if "images" in k else v
                                         for k, v in arrays.items()})
  np.savez(root / "string_labels.npz", **{**arrays, "train_labels": labels.astype(str)})
  np.savez(root / "nan_input.npz", images=nan[:8])
  csv = root / "labels.csv"
  csv.write_text("image,label\nok,0\n../../etc/x,1\n")
  return root


def _npz_args(path):
  return ("--config.data.source=npz", f"--config.data.path={path}",
          "--config.data.synthetic_lesions.enabled=False")


@pytest.mark.parametrize("name,extra,patterns", [
    ("nan_pixel.npz", (), ("train/3", "NaN or infinite")),
    ("float_0_255.npz", (), ("[0, 1]", "data.intensity_range=(0, 255)")),
    ("string_labels.npz", (), ("train_labels", "class")),
    ("labels.csv", ("--config.data.source=csv", "--config.data.label_column=label",
                    "--config.data.image_ext=.png"), ("line 3", "..")),
])
def test_bad_training_data_is_one_line_and_writes_nothing(config_file, bad_data, tmp_path,
                                                          name, extra, patterns):
  path = bad_data / name
  args = extra + (f"--config.data.path={path}",) if extra else _npz_args(path)
  out = _run("jaxad.train", f"--config={config_file}", f"--workdir={tmp_path}",
             "--config.data.normal_classes=('0',)", *args)
  _one_error_line(out, *patterns)
  assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "config.json").exists()


def test_non_finite_input_pixels_score_nothing(trained, bad_data):
  before = _files(trained)
  out = _run("jaxad.evaluate", f"--workdir={trained}", f"--input={bad_data / 'nan_input.npz'}")
  _one_error_line(out, "NaN or infinite")
  assert _files(trained) == before


def test_evaluating_a_diverged_model_writes_no_results(config_file, trained, tmp_path):
  """A checkpoint whose parameters are NaN (saved by an older jaxad): the eval binary
  names the images and the checkpoint, and the previous results are left as they were."""
  import shutil
  workdir = tmp_path / "diverged"
  shutil.copytree(trained, workdir)
  code = textwrap.dedent(f"""
      import jax, numpy as np, orbax.checkpoint as ocp
      path = {str(workdir / 'checkpoints' / '12' / 'default')!r}
      with ocp.StandardCheckpointer() as c:
        tree = c.restore(path)
      tree["params"] = jax.tree.map(lambda x: np.full_like(x, np.nan), tree["params"])
      import shutil; shutil.rmtree(path)
      with ocp.StandardCheckpointer() as c:
        c.save(path, tree)
      """)
  subprocess.run([sys.executable, "-c", code], check=True, env=ENV, cwd=ROOT, timeout=120)
  before = _files(workdir / "eval") if (workdir / "eval").exists() else {}
  out = _run("jaxad.evaluate", f"--workdir={workdir}")  # healthy maps checked first
  _one_error_line(out, "step 12", "non-finite", "nothing was written")
  out = _run("jaxad.evaluate", f"--workdir={workdir}", "--config.eval.pixel_maps=False")
  _one_error_line(out, "step 12", "non-finite scores", "test/")
  after = _files(workdir / "eval") if (workdir / "eval").exists() else {}
  assert after == before
