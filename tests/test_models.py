"""Tests for jaxad.models.vae: exact parameter counts, shapes in 2D/3D, config errors.

Parameter counts and most shapes use `jax.eval_shape` (nothing compiled); the few real
forward passes use NumPy-filled parameters, since compiling the PRNG initialisers on a
small CPU costs seconds per model.
"""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import numpy_variables
from jaxad.errors import ConfigError
from jaxad.models import vae


def abstract_variables(model, image_shape, batch=1):
  x = jax.ShapeDtypeStruct((batch, *image_shape), jnp.float32)
  return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)


def count(tree) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))



def model_config(**overrides) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(dict(
      name="conv_vae", latent_dim=8, widths=(4, 8), base_width=32, norm="batch",
      encoder_activation="leaky_relu", decoder_activation="relu", hidden=(16, 16),
      likelihood="gaussian", beta=0.01))
  cfg.update(overrides)
  return cfg


@pytest.mark.parametrize("model, image_shape, total, encoder, decoder", [
    (vae.ConvVAE((128, 128, 3), 300, (32, 64, 128, 256, 512), "batch", "leaky_relu",
                 "relu"), (128, 128, 3), 12_951_003, 7_704_600, 5_246_403),
    (vae.ConvVAE((64, 64, 1), 256, (16, 32, 64, 256), "none", "leaky_relu",
                 "leaky_relu"), (64, 64, 1), 3_753_697, 2_401_392, 1_352_305),
    (vae.MLPVAE((28, 28, 1), 20, (400, 400, 400)), (28, 28, 1), 1_294_424, 650_840,
     643_584),
])
def test_parameter_counts_match_reference(model, image_shape, total, encoder, decoder):
  params = abstract_variables(model, image_shape)["params"]
  assert count(params) == total
  assert count(params["encoder"]) == encoder
  assert count(params["decoder"]) == decoder


def test_presets_match_reference_counts():
  assert count(abstract_variables(vae.conv_vae_128(), (128, 128, 3))["params"]) == 12_951_003
  assert count(abstract_variables(vae.conv_vae_64(), (64, 64, 1))["params"]) == 3_753_697
  assert count(abstract_variables(vae.mlp_vae_28(), (28, 28, 1))["params"]) == 1_294_424


def test_batch_stats_only_with_batch_norm():
  with_bn = abstract_variables(vae.ConvVAE((16, 16, 1), 4, (2, 2), norm="batch"), (16, 16, 1))
  without = abstract_variables(vae.ConvVAE((16, 16, 1), 4, (2, 2), norm="none"), (16, 16, 1))
  assert set(with_bn) == {"params", "batch_stats"}
  assert set(without) == {"params"}


def forward_shapes(model, image_shape, batch=2):
  """Shapes of (mu, logvar, decode(mu)) without compiling anything."""
  def forward(x):
    variables = model.init(jax.random.key(0), x, train=False)
    mu, logvar = model.apply(variables, x, train=False, method=model.encode)
    return mu, logvar, model.apply(variables, mu, train=False, method=model.decode)

  return jax.eval_shape(forward, jax.ShapeDtypeStruct((batch, *image_shape), jnp.float32))


@pytest.mark.parametrize("side", [8, 16, 32, 64, 128])
def test_conv_vae_2d_output_shape_equals_input(side):
  k = vae.num_blocks(side)
  model = vae.ConvVAE((side, side, 3), latent_dim=5, widths=(2,) * k)
  mu, logvar, out = forward_shapes(model, (side, side, 3))
  assert mu.shape == logvar.shape == (2, 5)
  assert out.shape == (2, side, side, 3)


def test_conv_vae_3d_shapes_with_the_same_code():
  image_shape = (32, 32, 32, 1)
  model = vae.ConvVAE(image_shape, latent_dim=6, widths=(8, 16, 32))
  mu, _, out = forward_shapes(model, image_shape)
  assert mu.shape == (2, 6)
  assert out.shape == (2, *image_shape)
  params = abstract_variables(model, image_shape)["params"]
  assert params["encoder"]["conv_0"]["kernel"].shape == (4, 4, 4, 1, 8)


@pytest.mark.parametrize("norm", ["batch", "none"])
def test_conv_vae_3d_real_forward_pass(norm):
  image_shape = (16, 16, 16, 1)
  model = vae.ConvVAE(image_shape, latent_dim=3, widths=(2, 4), norm=norm)
  variables = numpy_variables(model, image_shape)
  x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (2, *image_shape)), jnp.float32)

  @jax.jit
  def forward(x):
    mu, logvar = model.apply(variables, x, train=False)
    return mu, logvar, model.apply(variables, mu, train=False, method=model.decode)

  mu, logvar, out = forward(x)
  assert mu.shape == logvar.shape == (2, 3)
  assert out.shape == x.shape
  assert np.all(np.isfinite(out))


def test_real_init_creates_encoder_and_decoder():
  model = vae.ConvVAE((8, 8, 1), latent_dim=2, widths=(2,))
  variables = jax.jit(functools.partial(model.init, train=False))(
      jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  assert set(variables["params"]) == {"encoder", "decoder"}
  assert set(variables["params"]["decoder"]) == {"deconv_0", "bn_0", "deconv_1"}
  assert set(variables["batch_stats"]["encoder"]) == {"bn_0"}
  # No bias before BatchNorm; the linear output layer has one.
  assert "bias" not in variables["params"]["decoder"]["deconv_0"]
  assert "bias" in variables["params"]["decoder"]["deconv_1"]


def test_mlp_vae_shapes_any_rank():
  for image_shape in [(28, 28, 1), (8, 8, 8, 1)]:
    model = vae.MLPVAE(image_shape, latent_dim=3, hidden=(5,))
    mu, logvar, out = forward_shapes(model, image_shape)
    assert mu.shape == logvar.shape == (2, 3)
    assert out.shape == (2, *image_shape)


def test_default_widths():
  assert vae.default_widths(128) == (32, 64, 128, 256, 512)
  assert vae.default_widths(32, base=16) == (16, 32, 64)
  assert vae.default_widths(512, base=64, max_width=256) == (64, 128, 256, 256, 256, 256, 256)
  with pytest.raises(ConfigError, match="got 100"):
    vae.default_widths(100)


def test_side_not_four_times_power_of_two():
  with pytest.raises(ConfigError, match=r"4·2\^k.*got 100.*data.image_size.*64 or 128"):
    vae.ConvVAE((100, 100, 1), latent_dim=4, widths=(2, 2, 2, 2))


def test_widths_length_mismatch():
  with pytest.raises(ConfigError,
                     match=r"model.widths has 3 entries but a 128-pixel input needs 5"):
    vae.ConvVAE((128, 128, 1), latent_dim=4, widths=(2, 2, 2))


def test_non_square_sides_with_different_k():
  with pytest.raises(ConfigError, match=r"same 4·2\^k.*\(32, 64\)"):
    vae.ConvVAE((32, 64, 1), latent_dim=4, widths=(2, 2, 2))
  with pytest.raises(ConfigError, match=r"\(16, 32, 32\)"):
    vae.ConvVAE((16, 32, 32, 1), latent_dim=4, widths=(2, 2))


@pytest.mark.parametrize("field, value", [
    ("norm", "layer"), ("encoder_activation", "gelu"), ("decoder_activation", "tanh")])
def test_bad_conv_fields(field, value):
  kwargs = dict(image_shape=(16, 16, 1), latent_dim=4, widths=(2, 2), **{field: value})
  with pytest.raises(ConfigError, match=f"model.{field}"):
    vae.ConvVAE(**kwargs)


def test_wrong_input_shape_is_reported():
  model = vae.ConvVAE((16, 16, 1), latent_dim=4, widths=(2, 2))
  with pytest.raises(ValueError, match=r"\(16, 16, 1\)"):
    abstract_variables(model, (32, 32, 1))


def test_build_model_conv_and_default_widths():
  model = vae.build_model(model_config(widths=()), (32, 32, 1))
  assert isinstance(model, vae.ConvVAE)
  assert model.widths == (32, 64, 128)
  model = vae.build_model(model_config(widths=(), base_width=4), (16, 16, 16, 1))
  assert model.widths == (4, 8)
  model = vae.build_model(model_config(norm="none", decoder_activation="silu"), (16, 16, 2))
  assert (model.widths, model.norm, model.decoder_activation) == ((4, 8), "none", "silu")
  assert model.image_shape == (16, 16, 2) and model.latent_dim == 8


def test_build_model_mlp():
  model = vae.build_model(model_config(name="mlp_vae"), (28, 28, 1))
  assert isinstance(model, vae.MLPVAE)
  assert model.hidden == (16, 16)
  assert count(abstract_variables(model, (28, 28, 1))["params"]) == (
      (784 * 16 + 16) + (16 * 16 + 16) + 2 * (16 * 8 + 8)      # encoder
      + (8 * 16 + 16) + (16 * 16 + 16) + (16 * 784 + 784))    # decoder


def test_build_model_errors():
  with pytest.raises(ConfigError, match=r"model.name='unet'.*conv_vae.*mlp_vae"):
    vae.build_model(model_config(name="unet"), (32, 32, 1))
  with pytest.raises(ConfigError, match="model.widths has 2 entries"):
    vae.build_model(model_config(), (64, 64, 1))
  with pytest.raises(ConfigError, match="got 48"):
    vae.build_model(model_config(widths=()), (48, 48, 1))
  with pytest.raises(ConfigError, match="model.latent_dim"):
    vae.build_model(model_config(latent_dim=0), (16, 16, 1))


@pytest.mark.parametrize("likelihood, mixtures, p", [
    ("gaussian_learned", 1, 2), ("discretized_logistic", 1, 2), ("discretized_logistic", 3, 9)])
@pytest.mark.parametrize("name, image_shape", [
    ("conv_vae", (16, 16, 3)), ("conv_vae", (16, 16, 16, 1)), ("mlp_vae", (8, 8, 2))])
def test_decoder_outputs_the_likelihoods_parameters_per_value(likelihood, mixtures, p, name,
                                                              image_shape):
  """build_model sizes the decoder for model.likelihood: a last axis of P parameters,
  from an output layer P times as wide (the rest of the model unchanged)."""
  cfg = model_config(name=name, likelihood=likelihood, likelihood_mixtures=mixtures)
  model = vae.build_model(cfg, image_shape)
  plain = vae.build_model(model_config(name=name), image_shape)
  assert model.params_per_value == p and plain.params_per_value == 1
  mu, _, out = forward_shapes(model, image_shape)
  assert out.shape == (2, *image_shape, p)
  assert forward_shapes(plain, image_shape)[2].shape == (2, *image_shape)
  last = "deconv_2" if name == "conv_vae" else "out"
  decoder = abstract_variables(model, image_shape)["params"]["decoder"]
  base = abstract_variables(plain, image_shape)["params"]["decoder"]
  assert decoder[last]["bias"].shape[-1] == p * base[last]["bias"].shape[-1]
  assert count(decoder) - count(decoder[last]) == count(base) - count(base[last])


def test_decoder_parameters_are_laid_out_channel_then_parameter():
  """Channel c, parameter j of the output is the last layer's channel c·P + j."""
  image_shape, p = (8, 8, 2), 3
  model = vae.ConvVAE(image_shape, latent_dim=2, widths=(2,), norm="none",
                      params_per_value=p)
  variables = numpy_variables(model, image_shape)
  z = jnp.asarray(np.random.default_rng(0).normal(size=(2, 2)), jnp.float32)
  out = jax.jit(lambda z: model.apply(variables, z, method=model.decode))(z)
  flat = vae.ConvVAE(image_shape[:-1] + (image_shape[-1] * p,), latent_dim=2, widths=(2,),
                     norm="none")
  flat_out = jax.jit(lambda z: flat.apply(variables, z, method=flat.decode))(z)
  np.testing.assert_array_equal(out, np.asarray(flat_out).reshape(*out.shape))
  with pytest.raises(ConfigError, match="params_per_value=0"):
    vae.MLPVAE((4, 4, 1), params_per_value=0)
