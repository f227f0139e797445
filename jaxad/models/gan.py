"""DCGAN generator and discriminator as pure flax.linen modules (2D images and 3D volumes).

Both are fully convolutional and take their depth from the image size, like the conv
VAE, but reach more sizes: every side must be b·2^k with a base b in 4..7 and k ≥ 1
stride-2 blocks (8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, ...). MNIST's 28 is
7·2², so a 28×28 image (or a 28³ lung-nodule cube) needs no padding or resizing: the
generator projects z to a 7^n map and doubles it twice, the discriminator halves 28 → 14
→ 7 and covers the 7^n map with one kernel (the classic MNIST DCGAN shape).

  Generator:      z (B, d) → 1→b^n transposed conv → k × [×2 transposed conv] → tanh
                  BatchNorm + ReLU after every layer but the last; images in [-1, 1].
  Discriminator:  x → k × [stride-2 conv, norm (not on the first), LeakyReLU(0.2)]
                  → features (the last b^n map, flattened) → b^n conv → logit (B,).

`widths` holds the channels of the discriminator's k blocks (input side first); the
generator mirrors them, as the conv VAE's decoder mirrors its encoder. The WGAN-GP
critic is the discriminator with norm="layer" (or "none"): its gradient penalty needs
each example's output to depend on that example alone, which BatchNorm in training
mode breaks. Usage:

  variables = generator.init(rng, z, train=False)
  images = generator.apply(variables, z, train=False)
  logits, features = discriminator.apply(d_variables, images, train=False)

`dtype` (jaxad.models.precision): with jnp.bfloat16 both networks compute in bfloat16
while their parameters, norm statistics and outputs (images, logits, features) are
float32; the generator's tanh runs in float32.
"""

from collections.abc import Sequence
import functools

import flax.linen as nn
import jax
import ml_collections

from jaxad.errors import ConfigError
from jaxad.models import layers
from jaxad.models import precision

MIN_BASE, MAX_BASE = 4, 7  # side of the smallest map: the generator's first, the head's input
GENERATOR_NORMS = ("batch", "none")
DISCRIMINATOR_NORMS = ("batch", "layer", "none")


def _valid_sides(up_to: int) -> list[int]:
  return sorted({b * 2**k for b in range(MIN_BASE, MAX_BASE + 1)
                 for k in range(1, max(up_to, 8).bit_length())})


def side_blocks(side: int) -> tuple[int, int]:
  """(b, k) with side = b·2^k, 4 ≤ b ≤ 7 and k ≥ 1; ConfigError for other sides."""
  side = int(side)
  k = 0
  while side % 2**(k + 1) == 0 and side // 2**(k + 1) >= MIN_BASE:
    k += 1
  base = side // 2**k
  if k < 1 or not MIN_BASE <= base <= MAX_BASE:
    valid = _valid_sides(2 * side)
    fix = " or ".join(str(s) for s in [s for s in valid if s < side][-1:]
                      + [s for s in valid if s > side][:1])
    raise ConfigError(
        f"the GAN needs every image side = b·2^k with b in {MIN_BASE}..{MAX_BASE} and "
        f"k ≥ 1 ({', '.join(str(s) for s in valid[:12])}, ...); got {side}: set "
        f"data.image_size (and data.depth for volumes) to {fix}")
  return base, k


def check_gan_shape(image_shape: Sequence[int], widths: Sequence[int]) -> tuple[int, ...]:
  """Validates (H, W, C) or (D, H, W, C) against widths; returns the base side per axis."""
  if len(image_shape) not in (3, 4) or int(image_shape[-1]) < 1:
    raise ConfigError(
        f"the GAN needs an image shape (H, W, C) or (D, H, W, C) with C ≥ 1; got "
        f"{tuple(image_shape)}")
  sides = tuple(int(s) for s in image_shape[:-1])
  blocks = [side_blocks(s) for s in sides]
  ks = {k for _, k in blocks}
  if len(ks) != 1:
    raise ConfigError(
        f"the GAN needs the same number of stride-2 blocks on every axis; sides {sides} "
        f"need {[k for _, k in blocks]}: set data.image_size (and data.depth) to equal sides")
  k = ks.pop()
  if len(widths) != k:
    raise ConfigError(
        f"model.widths has {len(widths)} entries but a {sides[0]}-pixel side needs {k} "
        f"stride-2 blocks ({sides[0]}→{blocks[0][0]}): give {k} widths, or set "
        f"model.widths=() for the default")
  if any(int(w) <= 0 for w in widths):
    raise ConfigError(f"model.widths must all be positive; got {tuple(widths)}")
  return tuple(b for b, _ in blocks)


def default_widths(image_size: int, base: int = 32, max_width: int = 512) -> tuple[int, ...]:
  """DCGAN widths base·2^i (capped at max_width), one per stride-2 block."""
  if base <= 0 or max_width <= 0:
    raise ConfigError(f"model.base_width must be positive; got {base}")
  _, k = side_blocks(image_size)
  return tuple(min(base * 2**i, max_width) for i in range(k))


def _check_norm(norm: str, valid: tuple[str, ...], field: str) -> None:
  if norm not in valid:
    raise ConfigError(f"{field}={norm!r} is not a normalisation; use one of {valid}")


def _batch_norm(train: bool, name: str, dtype: precision.Dtype = None) -> nn.BatchNorm:
  """BatchNorm whose output is `dtype`; its statistics are float32 whatever the dtype."""
  return nn.BatchNorm(momentum=0.9, epsilon=1e-5, use_running_average=not train,
                      dtype=dtype, name=name)


def _check_input(x: jax.Array, shape: Sequence[int], what: str) -> None:
  if x.ndim != len(shape) + 1 or tuple(x.shape[1:]) != tuple(shape):
    raise ValueError(f"the {what} was built for inputs of shape {tuple(shape)} (batch "
                     f"first) but got a batch of shape {tuple(x.shape)}")


class Generator(nn.Module):
  """z (B, latent_dim) → images (B, *image_shape) in [-1, 1] (tanh), 2D or 3D."""

  image_shape: tuple[int, ...]
  latent_dim: int
  widths: tuple[int, ...]
  norm: str = "batch"
  dtype: precision.Dtype = None  # computation dtype; None: as the inputs (float32)

  def __post_init__(self):
    if int(self.latent_dim) < 1:
      raise ConfigError(f"model.latent_dim must be a positive integer; got {self.latent_dim}")
    check_gan_shape(self.image_shape, self.widths)
    _check_norm(self.norm, GENERATOR_NORMS, "model.generator_norm")
    super().__post_init__()

  @nn.compact
  def __call__(self, z: jax.Array, train: bool = False) -> jax.Array:
    _check_input(z, (self.latent_dim,), "generator")
    base = check_gan_shape(self.image_shape, self.widths)
    ndim = len(base)
    use_bn = self.norm == "batch"
    x = z.reshape(z.shape[0], *(1,) * ndim, z.shape[-1])
    features = (*reversed([int(w) for w in self.widths]), int(self.image_shape[-1]))
    for i, width in enumerate(features):
      first, last = i == 0, i == len(features) - 1
      # 1^n → b^n projection (a matmul), then ×2 per block; layers.ConvTranspose is
      # nn.ConvTranspose with a fast backward pass on XLA:CPU.
      x = layers.ConvTranspose(
          width, base if first else (4,) * ndim, strides=(1 if first else 2,) * ndim,
          padding="VALID" if first else "SAME", use_bias=last or not use_bn,
          dtype=self.dtype, name=f"deconv_{i}")(x)
      if not last:
        if use_bn:
          x = _batch_norm(train, f"bn_{i}", self.dtype)(x)
        x = nn.relu(x)
    return nn.tanh(precision.at_least_f32(x))


class Discriminator(nn.Module):
  """x (B, *image_shape) → (logit (B,), features (B, F)); features feed AnoGAN's loss.

  The features are the last stride-2 block's output (after norm and LeakyReLU),
  flattened: F = b^n · widths[-1]. norm: "batch" (DCGAN), "layer" (per-example over
  all spatial and channel axes, the WGAN-GP critic) or "none"; never on the first block.
  """

  image_shape: tuple[int, ...]
  widths: tuple[int, ...]
  norm: str = "batch"
  dtype: precision.Dtype = None  # computation dtype; None: as the inputs (float32)

  def __post_init__(self):
    check_gan_shape(self.image_shape, self.widths)
    _check_norm(self.norm, DISCRIMINATOR_NORMS, "model.discriminator_norm")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
    _check_input(x, self.image_shape, "discriminator")
    base = check_gan_shape(self.image_shape, self.widths)
    ndim = len(base)
    act = functools.partial(nn.leaky_relu, negative_slope=0.2)
    for i, width in enumerate(self.widths):
      normed = i > 0 and self.norm != "none"
      x = nn.Conv(int(width), (4,) * ndim, strides=(2,) * ndim, padding=((1, 1),) * ndim,
                  use_bias=not normed, dtype=self.dtype, name=f"conv_{i}")(x)
      if normed and self.norm == "batch":
        x = _batch_norm(train, f"bn_{i}", self.dtype)(x)
      elif normed:
        x = nn.LayerNorm(epsilon=1e-5, reduction_axes=tuple(range(1, ndim + 2)),
                         feature_axes=-1, dtype=self.dtype, name=f"ln_{i}")(x)
      x = act(x)
    features = precision.at_least_f32(x.reshape(x.shape[0], -1))
    logit = layers.Conv(1, base, padding="VALID", dtype=self.dtype, name="head")(x)  # a matmul
    return precision.at_least_f32(logit.reshape(x.shape[0])), features


def gan_from_config(model_cfg: ml_collections.ConfigDict, image_shape: Sequence[int],
                    dtype: precision.Dtype = None) -> tuple[Generator, Discriminator]:
  """(Generator, Discriminator) of config.model for images of `image_shape` (no batch).

  Reads model.name (dcgan | wgan_gp), model.latent_dim, model.widths (() →
  model.base_width·2^i capped at model.gan.max_width, one per block) and
  model.gan.{generator_norm, discriminator_norm}; discriminator_norm '' is BatchNorm for
  dcgan and layer norm for the WGAN-GP critic, whose penalty BatchNorm would break.
  Both compute in `dtype` (None: as the inputs, float32).
  """
  image_shape = tuple(int(s) for s in image_shape)
  g = model_cfg.gan
  d_norm = g.discriminator_norm or ("batch" if model_cfg.name == "dcgan" else "layer")
  if model_cfg.name == "wgan_gp" and d_norm == "batch":
    raise ConfigError("model.gan.discriminator_norm='batch' cannot be used with wgan_gp: "
                      "the gradient penalty needs each example's critic value to depend "
                      "on that example alone; use 'layer' or 'none'")
  latent_dim = model_cfg.latent_dim
  if isinstance(latent_dim, bool) or not isinstance(latent_dim, int) or latent_dim < 1:
    raise ConfigError(f"model.latent_dim must be a positive integer; got {latent_dim!r}")
  widths = tuple(int(w) for w in model_cfg.widths) or default_widths(
      image_shape[0], int(model_cfg.base_width), int(g.max_width))
  return (Generator(image_shape, latent_dim, widths, norm=g.generator_norm, dtype=dtype),
          Discriminator(image_shape, widths, norm=d_norm, dtype=dtype))
