"""Per-pixel anomaly maps of a VAE: reconstruction error and input gradients.

Each map is (B, *spatial), channels averaged (higher = more anomalous):

  rec_error = (x − E[x|z = mu])²                 deterministic reconstruction error
  elbo_grad = |∂(−ELBO)/∂x|                      single-sample ELBO, closed-form KL
  kl_grad   = |∂KL(q(z|x)‖p(z))/∂x|
  rec_grad  = |∂(−log p(x|z))/∂x|                z = mu(x) + σ(x)·eps, eps fixed by rng
  combi     = rec_error · kl_grad                (Zimmerer et al.)

and, for a likelihood with a variance per value (gaussian_learned), AE-U's map (Mao et
al., MICCAI 2020) at the same deterministic z = mu as rec_error:

  rec_normalized = (x − x̂)²·exp(−log σ²)        x̂, σ² decoded from z = mu

The other maps keep their definitions under every likelihood: kl_grad is unchanged in
form (only the trained encoder differs); rec_grad and elbo_grad differentiate that
likelihood's −log p(x|z), so under gaussian_learned their direct term is the
variance-weighted residual (x − x̂)/σ² and under the discretised logistic the slope of
the log bin mass; combi stays rec_error · kl_grad (the unweighted error).

Images are independent in eval mode, so the gradient of a per-image term summed over
the batch is each image's own gradient.
"""

import math
import numbers

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxad.objectives import likelihood as likelihood_lib
from jaxad.scores.sample import decode, encode

PIXEL_MAPS = ("rec_error", "elbo_grad", "kl_grad", "rec_grad", "combi")  # every one
VARIANCE_MAPS = ("rec_normalized",)  # likelihoods with a variance per value
TRUNCATE = 4.0  # the Gaussian kernel reaches 4σ, as scipy.ndimage.gaussian_filter's default.


def map_names(likelihood: likelihood_lib.Likelihood) -> tuple[str, ...]:
  """The maps `pixel_maps` returns under `likelihood`, in order."""
  return PIXEL_MAPS + (VARIANCE_MAPS if likelihood.has_pixel_variance else ())


def channel_mean(values: jax.Array) -> jax.Array:
  """(B, *spatial, C) → (B, *spatial)."""
  return jnp.mean(values, axis=-1)


def gaussian_kernel(sigma: float) -> np.ndarray:
  """Normalised 1D Gaussian weights on [−r, r], r = int(4σ + ½) (scipy's radius)."""
  radius = int(TRUNCATE * sigma + 0.5)
  t = np.arange(-radius, radius + 1, dtype=np.float64)
  weights = np.exp(-0.5 * (t / sigma) ** 2)
  return weights / weights.sum()


def reflect_index(index: np.ndarray, size: int) -> np.ndarray:
  """Folds out-of-range indices back into [0, size) by mirroring (d c b a | a b c d)."""
  index = np.mod(index, 2 * size)
  return np.where(index < size, index, 2 * size - 1 - index)


def smoothing_matrix(size: int, sigma: float) -> np.ndarray:
  """(size, size) matrix applying the 1D Gaussian filter with the reflected boundary."""
  kernel = gaussian_kernel(sigma)
  radius = len(kernel) // 2
  matrix = np.zeros((size, size))
  rows = np.arange(size)
  for k, weight in enumerate(kernel):
    np.add.at(matrix, (rows, reflect_index(rows + k - radius, size)), weight)
  return matrix


def _smooth_axis(maps: jax.Array, sigma: float, axis: int) -> jax.Array:
  """Filters one axis as a matrix product, at full float32 precision on GPU/TPU too."""
  matrix = jnp.asarray(smoothing_matrix(maps.shape[axis], sigma), maps.dtype)
  smoothed = jnp.tensordot(maps, matrix, axes=([axis], [1]),
                           precision=jax.lax.Precision.HIGHEST)
  return jnp.moveaxis(smoothed, -1, axis)


def gaussian_smooth(maps: jax.Array, sigma: float) -> jax.Array:
  """Separable Gaussian filter over the spatial axes of maps (B, *spatial); σ in pixels.

  Matches scipy.ndimage.gaussian_filter(mode='reflect', truncate=4) applied per image;
  sigma = 0 returns the maps unchanged. `sigma` is a Python number (static).
  """
  if not (isinstance(sigma, numbers.Real) and math.isfinite(sigma) and sigma >= 0):
    raise ValueError(f"sigma must be a finite number ≥ 0; got {sigma!r}")
  if sigma == 0:
    return maps
  for axis in range(1, maps.ndim):
    maps = _smooth_axis(maps, sigma, axis)
  return maps


def neg_elbo_terms(model: nn.Module, variables, x: jax.Array, rng: jax.Array,
                   likelihood: likelihood_lib.Likelihood):
  """((KL, −log p(x|z)), mu): per-image terms (B,) for one sample z = mu + σ·eps.

  eps = jax.random.normal(rng, mu.shape) depends on rng only, not on x, so this is a
  function of x to differentiate.
  """
  mu, logvar = encode(model, variables, x)
  eps = jax.random.normal(rng, mu.shape, mu.dtype)
  z = mu + jnp.exp(0.5 * logvar) * eps
  rec = -likelihood.log_prob(x, decode(model, variables, z))
  return (likelihood_lib.gaussian_kl(mu, logvar), rec), mu


def signed_grads(model: nn.Module, variables, x: jax.Array, rng: jax.Array,
                 likelihood: likelihood_lib.Likelihood):
  """(∂KL/∂x, ∂(−log p(x|z))/∂x, mu): one forward pass, one backward pass per term."""

  def summed_terms(x):
    (kl, rec), mu = neg_elbo_terms(model, variables, x, rng, likelihood)
    return (jnp.sum(kl), jnp.sum(rec)), mu

  (kl, _), pullback, mu = jax.vjp(summed_terms, x, has_aux=True)
  one, zero = jnp.ones_like(kl), jnp.zeros_like(kl)
  (kl_grad,) = pullback((one, zero))
  (rec_grad,) = pullback((zero, one))
  return kl_grad, rec_grad, mu


def pixel_maps(model: nn.Module, variables, x: jax.Array, rng: jax.Array,
               likelihood: likelihood_lib.Likelihood, *, smooth_sigma: float = 0.0
               ) -> dict[str, jax.Array]:
  """The `map_names(likelihood)` of x (B, *spatial, C), each (B, *spatial), eval mode.

  The gradients use one posterior sample, eps = jax.random.normal(rng, (B, d)); the same
  rng gives the same maps. With smooth_sigma > 0 every map but combi is smoothed (after
  channel averaging) and combi is the product of the smoothed rec_error and kl_grad,
  so combi == rec_error · kl_grad always holds. Pure and jit-able (smooth_sigma static).
  """
  kl_grad, rec_grad, mu = signed_grads(model, variables, x, rng, likelihood)
  decoded = decode(model, variables, mu)
  maps = {
      "rec_error": channel_mean(jnp.square(x - likelihood.mean(decoded))),
      "elbo_grad": channel_mean(jnp.abs(kl_grad + rec_grad)),
      "kl_grad": channel_mean(jnp.abs(kl_grad)),
      "rec_grad": channel_mean(jnp.abs(rec_grad)),
  }
  if likelihood.has_pixel_variance:
    maps["rec_normalized"] = channel_mean(likelihood.normalized_error(x, decoded))
  maps = {name: gaussian_smooth(m, smooth_sigma) for name, m in maps.items()}
  maps["combi"] = maps["rec_error"] * maps["kl_grad"]
  return {name: maps[name] for name in map_names(likelihood)}
