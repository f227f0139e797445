"""Tests for jaxad.models.unet: reference parameter counts, shapes, conditioning, errors.

The 64×64 reference is only traced (`jax.eval_shape`); forward passes use tiny widths and
NumPy-filled parameters, since compiling the PRNG initialisers costs seconds per shape.
Building blocks are checked against float64 NumPy transcriptions of the PyTorch reference.
"""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxad.errors import ConfigError
from jaxad.models import unet


def abstract_variables(model, image_shape, batch=1):
  x = jax.ShapeDtypeStruct((batch, *image_shape), jnp.float32)
  t = jax.ShapeDtypeStruct((batch,), jnp.float32)
  return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x, t)


def count(tree) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def filled(abstract, seed=0):
  """Random NumPy values in `abstract`'s structure (non-trivial norms and biases)."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      value = 1 + 0.1 * rng.normal(size=leaf.shape)
    elif "'W'" in name:
      value = 2.0 * rng.normal(size=leaf.shape)
    elif len(leaf.shape) == 1:
      value = 0.1 * rng.normal(size=leaf.shape)
    else:
      value = rng.normal(size=leaf.shape) / math.sqrt(math.prod(leaf.shape[:-1]))
    return jnp.asarray(value, jnp.float32)

  return jax.tree_util.tree_map_with_path(fill, abstract)


def unet_variables(model, image_shape, seed=0):
  return filled(abstract_variables(model, image_shape), seed)


def small_unet(**overrides) -> unet.UNet:
  fields = dict(out_channels=1, base_width=8, channel_mult=(1, 2), num_res_blocks=1,
                attention_resolutions=(4,), groups=4)
  fields.update(overrides)
  return unet.UNet(**fields)


def unet_config(**overrides) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(dict(
      base_width=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
      dropout=0.0, groups=4, embedding="sinusoidal", fourier_scale=16.0))
  cfg.update(overrides)
  return cfg


@functools.cache
def jitted_apply(model):
  return jax.jit(model.apply, static_argnames="train")


# --- the reference architecture -------------------------------------------------------


def test_score_unet_64_matches_reference_parameter_counts():
  params = abstract_variables(unet.score_unet_64(), (64, 64, 3))["params"]
  assert count(params) == 8_952_067

  def part(prefix):
    return count({k: v for k, v in params.items() if k.startswith(prefix)})

  assert part("temb_") == 82_432
  assert part("conv_in") == 1_792
  assert part("down_") == 2_551_744
  assert part("mid_") == 723_456
  assert part("up_") == 5_590_784
  assert part("norm_out") + part("conv_out") == 1_859
  attention = sorted(k for k in params if "attn" in k)
  assert attention == ["down_2_attn_0", "down_2_attn_1", "mid_attn",
                       "up_2_attn_0", "up_2_attn_1", "up_2_attn_2"]
  # Res blocks whose width changes get a 1×1 skip conv: down_1_res_0 (64→128) and
  # every up block, whose input carries the concatenated skip.
  skips = sorted(k for k, v in params.items() if "skip" in v)
  assert skips == ["down_1_res_0"] + [f"up_{i}_res_{j}" for i in range(4) for j in range(3)]


def test_build_unet_from_config_is_the_reference():
  cfg = unet_config(base_width=64, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                    attention_resolutions=(16,), groups=32)
  assert unet.build_unet(cfg, (64, 64, 3)) == unet.score_unet_64()


# --- shapes and conditioning -----------------------------------------------------------


@pytest.mark.parametrize("image_shape, overrides", [
    ((8, 8, 1), dict()),
    ((16, 16, 3), dict(channel_mult=(1, 2, 2), attention_resolutions=(8,), groups=8,
                       base_width=16)),
    ((32, 32, 1), dict(channel_mult=(1, 1, 2), attention_resolutions=())),
    ((8, 8, 2), dict(embedding="fourier", attention_resolutions=(8, 4))),
])
def test_output_shape_is_input_shape(image_shape, overrides):
  model = unet.build_unet(unet_config(**overrides), image_shape)
  variables = unet_variables(model, image_shape)
  x = jnp.ones((2, *image_shape))
  out = jitted_apply(model)(variables, x, jnp.array([1.0, 500.0]), train=False)
  assert out.shape == x.shape
  assert np.all(np.isfinite(out))


def test_time_label_changes_output_and_images_are_independent():
  model = small_unet()
  variables = unet_variables(model, (8, 8, 1))
  a, b, c = np.random.default_rng(1).normal(size=(3, 8, 8, 1)).astype(np.float32)
  apply = jitted_apply(model)
  same_x = apply(variables, jnp.stack([a, a]), jnp.array([10.0, 500.0]), train=False)
  assert np.abs(same_x[0] - same_x[1]).max() > 1e-3
  labels = jnp.array([10.0, 10.0])
  ab = apply(variables, jnp.stack([a, b]), labels, train=False)
  ac = apply(variables, jnp.stack([a, c]), labels, train=False)
  np.testing.assert_allclose(ab[0], ac[0], atol=1e-5)
  np.testing.assert_allclose(ab[0], same_x[0], atol=1e-5)  # same image, same label
  assert np.abs(ab[1] - ac[1]).max() > 1e-3


def test_dropout_only_in_training():
  model = small_unet(dropout=0.5)
  variables = unet_variables(model, (8, 8, 1))
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 8, 8, 1)), jnp.float32)
  t = jnp.array([3.0, 700.0])
  apply = jitted_apply(model)
  np.testing.assert_array_equal(apply(variables, x, t, train=False),
                                apply(variables, x, t, train=False))
  first = apply(variables, x, t, train=True, rngs={"dropout": jax.random.key(0)})
  again = apply(variables, x, t, train=True, rngs={"dropout": jax.random.key(0)})
  other = apply(variables, x, t, train=True, rngs={"dropout": jax.random.key(1)})
  np.testing.assert_array_equal(first, again)
  assert np.abs(first - other).max() > 1e-3


def test_fourier_weights_get_no_gradient():
  model = small_unet(embedding="fourier", attention_resolutions=())
  variables = unet_variables(model, (8, 8, 1))
  assert variables["params"]["temb_fourier"]["W"].shape == (4,)
  x = jnp.ones((2, 8, 8, 1))

  @jax.jit
  def grads(params):
    def loss(params):
      out = model.apply({"params": params}, x, jnp.array([0.3, 0.7]), train=False)
      return jnp.mean(out**2)
    return jax.grad(loss)(params)

  g = grads(variables["params"])
  np.testing.assert_array_equal(g["temb_fourier"]["W"], 0.0)
  assert np.abs(g["temb_dense_0"]["kernel"]).max() > 0


# --- building blocks against NumPy float64 ----------------------------------------------


def np_group_norm(x, scale, bias, groups, eps=1e-6):
  b, h, w, c = x.shape
  g = x.reshape(b, h * w, groups, c // groups)
  mean = g.mean(axis=(1, 3), keepdims=True)
  var = g.var(axis=(1, 3), keepdims=True)
  return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


def np_conv(x, kernel, bias, stride=1, pad=1):
  """Cross-correlation, NHWC/HWIO, symmetric zero padding (torch Conv2d semantics)."""
  k = kernel.shape[0]
  x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  out_h = (x.shape[1] - k) // stride + 1
  out_w = (x.shape[2] - k) // stride + 1
  out = np.zeros((x.shape[0], out_h, out_w, kernel.shape[-1])) + bias
  for di in range(k):
    for dj in range(k):
      patch = x[:, di:di + stride * out_h:stride, dj:dj + stride * out_w:stride]
      out += patch @ kernel[di, dj]
  return out


def np_silu(x):
  return x / (1 + np.exp(-x))


def as_np(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def test_sinusoidal_embedding_matches_reference_formula():
  labels = np.array([0.0, 0.999, 17.0, 998.001])
  dim = 64
  half = dim // 2
  freqs = np.exp(-np.log(10000.0) * np.arange(half) / (half - 1))
  args = labels[:, None] * freqs[None, :]
  expected = np.concatenate([np.sin(args), np.cos(args)], axis=1)
  got = unet.sinusoidal_embedding(jnp.asarray(labels, jnp.float32), dim)
  np.testing.assert_allclose(got, expected, atol=2e-4)  # float32 args up to ~1000 rad


def test_attention_block_matches_numpy():
  # A small input variance (~1e-5) makes the result depend on GroupNorm's epsilon (1e-6).
  x = 3e-3 * np.random.default_rng(3).normal(size=(2, 4, 4, 16))
  block = unet.AttnBlock(groups=4)
  params = filled(jax.eval_shape(block.init, jax.random.key(0), jnp.zeros(x.shape)))
  got = block.apply(params, jnp.asarray(x, jnp.float32))
  p = as_np(params["params"])
  h = np_group_norm(x, p["norm"]["scale"], p["norm"]["bias"], 4).reshape(2, 16, 16)
  q, k, v = (h @ p[n]["kernel"] + p[n]["bias"] for n in ("q", "k", "v"))
  logits = q @ k.transpose(0, 2, 1) / math.sqrt(16)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  expected = x + ((w @ v) @ p["proj"]["kernel"] + p["proj"]["bias"]).reshape(x.shape)
  np.testing.assert_allclose(got, expected, atol=1e-4)


def test_res_block_matches_numpy():
  rng = np.random.default_rng(4)
  x, temb = rng.normal(size=(2, 6, 6, 8)), rng.normal(size=(2, 12))
  block = unet.ResBlock(out_channels=16, groups=4)
  params = filled(jax.eval_shape(functools.partial(block.init, train=False),
                                 jax.random.key(0), jnp.zeros(x.shape), jnp.zeros(temb.shape)))
  got = block.apply(params, jnp.asarray(x, jnp.float32), jnp.asarray(temb, jnp.float32),
                    train=False)
  p = as_np(params["params"])
  h = np_conv(np_silu(np_group_norm(x, p["norm_0"]["scale"], p["norm_0"]["bias"], 4)),
              p["conv_0"]["kernel"], p["conv_0"]["bias"])
  h = h + (np_silu(temb) @ p["temb_proj"]["kernel"] + p["temb_proj"]["bias"])[:, None, None]
  h = np_silu(np_group_norm(h, p["norm_1"]["scale"], p["norm_1"]["bias"], 4))
  h = np_conv(h, p["conv_1"]["kernel"], p["conv_1"]["bias"])
  skip = np_conv(x, p["skip"]["kernel"], p["skip"]["bias"], pad=0)
  np.testing.assert_allclose(got, skip + h, atol=1e-4)


def test_downsample_pads_symmetrically():
  """The stride-2 conv pads (1, 1) like torch (Flax 'SAME' would pad (0, 1))."""
  model = small_unet()
  variables = unet_variables(model, (8, 8, 1))
  x = np.random.default_rng(5).normal(size=(1, 8, 8, 8))
  p = as_np(variables["params"]["down_0_downsample"])
  conv = unet._conv3x3(8, "down", stride=2)
  got = conv.apply({"params": p}, jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(got, np_conv(x, p["kernel"], p["bias"], stride=2), atol=1e-4)


def test_norm_widths_follow_the_reference_layout():
  # score64's table: GroupNorms see 64, 128, and the concatenations 256, 192.
  assert unet.norm_widths(64, (1, 2, 2, 2), 2) == {64, 128, 192, 256}


# --- config errors ---------------------------------------------------------------------


@pytest.mark.parametrize("image_shape, overrides, match", [
    ((12, 12, 1), dict(channel_mult=(1, 2, 2, 2)), r"model\.unet\.channel_mult.*data\.image_size"),
    ((8, 8, 1), dict(embedding="positional"), r"model\.unet\.embedding='positional'"),
    ((8, 8, 1), dict(base_width=12, groups=8), r"model\.unet\.groups=8.*base_width"),
    ((8, 8, 1), dict(attention_resolutions=(16,)), r"\[16\].*resolutions are \[8, 4\]"),
    ((8, 8, 8, 1), dict(), r"score model is 2D"),
    ((8, 16, 1), dict(), r"square"),
    ((8, 8, 1), dict(base_width=7), r"model\.unet\.base_width must be an even"),
    ((8, 8, 1), dict(channel_mult=(1, 0)), r"model\.unet\.channel_mult must be positive"),
    ((8, 8, 1), dict(num_res_blocks=0), r"model\.unet\.num_res_blocks"),
])
def test_build_unet_errors(image_shape, overrides, match):
  with pytest.raises(ConfigError, match=match):
    unet.build_unet(unet_config(**overrides), image_shape)


def test_input_side_not_divisible_is_a_value_error():
  with pytest.raises(ValueError, match=r"divisible by 2; got shape \(1, 7, 7, 1\)"):
    abstract_variables(small_unet(), (7, 7, 1))


def test_groups_above_channel_count_use_one_group_per_channel():
  # base 8, 32 groups: GroupNorms see 8, 16, 24 and 32 channels, all with < 32 groups
  # but 32, so each takes one group per channel (min(groups, channels)).
  unet.build_unet(unet_config(groups=32), (8, 8, 1))
  with pytest.raises(ConfigError, match=r"\[48\]"):  # 16 + 32 skips with 32 groups
    unet.build_unet(unet_config(groups=32, base_width=16), (8, 8, 1))
