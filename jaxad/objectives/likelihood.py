"""Log-densities and the decoder likelihood p(x|z), per image, in nats.

Every function keeps its normalising constants, so values are comparable across models
and with the literature (−ELBO in nats per image). Images are in [-1, 1], batch first.
"""

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp
import ml_collections

from jaxad.errors import ConfigError

LOG_2PI = math.log(2 * math.pi)
KINDS = ("gaussian", "bernoulli")


def _sum_per_example(values: jax.Array) -> jax.Array:
  """Sums every axis but the first (batch) one: (B, ...) → (B,)."""
  return values.reshape(values.shape[0], -1).sum(axis=-1)


def gaussian_log_prob(x: jax.Array, mean: jax.Array, variance) -> jax.Array:
  """log N(x; mean, variance·I) summed over every non-batch axis → (B,).

  `variance` is a scalar or broadcasts against x; with a scalar the result is
  −‖x − mean‖²/(2·variance) − ½·D·log(2π·variance), D the number of values per image.
  """
  variance = jnp.asarray(variance, x.dtype)
  per_value = -0.5 * (LOG_2PI + jnp.log(variance) + jnp.square(x - mean) / variance)
  return _sum_per_example(per_value)


def bernoulli_log_prob(x01: jax.Array, logits: jax.Array) -> jax.Array:
  """Σ [x·l − softplus(l)]: log Bernoulli(x; sigmoid(l)) for x in [0, 1] → (B,).

  Differentiable in x (continuous targets give the usual cross-entropy).
  """
  return _sum_per_example(x01 * logits - jax.nn.softplus(logits))


def gaussian_kl(mu: jax.Array, logvar: jax.Array) -> jax.Array:
  """KL(N(mu, diag exp(logvar)) ‖ N(0, I)) → (B,).

  Closed form: −½ Σ (1 + logvar − mu² − exp(logvar)) over every non-batch axis.
  """
  return _sum_per_example(-0.5 * (1.0 + logvar - jnp.square(mu) - jnp.exp(logvar)))


def log_normal_diag(z: jax.Array, mu: jax.Array, logvar: jax.Array) -> jax.Array:
  """log N(z; mu, diag exp(logvar)) summed over the last axis (e.g. log q(z|x))."""
  return jnp.sum(-0.5 * (LOG_2PI + logvar + jnp.square(z - mu) * jnp.exp(-logvar)), axis=-1)


def log_standard_normal(z: jax.Array) -> jax.Array:
  """log N(z; 0, I) summed over the last axis (the prior log p(z))."""
  return jnp.sum(-0.5 * (LOG_2PI + jnp.square(z)), axis=-1)


def check_levels(levels):
  if isinstance(levels, bool) or not isinstance(levels, int) or levels == 1 or levels < 0:
    raise ValueError(f"levels must be 0 (continuous data) or the number of intensity "
                     f"levels >= 2 (e.g. 256 for 8-bit); got {levels!r}")


def log_bin_width(levels: int) -> float:
  """log of the bin width 2/(levels − 1) on the [-1, 1] scale; 0 for continuous data."""
  check_levels(levels)
  return 0.0 if levels == 0 else math.log(2.0 / (levels - 1))


def bits_per_dim(log_p: jax.Array, num_dims: int, levels: int) -> jax.Array:
  """Bits per dimension from the log-density log p (nats per image) on the [-1, 1] scale.

  levels >= 2 (integer data, log p of the dequantised image): the probability of the
    discrete image is log P(k) ≥ log p(x_deq) + D·log w with bin width w = 2/(levels − 1),
    and bpd = −(log p + D·log w)/(D·ln 2). For 8-bit data (levels=256) this is the usual
    bpd of the literature on the 0..256 scale.
  levels = 0 (float data, e.g. 16-bit images stored as floats): no dequantisation; the bpd
    of the continuous density on the [-1, 1] scale, −log p/(D·ln 2). It is not comparable
    with discrete bpd and can be negative.
  """
  return -(log_p + num_dims * log_bin_width(levels)) / (num_dims * math.log(2))


@dataclasses.dataclass(frozen=True)
class Likelihood:
  """The decoder likelihood p(x|z) and the reconstruction term of the training loss.

  gaussian: p(x|z) = N(decoder_out, σ²·I) with σ² = beta/2 (beta = 0.01 gives
    σ² = 0.005 as in Lu & Xu; Zimmerer et al.'s c = σ² = 1 is beta = 2).
  bernoulli: decoder_out are logits over the target (x + 1)/2.

  The training loss is mean_b(train_rec + beta·KL). For the Gaussian, train_rec is the
  per-image SSE and, since −log p(x|z) = SSE/beta + ½·D·log(π·beta),
    SSE + beta·KL = beta·(−ELBO) − beta·½·D·log(π·beta)
  exactly: minimising it is maximum likelihood with a fixed σ². For the Bernoulli,
  train_rec = −log p(x|z) (summed BCE) and beta weights the KL (beta = 1: the ELBO).

  Frozen and hashable, so it can be closed over by, or passed statically to, jit. beta
  may also be a jax.Array (a grid's per-member β inside vmap): only a Python number is
  checked here, an array is the caller's to validate.
  """

  kind: str = "gaussian"
  beta: float = 1.0

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ConfigError(f"model.likelihood={self.kind!r} is not a likelihood; use one of {KINDS}")
    if isinstance(self.beta, jax.Array):
      return
    if isinstance(self.beta, bool) or not isinstance(self.beta, numbers.Real) or not (
        math.isfinite(self.beta) and self.beta > 0):
      raise ConfigError(f"model.beta must be a positive number; got {self.beta!r}")

  @property
  def variance(self) -> float:
    """σ² of the Gaussian decoder (beta/2)."""
    if self.kind != "gaussian":
      raise ValueError(f"a {self.kind} likelihood has no fixed variance")
    return self.beta / 2

  def log_prob(self, x: jax.Array, decoder_out: jax.Array) -> jax.Array:
    """log p(x|z) per image (B,), nats, for images x in [-1, 1]."""
    if self.kind == "gaussian":
      return gaussian_log_prob(x, decoder_out, self.variance)
    return bernoulli_log_prob((x + 1) / 2, decoder_out)

  def mean(self, decoder_out: jax.Array) -> jax.Array:
    """The reconstruction E[x|z] in image space [-1, 1]."""
    if self.kind == "gaussian":
      return decoder_out
    return 2 * jax.nn.sigmoid(decoder_out) - 1

  def train_rec(self, x: jax.Array, decoder_out: jax.Array) -> jax.Array:
    """Reconstruction term of the training loss (B,): SSE (gaussian) or −log p(x|z)."""
    if self.kind == "gaussian":
      return _sum_per_example(jnp.square(x - decoder_out))
    return -self.log_prob(x, decoder_out)


def make_likelihood(model_cfg: ml_collections.ConfigDict) -> Likelihood:
  """The likelihood `model_cfg.likelihood` with weight `model_cfg.beta`."""
  for key in ("likelihood", "beta"):
    if key not in model_cfg:
      raise ConfigError(f"model.{key} is missing; set e.g. model.likelihood='gaussian', "
                        f"model.beta=0.01")
  beta = model_cfg.beta
  if isinstance(beta, numbers.Real) and not isinstance(beta, bool):
    beta = float(beta)
  return Likelihood(kind=model_cfg.likelihood, beta=beta)
