"""Tests for jaxad.models.layers: ConvTranspose and Conv equal nn.ConvTranspose and nn.Conv
(values and gradients).

Both modules run with the same NumPy-filled parameters; a random linear functional of
the output gives gradients w.r.t. the input, kernel and bias to compare.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxad.models import layers

# (kernel, stride, padding) of the conv VAE decoder's two layer kinds.
UP = (4, 2, "SAME")
FROM_POINT = (4, 1, "VALID")
# (kernel, stride, padding) of the encoder's heads on its 4^n map, and its stride-2 blocks.
HEAD = (4, 1, "VALID")
DOWN = (4, 2, ((1, 1),) * 3)
PAIRS = {"transpose": (nn.ConvTranspose, layers.ConvTranspose), "conv": (nn.Conv, layers.Conv)}


def both(features, ndim, conf, use_bias, kind="transpose"):
  k, s, pad = conf
  pad = pad[:ndim] if isinstance(pad, tuple) else pad
  kwargs = dict(features=features, kernel_size=(k,) * ndim, strides=(s,) * ndim,
                padding=pad, use_bias=use_bias)
  return tuple(cls(**kwargs) for cls in PAIRS[kind])


def random_like(tree, rng):
  return jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float32), tree)


def assert_same_function(features, ndim, conf, use_bias, x_shape, seed=0, kind="transpose"):
  ref, new = both(features, ndim, conf, use_bias, kind)
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
  shapes = jax.eval_shape(ref.init, jax.random.key(0), x)
  params = random_like(shapes, rng)
  w = jnp.asarray(rng.normal(size=jax.eval_shape(ref.apply, params, x).shape), jnp.float32)

  @jax.jit
  def value_and_grads(params, x):
    """Outputs and (param, input) gradients of both modules, in one compilation."""
    def run(module):
      y = module.apply(params, x)
      return y, jax.grad(lambda p, x: jnp.vdot(module.apply(p, x), w), argnums=(0, 1))(
          params, x)
    return run(new), run(ref)

  (y_new, g_new), (y_ref, g_ref) = value_and_grads(params, x)
  np.testing.assert_allclose(y_new, y_ref, atol=1e-5, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g_new), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5)


# c_out < layers.MERGE_PHASES_BELOW takes the merged-phase conv, larger the per-phase convs.
@pytest.mark.parametrize("side, c_in, c_out, use_bias", [
    (1, 4, 1, True), (2, 3, 16, False), (3, 2, 8, True), (3, 5, 1, False), (4, 4, 3, False),
    (4, 3, 16, True)])
def test_upsampling_2d_matches_flax(side, c_in, c_out, use_bias):
  assert_same_function(c_out, 2, UP, use_bias, (2, side, side, c_in))


@pytest.mark.parametrize("side, c_in, c_out, use_bias", [
    (1, 3, 16, True), (2, 4, 3, False), (3, 2, 8, True)])
def test_upsampling_3d_matches_flax(side, c_in, c_out, use_bias):
  assert_same_function(c_out, 3, UP, use_bias, (2, side, side, side, c_in))


@pytest.mark.parametrize("ndim, c_in, c_out, use_bias", [(2, 5, 3, False), (3, 6, 16, True)])
def test_from_point_matches_flax(ndim, c_in, c_out, use_bias):
  assert_same_function(c_out, ndim, FROM_POINT, use_bias, (3, *(1,) * ndim, c_in))


def test_extra_batch_dims_and_fallback_match_flax():
  assert_same_function(8, 2, UP, True, (2, 3, 2, 2, 4))
  assert_same_function(3, 2, (3, 2, "SAME"), True, (2, 3, 3, 2))  # lax.conv_transpose path
  assert_same_function(3, 2, FROM_POINT, True, (2, 2, 2, 2))  # VALID but not 1×1


@pytest.mark.parametrize("ndim, c_in, c_out, use_bias", [(2, 5, 3, False), (2, 4, 1, True),
                                                     (3, 3, 6, True)])
def test_conv_covering_its_input_matches_flax(ndim, c_in, c_out, use_bias):
  assert_same_function(c_out, ndim, HEAD, use_bias, (3, *(4,) * ndim, c_in), kind="conv")
  # The DCGAN's logit head covers a 7^n map.
  assert_same_function(c_out, ndim, (7, 1, "VALID"), use_bias, (2, *(7,) * ndim, c_in),
                       kind="conv")


def test_conv_fallbacks_match_flax():
  assert_same_function(5, 2, DOWN, False, (2, 8, 8, 3), kind="conv")
  assert_same_function(4, 3, DOWN, True, (2, 4, 4, 4, 2), kind="conv")
  assert_same_function(3, 2, (3, 1, "SAME"), True, (2, 5, 5, 2), kind="conv")
  assert_same_function(3, 2, HEAD, True, (2, 6, 6, 2), kind="conv")  # VALID, not covering
  assert_same_function(3, 2, HEAD, True, (2, 3, 4, 4, 2), kind="conv")  # extra batch dims


@pytest.mark.parametrize("kind, conf, x_side", [("conv", HEAD, 4), ("conv", DOWN, 8)])
@pytest.mark.parametrize("ndim", [2, 3])
def test_conv_parameter_shapes_match_flax(kind, conf, x_side, ndim):
  ref, new = both(6, ndim, conf, True, kind)
  x = jax.ShapeDtypeStruct((2, *(x_side,) * ndim, 5), jnp.float32)
  shapes = lambda m: jax.tree.map(jnp.shape, jax.eval_shape(m.init, jax.random.key(0), x))
  assert shapes(new) == shapes(ref)


@pytest.mark.parametrize("ndim, conf, x_side", [(2, UP, 4), (3, UP, 2), (2, FROM_POINT, 1),
                                                (3, FROM_POINT, 1)])
@pytest.mark.parametrize("use_bias", [True, False])
def test_parameter_shapes_match_flax(ndim, conf, x_side, use_bias):
  ref, new = both(6, ndim, conf, use_bias)
  x = jax.ShapeDtypeStruct((2, *(x_side,) * ndim, 5), jnp.float32)
  shapes = lambda m: jax.tree.map(jnp.shape, jax.eval_shape(m.init, jax.random.key(0), x))
  assert shapes(new) == shapes(ref)


@pytest.mark.parametrize("kind, conf", [("transpose", UP), ("conv", DOWN)])
def test_initialisers_match_flax(kind, conf):
  """Same default initialisers, and each parameter gets the same rng as in flax."""
  ref, new = both(4, 2, conf, True, kind)
  assert new.kernel_init is ref.kernel_init and new.bias_init is ref.bias_init
  # An initialiser that writes its key's bits: equal values mean equal per-parameter rngs.
  key_bits = lambda key, shape, dtype: jnp.broadcast_to(
      jax.random.key_data(key)[-1].astype(dtype), shape)
  ref, new = (m.clone(kernel_init=key_bits, bias_init=key_bits) for m in (ref, new))
  x = jnp.zeros((1, 2, 2, 3))
  v_new, v_ref = jax.jit(lambda key: (new.init(key, x), ref.init(key, x)))(jax.random.key(3))
  jax.tree.map(np.testing.assert_array_equal, v_new, v_ref)
