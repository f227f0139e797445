"""Variational autoencoders as pure flax.linen modules (2D images and 3D volumes).

Models map images to the parameters of q(z|x) (`encode`) and latents to the decoder
output (`decode`); what that output means (a Gaussian mean, Bernoulli logits, a mean and
a log-variance, a logistic mixture) and how it is scored belongs to `jaxad.objectives`.
A likelihood with P > 1 parameters per value (`Likelihood.params_per_value`) gets a
decoder output (B, *image_shape, P); with P = 1 it is (B, *image_shape). Parameters are
explicit pytrees:

  variables = model.init(rng, x, train=False)
  mu, logvar = model.apply(variables, x, train=False, method=model.encode)

`dtype` (jaxad.models.precision) sets the computation dtype: with jnp.bfloat16 the
convolutions, matmuls and activations run in bfloat16 while the parameters, the
BatchNorm statistics, the (mu, logvar) heads and the decoder output stay float32.
"""

from collections.abc import Callable, Sequence
import functools
import math

import flax.linen as nn
import jax
import ml_collections

from jaxad.errors import ConfigError
from jaxad.models import layers
from jaxad.models import precision
from jaxad.objectives import likelihood as likelihood_lib

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "leaky_relu": functools.partial(nn.leaky_relu, negative_slope=0.2),
    "relu": nn.relu,
    "silu": nn.silu,
    "elu": nn.elu,
}
NORMS = ("batch", "none")
MIN_SIDE = 4  # the encoder stops at a 4×4 map, which the heads cover with one kernel.
MAX_LISTED_SIDE = 512


def get_activation(name: str, field: str) -> Callable[[jax.Array], jax.Array]:
  """The activation called `name`; `field` names the config key in the error."""
  if name not in ACTIVATIONS:
    raise ConfigError(f"{field}={name!r} is not an activation; use one of {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def _check_norm(norm: str) -> None:
  if norm not in NORMS:
    raise ConfigError(f"model.norm={norm!r} is not a normalisation; use one of {NORMS}")


def _valid_sides() -> list[int]:
  sides, side = [], MIN_SIDE
  while side <= MAX_LISTED_SIDE:
    sides.append(side)
    side *= 2
  return sides


def _nearest_valid(side: int) -> list[int]:
  """The valid sides just below and above `side` (for the error message)."""
  below = [s for s in _valid_sides() if s < side][-1:]
  above = [s for s in _valid_sides() if s > side][:1]
  return below + above or [MIN_SIDE]


def num_blocks(side: int) -> int:
  """k such that side = 4·2^k: the number of stride-2 blocks a conv VAE needs."""
  k = int(side).bit_length() - 1 - 2
  if side < MIN_SIDE or side != MIN_SIDE * 2**k:
    listed = ", ".join(str(s) for s in _valid_sides())
    fix = " or ".join(str(s) for s in _nearest_valid(side))
    raise ConfigError(
        f"conv VAE needs every image side = 4·2^k ({listed}...); got {side}: set "
        f"data.image_size (and data.depth for volumes) to one of {fix}, or use "
        f"model.name='mlp_vae'")
  return k


def check_conv_shape(image_shape: Sequence[int], widths: Sequence[int]) -> int:
  """Validates a conv VAE's input shape against its widths; returns the block count."""
  if len(image_shape) < 2:
    raise ConfigError(
        f"conv VAE needs an image shape (H, W, C) or (D, H, W, C); got {tuple(image_shape)}")
  sides = tuple(image_shape[:-1])
  ks = [num_blocks(s) for s in sides]
  if len(set(ks)) != 1:
    raise ConfigError(
        f"conv VAE needs every image side to be the same 4·2^k; got sides {sides}: set "
        f"data.image_size (and data.depth for volumes) so they are equal")
  k = ks[0]
  if len(widths) != k:
    raise ConfigError(
        f"model.widths has {len(widths)} entries but a {sides[0]}-pixel input needs {k} "
        f"stride-2 blocks ({sides[0]}→{MIN_SIDE}): give {k} widths, or set model.widths=() "
        f"for the DCGAN default")
  if any(int(w) <= 0 for w in widths):
    raise ConfigError(f"model.widths must all be positive; got {tuple(widths)}")
  return k


def default_widths(image_size: int, base: int = 32, max_width: int = 512) -> tuple[int, ...]:
  """DCGAN widths base·2^i (capped at max_width), one per stride-2 block."""
  if base <= 0 or max_width <= 0:
    raise ConfigError(f"model.base_width must be positive; got {base}")
  return tuple(min(base * 2**i, max_width) for i in range(num_blocks(image_size)))


def _batch_norm(train: bool, name: str, dtype: precision.Dtype = None) -> nn.BatchNorm:
  """BatchNorm whose output is `dtype`; its statistics are float32 whatever the dtype."""
  return nn.BatchNorm(momentum=0.9, epsilon=1e-5, use_running_average=not train,
                      dtype=dtype, name=name)


class ConvEncoder(nn.Module):
  """Stride-2 conv blocks down to a 4^ndim map, then two conv heads (mu, logvar).

  The heads compute in float32 (their outputs go through exp() and the KL).
  """

  widths: tuple[int, ...]
  latent_dim: int
  norm: str = "batch"
  activation: str = "leaky_relu"
  dtype: precision.Dtype = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    ndim = x.ndim - 2
    act = get_activation(self.activation, "model.encoder_activation")
    use_bn = self.norm == "batch"
    for i, width in enumerate(self.widths):
      x = nn.Conv(width, (4,) * ndim, strides=(2,) * ndim, padding=((1, 1),) * ndim,
                  use_bias=not use_bn, dtype=self.dtype, name=f"conv_{i}")(x)
      if use_bn:
        x = _batch_norm(train, f"bn_{i}", self.dtype)(x)
      x = act(x)
    # layers.Conv: nn.Conv's function and parameters; a 4^n kernel on the 4^n map is a
    # matmul.
    head = precision.f32_dtype(self.dtype)
    mu = layers.Conv(self.latent_dim, (4,) * ndim, padding="VALID", dtype=head, name="mu")(x)
    logvar = layers.Conv(self.latent_dim, (4,) * ndim, padding="VALID", dtype=head,
                         name="logvar")(x)
    batch = x.shape[0]
    return mu.reshape(batch, self.latent_dim), logvar.reshape(batch, self.latent_dim)


class ConvDecoder(nn.Module):
  """Mirror of the encoder: 1→4 transposed conv, stride-2 upsampling, linear output.

  The last layer has out_channels·params_per_value channels; with params_per_value
  P > 1 they are read as (channel, parameter) pairs, the output (B, *spatial, C, P).
  The output is float32 (at least) whatever the computation dtype.
  """

  widths: tuple[int, ...]
  out_channels: int
  spatial_ndim: int
  norm: str = "batch"
  activation: str = "relu"
  dtype: precision.Dtype = None
  params_per_value: int = 1

  @nn.compact
  def __call__(self, z: jax.Array, train: bool) -> jax.Array:
    ndim = self.spatial_ndim
    act = get_activation(self.activation, "model.decoder_activation")
    use_bn = self.norm == "batch"
    x = z.reshape(z.shape[0], *(1,) * ndim, z.shape[-1])
    features = (*reversed(self.widths), self.out_channels * self.params_per_value)
    for i, width in enumerate(features):
      first, last = i == 0, i == len(features) - 1
      # layers.ConvTranspose: nn.ConvTranspose's function and parameters, with a fast
      # backward pass on XLA:CPU.
      x = layers.ConvTranspose(
          width, (4,) * ndim, strides=(1 if first else 2,) * ndim,
          padding="VALID" if first else "SAME", use_bias=last or not use_bn,
          dtype=self.dtype, name=f"deconv_{i}")(x)
      if not last:
        if use_bn:
          x = _batch_norm(train, f"bn_{i}", self.dtype)(x)
        x = act(x)
    if self.params_per_value > 1:
      x = x.reshape(*x.shape[:-1], self.out_channels, self.params_per_value)
    return precision.at_least_f32(x)


class ConvVAE(nn.Module):
  """DCGAN-like fully convolutional VAE; the same code serves 2D and 3D inputs.

  Every spatial side must be 4·2^k with one k for all sides, and `widths` gives the
  channels of the k stride-2 encoder blocks (the decoder mirrors them).
  """

  image_shape: tuple[int, ...]
  latent_dim: int
  widths: tuple[int, ...]
  norm: str = "batch"
  encoder_activation: str = "leaky_relu"
  decoder_activation: str = "relu"
  dtype: precision.Dtype = None  # computation dtype; None: as the inputs (float32)
  params_per_value: int = 1  # decoder outputs per value (the likelihood's)

  def __post_init__(self):
    check_conv_shape(self.image_shape, self.widths)
    _check_norm(self.norm)
    _check_params_per_value(self.params_per_value)
    get_activation(self.encoder_activation, "model.encoder_activation")
    get_activation(self.decoder_activation, "model.decoder_activation")
    super().__post_init__()

  def setup(self):
    widths = tuple(int(w) for w in self.widths)
    self.encoder = ConvEncoder(widths, self.latent_dim, self.norm, self.encoder_activation,
                               self.dtype)
    self.decoder = ConvDecoder(widths, self.image_shape[-1], len(self.image_shape) - 1,
                               self.norm, self.decoder_activation, self.dtype,
                               self.params_per_value)

  def encode(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
    """Parameters (mu, logvar) of q(z|x), each (B, latent_dim)."""
    _check_input(x, self.image_shape)
    return self.encoder(x, train)

  def decode(self, z: jax.Array, train: bool = False) -> jax.Array:
    """Decoder output (B, *image_shape[, P]) for latents z (B, latent_dim)."""
    return self.decoder(z, train)

  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
    """(mu, logvar); during `init` it also decodes mu so every parameter is created."""
    return _encode_for_init(self, x, train)


class MLPVAE(nn.Module):
  """Fully connected VAE on flattened images (any shape, linear output)."""

  image_shape: tuple[int, ...]
  latent_dim: int = 20
  hidden: tuple[int, ...] = (400, 400, 400)
  activation: str = "relu"
  dtype: precision.Dtype = None  # computation dtype; None: as the inputs (float32)
  params_per_value: int = 1  # decoder outputs per value (the likelihood's)

  def __post_init__(self):
    get_activation(self.activation, "model.activation")
    _check_params_per_value(self.params_per_value)
    if not self.hidden or any(int(h) <= 0 for h in self.hidden):
      raise ConfigError(f"model.hidden must be positive layer sizes; got {tuple(self.hidden)}")
    super().__post_init__()

  def setup(self):
    hidden = tuple(int(h) for h in self.hidden)
    self.encoder = MLPEncoder(hidden, self.latent_dim, self.activation, self.dtype)
    self.decoder = MLPDecoder(hidden, tuple(self.image_shape), self.activation, self.dtype,
                              self.params_per_value)

  def encode(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
    """Parameters (mu, logvar) of q(z|x), each (B, latent_dim); `train` is unused."""
    del train
    _check_input(x, self.image_shape)
    return self.encoder(x)

  def decode(self, z: jax.Array, train: bool = False) -> jax.Array:
    """Decoder output (B, *image_shape[, P]); `train` is unused."""
    del train
    return self.decoder(z)

  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
    """(mu, logvar); during `init` it also decodes mu so every parameter is created."""
    return _encode_for_init(self, x, train)


class MLPEncoder(nn.Module):
  """Flatten → Dense+activation per hidden layer → two Dense heads (mu, logvar).

  The heads compute in float32 (their outputs go through exp() and the KL).
  """

  hidden: tuple[int, ...]
  latent_dim: int
  activation: str = "relu"
  dtype: precision.Dtype = None

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    act = get_activation(self.activation, "model.activation")
    x = x.reshape(x.shape[0], -1)
    for i, width in enumerate(self.hidden):
      x = act(nn.Dense(width, dtype=self.dtype, name=f"dense_{i}")(x))
    head = precision.f32_dtype(self.dtype)
    return (nn.Dense(self.latent_dim, dtype=head, name="mu")(x),
            nn.Dense(self.latent_dim, dtype=head, name="logvar")(x))


class MLPDecoder(nn.Module):
  """Dense+activation per hidden layer → Dense to every value (× params_per_value P),
  reshaped to (B, *image_shape) or, P > 1, (B, *image_shape, P); linear output (float32
  at least, whatever the computation dtype)."""

  hidden: tuple[int, ...]
  image_shape: tuple[int, ...]
  activation: str = "relu"
  dtype: precision.Dtype = None
  params_per_value: int = 1

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    act = get_activation(self.activation, "model.activation")
    x = z
    for i, width in enumerate(self.hidden):
      x = act(nn.Dense(width, dtype=self.dtype, name=f"dense_{i}")(x))
    p = self.params_per_value
    x = nn.Dense(math.prod(self.image_shape) * p, dtype=self.dtype, name="out")(x)
    shape = (*self.image_shape, p) if p > 1 else tuple(self.image_shape)
    return precision.at_least_f32(x.reshape(z.shape[0], *shape))


def _encode_for_init(model, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
  mu, logvar = model.encode(x, train)
  if model.is_initializing():
    model.decode(mu, train)
  return mu, logvar


def _check_params_per_value(p) -> None:
  if isinstance(p, bool) or not isinstance(p, int) or p < 1:
    raise ConfigError(f"params_per_value={p!r} must be a positive int (the likelihood's "
                      "Likelihood.params_per_value)")


def _check_input(x: jax.Array, image_shape: Sequence[int]) -> None:
  if tuple(x.shape[1:]) != tuple(image_shape):
    raise ValueError(
        f"the model was built for images of shape {tuple(image_shape)} (batch first) but "
        f"got a batch of shape {tuple(x.shape)}")


def conv_vae_from_config(model_cfg: ml_collections.ConfigDict, image_shape: tuple[int, ...],
                         dtype: precision.Dtype = None) -> ConvVAE:
  """A ConvVAE; model.widths=() picks the DCGAN default for the image side."""
  widths = tuple(model_cfg.get("widths", ()))
  if not widths:
    widths = default_widths(image_shape[0], model_cfg.get("base_width", 32))
  return ConvVAE(
      image_shape=tuple(image_shape), latent_dim=int(model_cfg.latent_dim), widths=widths,
      norm=model_cfg.get("norm", "batch"),
      encoder_activation=model_cfg.get("encoder_activation", "leaky_relu"),
      decoder_activation=model_cfg.get("decoder_activation", "relu"), dtype=dtype,
      params_per_value=config_params_per_value(model_cfg))


def mlp_vae_from_config(model_cfg: ml_collections.ConfigDict, image_shape: tuple[int, ...],
                        dtype: precision.Dtype = None) -> MLPVAE:
  """An MLPVAE; activation: model.activation if set, else model.encoder_activation."""
  return MLPVAE(
      image_shape=tuple(image_shape), latent_dim=int(model_cfg.latent_dim),
      hidden=tuple(model_cfg.get("hidden", (400, 400, 400))),
      activation=model_cfg.get("activation", model_cfg.get("encoder_activation", "relu")),
      dtype=dtype, params_per_value=config_params_per_value(model_cfg))


def config_params_per_value(model_cfg: ml_collections.ConfigDict) -> int:
  """Decoder outputs per value for model.likelihood and model.likelihood_mixtures."""
  return likelihood_lib.params_per_value(model_cfg.get("likelihood", "gaussian"),
                                         int(model_cfg.get("likelihood_mixtures", 1)))


MODELS: dict[str, Callable[..., nn.Module]] = {  # (model config, image shape, dtype)
    "conv_vae": conv_vae_from_config,
    "mlp_vae": mlp_vae_from_config,
}


def build_model(model_cfg: ml_collections.ConfigDict, image_shape: Sequence[int],
                dtype: precision.Dtype = None) -> nn.Module:
  """The model `model_cfg.name` names, for images of `image_shape` (no batch axis).

  dtype: the computation dtype (`jaxad.families.compute_dtype` of the config); None
  computes as the inputs (float32).
  """
  name = model_cfg.get("name", None)
  if name not in MODELS:
    raise ConfigError(f"model.name={name!r} is not a model; use one of {sorted(MODELS)}")
  if int(model_cfg.get("latent_dim", 0)) <= 0:
    raise ConfigError(
        f"model.latent_dim must be a positive integer; got {model_cfg.get('latent_dim')}")
  return MODELS[name](model_cfg, tuple(int(s) for s in image_shape), dtype)


def conv_vae_128(image_channels: int = 3, latent_dim: int = 300) -> ConvVAE:
  """The 128×128 DCGAN VAE (widths 32..512, BatchNorm) of the PyTorch reference."""
  return ConvVAE(image_shape=(128, 128, image_channels), latent_dim=latent_dim,
                 widths=(32, 64, 128, 256, 512), norm="batch",
                 encoder_activation="leaky_relu", decoder_activation="relu")


def conv_vae_64(image_channels: int = 1, latent_dim: int = 256) -> ConvVAE:
  """The 64×64 VAE without normalisation (widths 16, 32, 64, 256) of the reference."""
  return ConvVAE(image_shape=(64, 64, image_channels), latent_dim=latent_dim,
                 widths=(16, 32, 64, 256), norm="none",
                 encoder_activation="leaky_relu", decoder_activation="leaky_relu")


def mlp_vae_28(latent_dim: int = 20) -> MLPVAE:
  """The MNIST-sized fully connected VAE (3×400 hidden units)."""
  return MLPVAE(image_shape=(28, 28, 1), latent_dim=latent_dim)
