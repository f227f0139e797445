"""Test setup: 8 simulated CPU devices (before JAX is first used) and tiny configs."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import pytest  # noqa: E402


from jaxad import defaults  # noqa: E402


def tiny_config(**overrides):
  """A conv VAE on 8×8 synthetic images: a train step takes milliseconds."""
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
  c.train.checkpoint_every_steps = 5
  c.train.progress_bar = False
  for key, value in overrides.items():
    node = c
    *path, last = key.split(".")
    for part in path:
      node = node[part]
    node[last] = value
  return c


@pytest.fixture
def make_config():
  return tiny_config
