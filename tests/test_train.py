"""The training loop: compile once, resume bit-for-bit, 1 vs 8 devices, workdir, errors."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxad import checkpoint, parallel, trainer
from jaxad import config as config_lib
from jaxad import state as state_lib
from jaxad.errors import CheckpointError, ConfigError, DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _leaves(state):
  return [np.asarray(x) for x in jax.tree.leaves((state.params, state.model_state))]


def test_training_writes_workdir_and_compiles_once(make_config, tmp_path):
  config = make_config(**{"train.num_steps": 12, "train.plateau_patience": 1,
                          "data.val_split": "val"})
  state, summary = trainer.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 12
  assert summary["train_step_compilations"] == 1  # plateau updates did not retrace
  assert np.isfinite(summary["val_neg_elbo"])
  assert os.path.exists(tmp_path / "config.json")
  assert os.path.exists(tmp_path / "train.log")
  # every 5 steps and at the end; keep_checkpoints=3 keeps all of them
  assert sorted(map(int, os.listdir(tmp_path / "checkpoints"))) == [5, 10, 12]
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "events"))


def test_loss_decreases(make_config, tmp_path):
  config = make_config(**{"train.num_steps": 60, "train.log_every_steps": 20})
  _, first = trainer.train_and_evaluate(make_config(**{"train.num_steps": 4}),
                                        str(tmp_path / "a"))
  _, last = trainer.train_and_evaluate(config, str(tmp_path / "b"))
  assert last["train_neg_elbo"] < first["train_neg_elbo"]


def test_resume_after_interrupt_gives_identical_parameters(make_config, tmp_path):
  config = make_config(**{"train.num_steps": 12, "train.plateau_patience": 1,
                          "data.val_split": "val"})
  full, _ = trainer.train_and_evaluate(config, str(tmp_path / "full"))
  # Interrupted after step 7: the latest checkpoint is step 5, so steps 6–7 are redone.
  part, _ = trainer.train_and_evaluate(config, str(tmp_path / "resumed"), stop_at_step=7)
  assert int(part.step) == 7
  assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints")) == ["5"]
  resumed, _ = trainer.train_and_evaluate(config, str(tmp_path / "resumed"))
  assert int(resumed.step) == 12
  for a, b in zip(_leaves(full), _leaves(resumed)):
    np.testing.assert_array_equal(a, b)
  assert float(full.best_val) == float(resumed.best_val)
  assert float(full.opt_state.hyperparams["learning_rate"]) == \
      float(resumed.opt_state.hyperparams["learning_rate"])


def test_one_and_eight_devices_agree(make_config, tmp_path):
  assert jax.device_count() == 8
  config = make_config(**{"train.num_steps": 8})
  one, s1 = trainer.train_and_evaluate(config, str(tmp_path / "one"),
                                       devices=jax.devices()[:1])
  eight, s8 = trainer.train_and_evaluate(config, str(tmp_path / "eight"))
  assert s8["devices"] == 8 and s1["devices"] == 1
  np.testing.assert_allclose(s1["train_loss"], s8["train_loss"], rtol=1e-5)
  for a, b in zip(_leaves(one), _leaves(eight)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)


def test_early_stopping_ends_the_run_and_stays_ended(make_config, tmp_path):
  # A zero learning rate never improves after the first epoch.
  config = make_config(**{"train.num_steps": 40, "train.early_stop_patience": 2,
                          "train.learning_rate": 1e-12, "data.val_split": "val",
                          "train.min_delta": 1.0})
  state, summary = trainer.train_and_evaluate(config, str(tmp_path))
  assert summary["stopped_early"]
  assert int(state.step) == 3 * 4  # epoch 1 sets the best, epochs 2 and 3 do not improve
  again, _ = trainer.train_and_evaluate(config, str(tmp_path))
  assert int(again.step) == int(state.step)


def test_mlp_vae_trains_with_bernoulli(make_config, tmp_path):
  config = make_config(**{"model.name": "mlp_vae", "model.hidden": (16,),
                          "model.likelihood": "bernoulli", "model.beta": 1.0})
  state, summary = trainer.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 12 and np.isfinite(summary["train_loss"])


def test_divergence_names_the_step(make_config, tmp_path):
  config = make_config(**{"train.learning_rate": 1e30, "train.num_steps": 30})
  with pytest.raises(FloatingPointError, match="diverged at step"):
    trainer.train_and_evaluate(config, str(tmp_path))


@pytest.mark.parametrize("on_device", ["true", "false"])
def test_steady_state_steps_read_nothing_back_from_the_device(make_config, tmp_path,
                                                              monkeypatch, on_device):
  """Between log, validation and checkpoint steps the loop only dispatches: any read of
  a device value there (int(), float(), np.asarray, device_get) raises. (Every read goes
  through ArrayImpl._value; jax's transfer guard does not fire for CPU arrays.)"""
  from jax._src import array as array_lib
  config = make_config(**{"train.num_steps": 24, "train.log_every_steps": 12,
                          "train.checkpoint_every_steps": 12, "data.val_split": "val",
                          "data.on_device": on_device})
  steps_per_epoch = 64 // 2 // 16  # synthetic: half the 64 images are normal
  sync = lambda s: s % 12 == 0 or s % steps_per_epoch == 0
  guarded, reads = set(), []
  current = {"step": None}
  value = array_lib.ArrayImpl._value

  def guarded_value(self):
    if current["step"] in guarded:
      reads.append(current["step"])
      raise AssertionError(f"a device value was read back during step {current['step']}")
    return value.fget(self)

  make_train_step = trainer.make_train_step

  def counted_train_step(*args, **kwargs):
    train_step = make_train_step(*args, **kwargs)

    def step(state, *inputs):  # the loop body of a step runs until the next call
      current["step"] = (current["step"] or 0) + 1
      if not sync(current["step"]) and current["step"] > 1:  # the first step compiles
        guarded.add(current["step"])
      return train_step(state, *inputs)

    step._cache_size = train_step._cache_size
    return step

  monkeypatch.setattr(array_lib.ArrayImpl, "_value", property(guarded_value))
  monkeypatch.setattr(trainer, "make_train_step", counted_train_step)
  state, _ = trainer.train_and_evaluate(config, str(tmp_path))
  current["step"] = None
  assert int(state.step) == 24 and len(guarded) == 11 and not reads


def test_divergence_saves_no_non_finite_checkpoint(make_config, tmp_path):
  # A checkpoint every step: the step whose loss is not finite is checked before its
  # state is saved (the check used to run one step late, after the save).
  config = make_config(**{"train.learning_rate": 1e30, "train.num_steps": 30,
                          "train.checkpoint_every_steps": 1, "train.log_every_steps": 100})
  with pytest.raises(FloatingPointError, match="diverged") as err:
    trainer.train_and_evaluate(config, str(tmp_path))
  ckpt = checkpoint.Checkpoints(str(tmp_path))
  steps = ckpt.all_steps()
  ckpt.close()
  assert steps, "the first steps were finite and should have been saved"
  bad = int(re.search(r"step (\d+)", str(err.value)).group(1))
  assert max(steps) < bad
  _, variables, step = state_lib.restore_variables(config, str(tmp_path), 2,
                                                   parallel.make_mesh())
  assert step == max(steps)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(variables["params"]))


# Bad input: each fails before anything compiles, with a message that names the fix.

def test_batch_not_divisible_by_devices(make_config, tmp_path):
  with pytest.raises(ConfigError, match="not divisible by the 8 devices"):
    trainer.train_and_evaluate(make_config(**{"train.batch_size": 12}), str(tmp_path))


def test_conv_input_size_must_be_4_times_power_of_two(make_config, tmp_path):
  with pytest.raises(ConfigError, match="4·2"):
    trainer.train_and_evaluate(make_config(**{"data.image_size": 12}), str(tmp_path))


def test_checkpoint_of_other_model_is_refused(make_config, tmp_path):
  trainer.train_and_evaluate(make_config(**{"train.num_steps": 5}), str(tmp_path))
  with pytest.raises(CheckpointError, match="model.latent_dim: 4 in the workdir, 8 now"):
    trainer.train_and_evaluate(make_config(**{"model.latent_dim": 8}), str(tmp_path))


@pytest.mark.parametrize("key,value", [("seed", 1), ("data.normal_classes", ("anomalous",)),
                                       ("data.synthetic.num_examples", 32),
                                       ("train.learning_rate", 1e-2)])
def test_workdir_reused_for_another_run_is_refused(make_config, tmp_path, key, value):
  """Another dataset, seed, classes or optimiser: refused, key named, config.json kept."""
  trainer.train_and_evaluate(make_config(**{"train.num_steps": 5}), str(tmp_path))
  saved = (tmp_path / "config.json").read_text()
  with pytest.raises(CheckpointError, match=rf"{key}: .* in the workdir, .* now"):
    trainer.train_and_evaluate(make_config(**{key: value}), str(tmp_path))
  assert (tmp_path / "config.json").read_text() == saved


def test_workdir_resumes_with_longer_training_and_other_cadence(make_config, tmp_path):
  trainer.train_and_evaluate(make_config(**{"train.num_steps": 5}), str(tmp_path))
  config = make_config(**{"train.num_steps": 8, "train.log_every_steps": 2,
                          "train.checkpoint_every_steps": 4, "eval.num_samples": 3})
  state, _ = trainer.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 8
  assert config_lib.load_workdir_config(str(tmp_path)).train.num_steps == 8


def test_checkpoints_without_config_json_are_refused(make_config, tmp_path):
  trainer.train_and_evaluate(make_config(**{"train.num_steps": 5}), str(tmp_path))
  (tmp_path / "config.json").unlink()
  with pytest.raises(CheckpointError, match="config.json is missing"):
    trainer.train_and_evaluate(make_config(), str(tmp_path))


def test_unknown_dataset(make_config, tmp_path):
  config = make_config(**{"data.source": "mnistt"})
  with pytest.raises(ConfigError, match="data.source='mnistt'"):
    trainer.train_and_evaluate(config, str(tmp_path))


def test_unknown_normal_class(make_config, tmp_path):
  with pytest.raises(ConfigError, match="normal"):
    trainer.train_and_evaluate(make_config(**{"data.normal_classes": ("healthy",)}),
                               str(tmp_path))


def test_empty_normal_class(make_config, tmp_path):
  # The synthetic train split holds only normal images: 'anomalous' as normal is empty.
  config = make_config(**{"data.normal_classes": ("anomalous",)})
  with pytest.raises(DataError, match="no image of the normal classes"):
    trainer.train_and_evaluate(config, str(tmp_path))


def test_batch_larger_than_data(make_config, tmp_path):
  with pytest.raises(ConfigError, match="fewer than train.batch_size"):
    trainer.train_and_evaluate(make_config(**{"train.batch_size": 128}), str(tmp_path))


def _cli(*args, binary="jaxad.train"):
  env = dict(os.environ, XLA_FLAGS="", TF_CPP_MIN_LOG_LEVEL="2")
  return subprocess.run([sys.executable, "-m", binary, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def test_cli_trains_evaluates_and_rejects_mistyped_override(tmp_path):
  """End to end on the default digits config: train briefly, evaluate, report exists."""
  small = ["--config=configs/digits_vae.py", f"--workdir={tmp_path}",
           "--config.train.num_steps=3", "--config.data.image_size=8",
           "--config.model.widths=(8,)", "--config.train.progress_bar=False"]
  ok = _cli(*small)
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert "step=3" in ok.stdout
  assert os.path.exists(tmp_path / "config.json")
  bad = _cli(*small, "--config.model.latnet_dim=3")
  assert bad.returncode != 0
  assert "latnet_dim" in bad.stderr
  evaluated = _cli(f"--workdir={tmp_path}", "--config.eval.num_samples=3",
                   "--config.eval.bootstrap=5", binary="jaxad.evaluate")
  assert evaluated.returncode == 0, evaluated.stderr[-2000:]
  assert "vae_rec" in evaluated.stdout  # the headline table
  for path in ("eval/metrics.json", "eval/test/report.html", "eval/test/scores.csv"):
    assert os.path.exists(tmp_path / path), path
  assert "9" in json.load(open(tmp_path / "eval/metrics.json"))["test"]["sample"]["vae"]


def test_prefetch_to_device_keeps_order_and_runs_ahead():
  pulled = []

  def batches():
    for i in range(5):
      pulled.append(i)
      yield np.full((8, 2), i, np.float32)

  mesh = parallel.make_mesh()
  stream = parallel.prefetch_to_device(batches(), mesh, depth=2)
  first = next(stream)
  assert len(pulled) == 3  # the next two batches are already on their way
  assert first.sharding == parallel.batch_sharded(mesh)
  rest = [int(x[0, 0]) for x in stream]
  assert [int(first[0, 0])] + rest == [0, 1, 2, 3, 4]
