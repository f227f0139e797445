"""Device-resident training data (data.on_device): the same batches as the streamed
pipeline, resume included, and the same training."""

import jax
import numpy as np
import pytest

from jaxad import device_data, parallel, trainer
from jaxad.data import pipeline


def _split(config):
  return pipeline.load_split(config.data, "train")


@pytest.mark.parametrize("start_step", [0, 3])
def test_device_batches_equal_streamed_batches(make_config, start_step):
  """Step by step, across epoch ends, from a resume step: bit-identical batches."""
  config = make_config(**{"data.source": "digits", "data.normal_classes": ("0", "1"),
                          "data.val_split": "", "data.val_fraction": 0.2})
  split, mesh = _split(config), parallel.make_mesh()
  resident = device_data.place(split, config.data, mesh)
  assert resident.images.sharding == parallel.batch_sharded(mesh)
  gather = jax.jit(lambda images, rows: device_data.gather(images, rows, mesh))
  rows = device_data.batch_rows(split, resident, seed=3, global_batch=16,
                                start_step=start_step)
  streamed = pipeline.train_batches(split, config.data, seed=3, global_batch=16,
                                    start_step=start_step)
  per_epoch = pipeline.steps_per_epoch(split, 16)
  for _ in range(per_epoch + 2):
    batch = next(streamed)
    on_device = gather(resident.images, parallel.put_replicated(next(rows), mesh))
    np.testing.assert_array_equal(np.asarray(on_device), batch["image"])
    assert on_device.sharding == parallel.batch_sharded(mesh)


def test_training_on_device_equals_streamed_and_resumes(make_config, tmp_path):
  config = lambda on: make_config(**{"train.num_steps": 12, "data.val_split": "val",
                                     "train.plateau_patience": 1, "data.on_device": on})
  streamed, s1 = trainer.train_and_evaluate(config("false"), str(tmp_path / "streamed"))
  resident, s2 = trainer.train_and_evaluate(config("true"), str(tmp_path / "resident"))
  np.testing.assert_allclose(s1["train_loss"], s2["train_loss"], rtol=1e-5)
  np.testing.assert_allclose(s1["val_neg_elbo"], s2["val_neg_elbo"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(streamed.params), jax.tree.leaves(resident.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  trainer.train_and_evaluate(config("true"), str(tmp_path / "cut"), stop_at_step=7)
  resumed, _ = trainer.train_and_evaluate(config("true"), str(tmp_path / "cut"))
  for a, b in zip(jax.tree.leaves(resident.params), jax.tree.leaves(resumed.params)):
    np.testing.assert_array_equal(a, b)


def test_auto_keeps_data_on_device_only_when_it_fits(make_config):
  config = make_config()
  split, mesh = _split(config), parallel.make_mesh()
  need = device_data.bytes_per_device([split], config.data, mesh)
  n = len(split.normal_indices)  # normal 8×8 images, padded to the 8 devices
  assert need == -(-n // 8) * 8 * 8 * 8 * 1 * 4 // 8
  assert device_data.wanted(config.data, [split], mesh)
  config.data.on_device_fraction = need / device_data._device_memory(mesh) / 2
  assert not device_data.wanted(config.data, [split], mesh)
  config.data.on_device = "true"
  assert device_data.wanted(config.data, [split], mesh)
