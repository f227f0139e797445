"""Test setup: 8 simulated CPU devices (before JAX is first used) and tiny configs."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Complexity code lengths are cached on disk (jaxad.scores.complexity_cache): tests use a
# cache of their own (one per test process, inherited by the binaries they start), never
# the user's.
os.environ["JAXAD_CACHE_DIR"] = __import__("tempfile").mkdtemp(prefix="jaxad-test-cache-")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
# Tests train the same tiny programs several times (resume, 1 vs 8 devices): a
# persistent compilation cache lets the repeats skip XLA's compile.
jax.config.update("jax_compilation_cache_dir", os.path.join(
    __import__("tempfile").gettempdir(), "jaxad-test-jax-cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

import functools  # noqa: E402
import math  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
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


def numpy_variables(model, image_shape, seed=0, extra_inputs=()):
  """init's variable structure filled from NumPy (fan-in scaled weights, BN identity).

  Avoids compiling the PRNG initialisers, which costs seconds per shape on this CPU.
  extra_inputs: shapes of init's further array arguments (a U-Net's time label: (1,)).
  """
  abstract = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                            jax.ShapeDtypeStruct((1, *image_shape), jnp.float32),
                            *(jax.ShapeDtypeStruct(s, jnp.float32) for s in extra_inputs))
  return fill_variables(abstract, seed)


def fill_variables(abstract, seed=0):
  """Arrays for every leaf of an abstract variable tree (`jax.eval_shape` of an init):
  fan-in scaled normal weights, BatchNorm statistics and scales at identity."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if "batch_stats" in name:
      return jnp.zeros(leaf.shape, leaf.dtype) if "mean" in name else \
          jnp.ones(leaf.shape, leaf.dtype)
    if "scale" in name:
      return jnp.ones(leaf.shape, leaf.dtype)
    fan_in = math.prod(leaf.shape[:-1]) if len(leaf.shape) > 1 else 1
    return jnp.asarray(rng.normal(size=leaf.shape) / math.sqrt(fan_in), leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, abstract)


def snapshot(folder) -> dict:
  """{relative path: (bytes, mtime)} of every file under folder: what "left untouched"
  means in the tests of runs that must not overwrite earlier results."""
  out = {}
  for root, _, names in os.walk(folder):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, folder)] = (f.read(), os.stat(path).st_mtime_ns)
  return out
