"""AnoGAN latent search (Schlegl et al.; the thesis's GAN-AD): a query's distance to G.

For each query x, start from z₁ and descend, with SGD with momentum,

  L(z) = (1−λ)·Σ|x − G(z)| + λ·Σ|f(x) − f(G(z))|     (f = discriminator features)

for `steps` steps; higher scores are more anomalous:

  gan            L(z) at the final z
  gan_residual   Σ|x − G(z)|            (sample score; as a map, |x − G(z)| channel-averaged)
  gan_feature    Σ|f(x) − f(G(z))|

Every image of a batch is searched at once: the per-image losses are summed, and with
G and D in eval mode (BatchNorm running statistics) images are independent, so each
image's gradient, momentum and result are its own, the same as searching it alone.
"""

from collections.abc import Callable
import numbers

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxad.errors import ConfigError

SAMPLE_SCORES = ("gan", "gan_residual", "gan_feature")
PIXEL_MAPS = ("gan_residual",)
ImageFn = Callable[[jax.Array], jax.Array]  # a batch in, a batch out


@flax.struct.dataclass
class SearchResult:
  """What latent_search returns; every array has the batch on its leading axis."""

  scores: dict[str, jax.Array]  # SAMPLE_SCORES, each (B,)
  maps: dict[str, jax.Array]  # PIXEL_MAPS, each (B, *spatial)
  z: jax.Array  # the final latents (B, d)
  losses: jax.Array  # L(z) before each step (steps, B): the descent's trace


def initial_latents(rng: jax.Array, batch_size: int, latent_dim: int) -> jax.Array:
  """z₁ ~ N(0, I), (batch_size, latent_dim): the generator's training prior."""
  return jax.random.normal(rng, (batch_size, latent_dim))


def eval_functions(generator: nn.Module, generator_variables, discriminator: nn.Module,
                   discriminator_variables) -> tuple[ImageFn, ImageFn]:
  """(generate, features) of jaxad.models.gan modules in eval mode, for latent_search."""

  def generate(z):
    return generator.apply(generator_variables, z, train=False)

  def features(x):
    return discriminator.apply(discriminator_variables, x, train=False)[1]

  return generate, features


def _check(steps, lr, momentum, lam) -> None:
  if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
    raise ConfigError(f"latent search steps must be a positive int (100–200 in the "
                      f"thesis); got {steps!r}")
  checks = [(lr, "lr", "> 0", lambda v: v > 0),
            (momentum, "momentum", "in [0, 1)", lambda v: 0 <= v < 1),
            (lam, "lam (the feature weight λ)", "in [0, 1] (0.5 in AnoGAN)",
             lambda v: 0 <= v <= 1)]
  for value, name, rule, ok in checks:
    if isinstance(value, numbers.Real) and not ok(value):
      raise ConfigError(f"latent search {name} must be {rule}; got {value!r}")


def latent_search(generate: ImageFn, features: ImageFn, x: jax.Array, z0: jax.Array,
                  *, steps: int, lr: float, momentum: float = 0.9, lam: float = 0.5
                  ) -> SearchResult:
  """AnoGAN scores of x (B, *spatial, C) after `steps` SGD-with-momentum steps from z0.

  generate: z (N, d) → images (N, *spatial, C), features: images → (N, F); both pure
  and in eval mode (see eval_functions), each image independent of the others. z0
  (B, d): the start, e.g. initial_latents(rng, B, d). `steps` is static; lr, momentum
  and lam may be traced. Jit-able and shardable over the batch axis.
  """
  _check(steps, lr, momentum, lam)
  if z0.ndim != 2 or z0.shape[0] != x.shape[0]:
    raise ValueError(f"z0 must be (batch, latent_dim) with the batch of x {x.shape}; "
                     f"got {z0.shape}")
  target = jax.lax.stop_gradient(features(x))
  image_axes = tuple(range(1, x.ndim))

  def parts(z):
    image = generate(z)
    residual = jnp.abs(x - image)
    feature = jnp.sum(jnp.abs(target - features(image)), axis=-1)
    return residual, feature

  def total_loss(z):
    residual, feature = parts(z)
    per_image = (1 - lam) * jnp.sum(residual, axis=image_axes) + lam * feature
    return jnp.sum(per_image), per_image

  optimizer = optax.sgd(lr, momentum=momentum)

  # Unrolled in Python, not lax.scan: inside an XLA:CPU while loop the input-gradient
  # convolutions keep transposed kernels (dim_labels ...01oi) and the step ran 2.3×
  # slower (19.7 against 8.4 ms for the MNIST DCGAN at batch 32). The price is compile
  # time, about linear in `steps` (about 20 s for 100 steps of that DCGAN).
  z, opt_state, losses = z0, optimizer.init(z0), []
  for _ in range(steps):
    (_, per_image), grad = jax.value_and_grad(total_loss, has_aux=True)(z)
    updates, opt_state = optimizer.update(grad, opt_state, z)
    z = optax.apply_updates(z, updates)
    losses.append(per_image)
  losses = jnp.stack(losses)
  residual, feature = parts(z)
  residual_sum = jnp.sum(residual, axis=image_axes)
  scores = {
      "gan": (1 - lam) * residual_sum + lam * feature,
      "gan_residual": residual_sum,
      "gan_feature": feature,
  }
  return SearchResult(scores=scores, maps={"gan_residual": jnp.mean(residual, axis=-1)},
                      z=z, losses=losses)
