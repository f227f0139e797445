"""Time-conditioned U-Net score model (DDPM ε-prediction network) as a flax.linen module.

`UNet(x, t_label, train)` predicts the noise ε in x_t = a(t)·x_0 + σ(t)·ε (Ho et al.,
"Denoising Diffusion Probabilistic Models", 2020), conditioned on the time label the
caller passes (999·t for the continuous VP-SDE of Song et al., "Score-Based Generative
Modeling through Stochastic Differential Equations", 2021). The score
score(x, t) = -net(x, 999t)/σ(t) is computed by the caller in jaxad/objectives/sde.py,
not here. With the default fields, `score_unet_64()` matches the PyTorch ScoreUNet of
../shared/bench (score64) parameter for parameter: 8,952,067 parameters.

  model = build_unet(config.model.unet, image_shape=(64, 64, 3))
  variables = model.init(rng, x, t_label, train=False)
  eps_hat = model.apply(variables, x_t, 999.0 * t, train=True, rngs={"dropout": key})

`dtype` (jaxad.models.precision): with jnp.bfloat16 the convolutions, dense layers,
attention and activations run in bfloat16; the parameters, the time embedding's
frequencies, the GroupNorm statistics, the attention softmax and the output ε̂ are float32.
"""

from collections.abc import Sequence
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxad.errors import ConfigError
from jaxad.models import precision

EMBEDDINGS = ("sinusoidal", "fourier")
GN_EPSILON = 1e-6


def sinusoidal_embedding(label: jax.Array, dim: int) -> jax.Array:
  """[sin(label·f_k), cos(label·f_k)], f_k = 10000^(-k/(dim/2-1)), k < dim/2 (DDPM)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - 1))
  args = label.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class GaussianFourierEmbedding(nn.Module):
  """[sin(2π·label·W), cos(2π·label·W)] with fixed W ~ N(0, scale²) (NCSN++).

  W is a parameter (so it is saved and restored with the model) but sits behind
  stop_gradient, so it never trains.
  """

  dim: int
  scale: float = 16.0

  @nn.compact
  def __call__(self, label: jax.Array) -> jax.Array:
    w = self.param("W", nn.initializers.normal(stddev=self.scale), (self.dim // 2,))
    args = 2 * jnp.pi * label.astype(jnp.float32)[:, None] * jax.lax.stop_gradient(w)[None]
    return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


def _group_norm(groups: int, channels: int, name: str,
                dtype: precision.Dtype = None) -> nn.GroupNorm:
  """GroupNorm with min(groups, channels) groups (UNet.__post_init__ checks they divide);
  its output is `dtype`, its statistics float32 whatever the dtype."""
  return nn.GroupNorm(num_groups=min(groups, channels), epsilon=GN_EPSILON, dtype=dtype,
                      name=name)


def _conv3x3(features: int, name: str, stride: int = 1,
             dtype: precision.Dtype = None) -> nn.Conv:
  # Explicit symmetric padding: 'SAME' with stride 2 would pad (0, 1) and shift the grid.
  return nn.Conv(features, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)),
                 dtype=dtype, name=name)


class ResBlock(nn.Module):
  """GN, SiLU, Conv3x3, + Dense(SiLU(temb)); GN, SiLU, dropout, Conv3x3; + skip(x)."""

  out_channels: int
  groups: int = 32
  dropout: float = 0.0
  dtype: precision.Dtype = None

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array, train: bool) -> jax.Array:
    dtype = self.dtype
    h = _conv3x3(self.out_channels, "conv_0", dtype=dtype)(
        nn.silu(_group_norm(self.groups, x.shape[-1], "norm_0", dtype)(x)))
    h = h + nn.Dense(self.out_channels, dtype=dtype, name="temb_proj")(
        nn.silu(temb))[:, None, None, :]
    h = nn.silu(_group_norm(self.groups, self.out_channels, "norm_1", dtype)(h))
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    h = _conv3x3(self.out_channels, "conv_1", dtype=dtype)(h)
    if x.shape[-1] != self.out_channels:
      x = nn.Conv(self.out_channels, (1, 1), dtype=dtype, name="skip")(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over the H·W positions, with a residual add.

  The softmax runs in float32 (at least) whatever the computation dtype.
  """

  groups: int = 32
  dtype: precision.Dtype = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, hh, ww, c = x.shape
    h = _group_norm(self.groups, c, "norm", self.dtype)(x).reshape(b, hh * ww, c)
    q, k, v = (nn.Dense(c, dtype=self.dtype, name=n)(h) for n in ("q", "k", "v"))
    logits = precision.at_least_f32(jnp.einsum("bqc,bkc->bqk", q, k))
    w = jax.nn.softmax(logits * c**-0.5, axis=-1).astype(v.dtype)
    h = nn.Dense(c, dtype=self.dtype, name="proj")(jnp.einsum("bqk,bkc->bqc", w, v))
    return x + h.reshape(b, hh, ww, c)


def _upsample_nearest(x: jax.Array) -> jax.Array:
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def norm_widths(base_width: int, channel_mult: Sequence[int],
                num_res_blocks: int) -> set[int]:
  """Every channel count a GroupNorm sees (res block inputs include the concatenated skips)."""
  widths = [base_width * m for m in channel_mult]
  skips, cur, seen = [base_width], base_width, set()
  for i, width in enumerate(widths):
    for _ in range(num_res_blocks):
      seen.add(cur)
      cur = width
      skips.append(cur)
    if i != len(widths) - 1:
      skips.append(cur)
  seen.add(cur)
  for width in reversed(widths):
    for _ in range(num_res_blocks + 1):
      seen.add(cur + skips.pop())
      cur = width
  return seen | set(widths)


class UNet(nn.Module):
  """DDPM ε-prediction U-Net: x (B, H, W, C), t_label (B,) → ε̂ (B, H, W, out_channels).

  Level i runs at resolution H/2^i with base_width·channel_mult[i] channels; attention
  follows every res block of a level whose resolution is in attention_resolutions
  (and the middle). Dropout needs rngs={"dropout": key} when train and dropout > 0.
  With dtype=jnp.bfloat16 the network computes in bfloat16 and returns float32 ε̂.
  """

  out_channels: int
  base_width: int = 64
  channel_mult: Sequence[int] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attention_resolutions: Sequence[int] = (16,)
  dropout: float = 0.0
  groups: int = 32
  embedding: str = "sinusoidal"
  fourier_scale: float = 16.0
  dtype: precision.Dtype = None  # computation dtype; None: as the inputs (float32)

  def __post_init__(self):
    _check_fields(self)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, t_label: jax.Array, train: bool) -> jax.Array:
    levels = len(self.channel_mult)
    if x.ndim != 4 or x.shape[1] % 2**(levels - 1) or x.shape[2] % 2**(levels - 1):
      raise ValueError(
          f"UNet needs a batch (B, H, W, C) with H and W divisible by {2**(levels - 1)}; "
          f"got shape {tuple(x.shape)}")
    t_label = jnp.broadcast_to(jnp.asarray(t_label), (x.shape[0],))
    temb_dim = 4 * self.base_width
    if self.embedding == "fourier":
      temb = GaussianFourierEmbedding(self.base_width, self.fourier_scale,
                                      name="temb_fourier")(t_label)
    else:
      temb = sinusoidal_embedding(t_label, self.base_width)
    dtype = self.dtype
    temb = nn.Dense(temb_dim, dtype=dtype, name="temb_dense_0")(temb)
    temb = nn.Dense(temb_dim, dtype=dtype, name="temb_dense_1")(nn.silu(temb))

    def res(h, width, name):
      return ResBlock(width, self.groups, self.dropout, dtype, name=name)(h, temb, train)

    def attn(h, name):
      return AttnBlock(self.groups, dtype, name=name)(h)

    side = x.shape[1]
    hs = [_conv3x3(self.base_width, "conv_in", dtype=dtype)(x)]
    for i, mult in enumerate(self.channel_mult):
      for j in range(self.num_res_blocks):
        h = res(hs[-1], self.base_width * mult, f"down_{i}_res_{j}")
        if (side >> i) in self.attention_resolutions:
          h = attn(h, f"down_{i}_attn_{j}")
        hs.append(h)
      if i != levels - 1:
        hs.append(_conv3x3(h.shape[-1], f"down_{i}_downsample", stride=2, dtype=dtype)(h))

    h = res(hs[-1], hs[-1].shape[-1], "mid_res_0")
    h = attn(h, "mid_attn")
    h = res(h, h.shape[-1], "mid_res_1")

    for i, mult in reversed(list(enumerate(self.channel_mult))):
      for j in range(self.num_res_blocks + 1):
        h = res(jnp.concatenate([h, hs.pop()], axis=-1), self.base_width * mult,
                f"up_{i}_res_{j}")
        if (side >> i) in self.attention_resolutions:
          h = attn(h, f"up_{i}_attn_{j}")
      if i != 0:
        h = _conv3x3(h.shape[-1], f"up_{i}_upsample", dtype=dtype)(_upsample_nearest(h))

    h = nn.silu(_group_norm(self.groups, h.shape[-1], "norm_out", dtype)(h))
    return precision.at_least_f32(_conv3x3(self.out_channels, "conv_out", dtype=dtype)(h))


def _check_fields(unet) -> None:
  """Config checks that need no image shape; messages name the model.unet key."""
  if unet.embedding not in EMBEDDINGS:
    raise ConfigError(
        f"model.unet.embedding={unet.embedding!r} is not a time embedding; use one of "
        f"{EMBEDDINGS}")
  if unet.base_width < 4 or unet.base_width % 2:
    raise ConfigError(
        f"model.unet.base_width must be an even number >= 4 (the time embedding has "
        f"base_width/2 frequencies); got {unet.base_width}")
  if not unet.channel_mult or any(int(m) <= 0 for m in unet.channel_mult):
    raise ConfigError(
        f"model.unet.channel_mult must be positive multipliers, one per level; got "
        f"{tuple(unet.channel_mult)}")
  if unet.num_res_blocks <= 0:
    raise ConfigError(f"model.unet.num_res_blocks must be positive; got {unet.num_res_blocks}")
  if unet.out_channels <= 0:
    raise ConfigError(f"the U-Net's output channels must be positive; got {unet.out_channels}")
  if not 0.0 <= unet.dropout < 1.0:
    raise ConfigError(f"model.unet.dropout must be in [0, 1); got {unet.dropout}")
  if unet.groups <= 0:
    raise ConfigError(f"model.unet.groups must be positive; got {unet.groups}")
  bad = sorted(c for c in norm_widths(unet.base_width, unet.channel_mult, unet.num_res_blocks)
               if c % min(unet.groups, c))
  if bad:
    raise ConfigError(
        f"model.unet.groups={unet.groups} does not divide the channel counts {bad} that "
        f"GroupNorm sees (base_width={unet.base_width}, channel_mult="
        f"{tuple(unet.channel_mult)}): set model.unet.groups to a divisor of "
        f"model.unet.base_width, or model.unet.base_width to a multiple of it")


def build_unet(unet_config: ml_collections.ConfigDict, image_shape: Sequence[int],
               dtype: precision.Dtype = None) -> UNet:
  """The U-Net model.unet describes, for 2D images of `image_shape` (H, W, C), computing
  in `dtype` (None: as the inputs, float32)."""
  if len(image_shape) != 3:
    raise ConfigError(
        f"the score model is 2D and needs images (H, W, C); got shape {tuple(image_shape)}: "
        f"use 2D data (data.depth=0, data.ndim=2)")
  height, width, channels = (int(s) for s in image_shape)
  mult = tuple(int(m) for m in unet_config.channel_mult)
  if height != width:
    raise ConfigError(f"the U-Net needs square images; got {height}×{width}: set data.image_size")
  factor = 2**(len(mult) - 1)
  if height % factor:
    raise ConfigError(
        f"a {len(mult)}-level U-Net (model.unet.channel_mult={mult}) halves the image "
        f"{len(mult) - 1} times, so data.image_size must be divisible by {factor}; got "
        f"{height}: change data.image_size or use fewer levels in model.unet.channel_mult")
  resolutions = [height >> i for i in range(len(mult))]
  attention = tuple(int(r) for r in unet_config.attention_resolutions)
  missing = [r for r in attention if r not in resolutions]
  if missing:
    raise ConfigError(
        f"model.unet.attention_resolutions={attention} has {missing}, which no level of "
        f"this U-Net runs at; its resolutions are {resolutions}")
  return UNet(
      out_channels=channels, base_width=int(unet_config.base_width), channel_mult=mult,
      num_res_blocks=int(unet_config.num_res_blocks), attention_resolutions=attention,
      dropout=float(unet_config.dropout), groups=int(unet_config.groups),
      embedding=str(unet_config.embedding), fourier_scale=float(unet_config.fourier_scale),
      dtype=dtype)


def score_unet_64(out_channels: int = 3) -> UNet:
  """The 64×64 score64 U-Net of the PyTorch reference (base 64, mult (1,2,2,2), attn 16)."""
  return UNet(out_channels=out_channels, base_width=64, channel_mult=(1, 2, 2, 2),
              num_res_blocks=2, attention_resolutions=(16,), dropout=0.0, groups=32)
