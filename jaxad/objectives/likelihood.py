"""Log-densities and the decoder likelihood p(x|z), per image, in nats.

Every function keeps its normalising constants, so values are comparable across models
and with the literature (−ELBO in nats per image). Images are in [-1, 1], batch first.
The discrete likelihood (`discretized_logistic`) gives the probability of the stored
image itself, at `data.bit_depth` bits, so its −ELBO is the image's bits (× ln 2).
"""

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp
import ml_collections

from jaxad.errors import ConfigError

LOG_2PI = math.log(2 * math.pi)
KINDS = ("gaussian", "bernoulli", "gaussian_learned", "discretized_logistic")
# PixelCNN++'s floor on the logistic's log-scale (on the same [-1, 1] scale): below it
# the bin probability is a step in the mean and its gradient vanishes or explodes.
LOG_SCALE_FLOOR = -7.0
# A bin narrower than this many logistic scales is integrated by the midpoint rule (the
# density at the bin centre × its width; relative error < TINY_BIN²/24), PixelCNN++'s
# fallback: the exact difference of CDFs would round to zero or lose its digits there.
TINY_BIN = 1e-5


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


def gaussian_logvar_log_prob(x: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """log N(x; mean, diag exp(logvar)) summed over every non-batch axis → (B,):
  Σ −½·(log 2π + logvar + (x − mean)²·exp(−logvar)), a variance per value."""
  per_value = -0.5 * (LOG_2PI + logvar + jnp.square(x - mean) * jnp.exp(-logvar))
  return _sum_per_example(per_value)


def bernoulli_log_prob(x01: jax.Array, logits: jax.Array) -> jax.Array:
  """Σ [x·l − softplus(l)]: log Bernoulli(x; sigmoid(l)) for x in [0, 1] → (B,).

  Differentiable in x (continuous targets give the usual cross-entropy).
  """
  return _sum_per_example(x01 * logits - jax.nn.softplus(logits))


def soft_floor(value: jax.Array, floor: float) -> jax.Array:
  """floor + softplus(value − floor): ≈ value above the floor, → floor below, smooth."""
  return floor + jax.nn.softplus(value - floor)


def logistic_bin_log_prob(x: jax.Array, mean: jax.Array, log_scale: jax.Array,
                          half_width: float) -> jax.Array:
  """Per value: log of the logistic(mean, s = exp(log_scale)) mass of x's bin on [-1, 1].

  The bin is [x − h, x + h] (h = half_width); the first bin (x < −1 + h) reaches −∞ and
  the last (x > 1 − h) +∞ (PixelCNN++), so the masses of all levels sum to 1. With
  u = (x − mean + h)/s and l = (x − mean − h)/s, every term is a log-sigmoid/softplus:

    first bin  log σ(u) = −softplus(−u)
    last bin   log(1 − σ(l)) = −softplus(l)
    inside     log(σ(u) − σ(l)) = −softplus(−u) − softplus(l) + log(1 − e^(l−u))

  (σ(u) − σ(l) = σ(u)·σ(−l)·(1 − e^(l−u)), exact, with u − l = 2h/s formed directly, so
  no difference of nearly equal CDFs is taken); a bin narrower than TINY_BIN scales
  uses the midpoint rule log f(x) + log 2h, f the logistic density. Differentiable in x
  (smooth inside each bin); values off the grid get the mass of the bin centred on them.
  """
  inv_s = jnp.exp(-log_scale)
  centered = x - mean
  upper, lower = inv_s * (centered + half_width), inv_s * (centered - half_width)
  width = (2.0 * half_width) * inv_s
  tiny = width < TINY_BIN
  safe_width = jnp.where(tiny, 1.0, width)  # keeps the unused branch's gradient finite
  inside = -jax.nn.softplus(-upper) - jax.nn.softplus(lower) + jnp.log(
      -jnp.expm1(-safe_width))
  mid = inv_s * centered
  midpoint = (-jax.nn.softplus(-mid) - jax.nn.softplus(mid) - log_scale
              + math.log(2.0 * half_width))
  inside = jnp.where(tiny, midpoint, inside)
  return jnp.where(x < -1.0 + half_width, -jax.nn.softplus(-upper),
                   jnp.where(x > 1.0 - half_width, -jax.nn.softplus(lower), inside))


def discretized_logistic_log_prob(x: jax.Array, means: jax.Array, log_scales: jax.Array,
                                  logits: jax.Array | None, bit_depth: int) -> jax.Array:
  """log P(x) of a discretised mixture of K logistics per value, summed → (B,), nats.

  x (B, ...) holds values on the grid of 2^bit_depth levels over [-1, 1]; means,
  log_scales (and logits, None when K = 1) are (B, ..., K). Per value
  log P = logsumexp_k [log softmax(logits)_k + log P_k(bin of x)] with
  `logistic_bin_log_prob` (half-width 1/(2^bit_depth − 1)); log-scales below
  LOG_SCALE_FLOOR are raised to it.
  """
  half_width = 1.0 / (2**bit_depth - 1)
  log_scales = jnp.maximum(log_scales, LOG_SCALE_FLOOR)
  per_component = logistic_bin_log_prob(x[..., None], means, log_scales, half_width)
  if logits is None:
    return _sum_per_example(per_component[..., 0])
  per_value = jax.nn.logsumexp(per_component + jax.nn.log_softmax(logits, axis=-1),
                               axis=-1)
  return _sum_per_example(per_value)


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


def params_per_value(kind: str, mixtures: int = 1) -> int:
  """How many decoder outputs each image value needs under likelihood `kind`:
  1 (gaussian, bernoulli), 2 (gaussian_learned: mean, log-variance; the discretised
  logistic with K = 1: mean, log-scale) or 3·K (K means, log-scales, mixture logits)."""
  if kind not in KINDS:
    raise ConfigError(f"model.likelihood={kind!r} is not a likelihood; use one of {KINDS}")
  if kind in ("gaussian", "bernoulli"):
    return 1
  if kind == "gaussian_learned" or mixtures == 1:
    return 2
  return 3 * mixtures


@dataclasses.dataclass(frozen=True)
class Likelihood:
  """The decoder likelihood p(x|z) and the reconstruction term of the training loss.

  gaussian: p(x|z) = N(decoder_out, σ²·I) with σ² = beta/2 (beta = 0.01 gives
    σ² = 0.005 as in Lu & Xu; Zimmerer et al.'s c = σ² = 1 is beta = 2).
  bernoulli: decoder_out are logits over the target (x + 1)/2.
  gaussian_learned: heteroscedastic N(mean, diag σ²(z)), decoder_out (..., 2) = (mean,
    v) per value and log σ² = lo + softplus(v − lo) (`soft_floor`), lo = `logvar_floor`
    = 2·log w, w = 2/(2^bit_depth − 1) the bin width: σ ≥ w. Without a floor the density
    of a perfectly reconstructed value (a constant background) is unbounded: σ → 0
    drives −log p(x|z) to −∞ and training diverges; with it the density is at most
    1/(w·√(2π)), so p(x|z)·w^D, the mass of the image's bins, stays below 1.
  discretized_logistic: PixelCNN++ (Salimans et al. 2017) on 2^bit_depth levels over
    [-1, 1] (bin half-width 1/(2^bit_depth − 1), edge bins to ±∞), a mixture of
    `mixtures` = K logistics per value: decoder_out (..., 2) = (mean, log-scale) for
    K = 1, (..., 3K) = (K means, K log-scales, K mixture logits) for K > 1. The logits
    are per value, not shared by a pixel's channels as in PixelCNN++ (whose channels
    are autoregressive, their means linear in the previous channels): given z this
    decoder factorises over values, and for grayscale images the two are the same.
    log p(x|z) is the log-probability of the discrete image: ≤ 0, all constants kept.

  The training loss is mean_b(train_rec + beta·KL). For the Gaussian, train_rec is the
  per-image SSE and, since −log p(x|z) = SSE/beta + ½·D·log(π·beta),
    SSE + beta·KL = beta·(−ELBO) − beta·½·D·log(π·beta)
  exactly: minimising it is maximum likelihood with a fixed σ². For the others,
  train_rec = −log p(x|z) and beta weights the KL (beta = 1: the ELBO).

  Frozen and hashable, so it can be closed over by, or passed statically to, jit. beta
  may also be a jax.Array (a grid's per-member β inside vmap): only a Python number is
  checked here, an array is the caller's to validate.
  """

  kind: str = "gaussian"
  beta: float = 1.0
  mixtures: int = 1  # K logistics per value (discretized_logistic)
  bit_depth: int = 8  # levels 2^bit_depth (discretized_logistic; gaussian_learned's floor)

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ConfigError(f"model.likelihood={self.kind!r} is not a likelihood; use one of {KINDS}")
    _check_int(self.mixtures, 1, 1 << 10, "model.likelihood_mixtures",
               "the number of logistics per value (1 = one logistic)")
    if self.mixtures > 1 and self.kind != "discretized_logistic":
      raise ConfigError(f"model.likelihood_mixtures={self.mixtures} needs "
                        f"model.likelihood='discretized_logistic' (got {self.kind!r}): set "
                        "model.likelihood_mixtures=1")
    _check_int(self.bit_depth, 1, 16, "data.bit_depth", "bits per stored value (8 for uint8)")
    if isinstance(self.beta, jax.Array):
      return
    if isinstance(self.beta, bool) or not isinstance(self.beta, numbers.Real) or not (
        math.isfinite(self.beta) and self.beta > 0):
      raise ConfigError(f"model.beta must be a positive number; got {self.beta!r}")

  @property
  def params_per_value(self) -> int:
    """Decoder outputs per image value (`params_per_value`); > 1 adds a last axis."""
    return params_per_value(self.kind, self.mixtures)

  @property
  def has_pixel_variance(self) -> bool:
    """Whether the decoder gives a variance per value (the AE-U scores need one)."""
    return self.kind == "gaussian_learned"

  @property
  def variance(self) -> float:
    """σ² of the Gaussian decoder (beta/2)."""
    if self.kind != "gaussian":
      raise ValueError(f"a {self.kind} likelihood has no fixed variance")
    return self.beta / 2

  @property
  def logvar_floor(self) -> float:
    """gaussian_learned's lowest log σ²: 2·log of the bin width 2/(2^bit_depth − 1)."""
    return 2.0 * log_bin_width(2**self.bit_depth)

  def _unpack(self, decoder_out: jax.Array) -> jax.Array:
    """decoder_out with its parameter axis checked (only when there is one)."""
    p = self.params_per_value
    if p > 1 and decoder_out.shape[-1] != p:
      raise ValueError(
          f"model.likelihood={self.kind!r} (K={self.mixtures}) needs {p} decoder outputs "
          f"per value, a last axis of {p}, but the decoder output is "
          f"{tuple(decoder_out.shape)}: build the model with params_per_value={p} "
          "(jaxad.models.vae.build_model reads it from the config)")
    return decoder_out

  def log_variance(self, decoder_out: jax.Array) -> jax.Array:
    """Per-value log σ² (soft-floored) of gaussian_learned, the image's shape."""
    if not self.has_pixel_variance:
      raise ValueError(f"a {self.kind} likelihood has no per-value variance")
    return soft_floor(self._unpack(decoder_out)[..., 1], self.logvar_floor)

  def normalized_error(self, x: jax.Array, decoder_out: jax.Array) -> jax.Array:
    """Per value (x − x̂)²·exp(−log σ²) (AE-U, Mao et al. 2020), the image's shape."""
    return jnp.square(x - self.mean(decoder_out)) * jnp.exp(-self.log_variance(decoder_out))

  def log_prob(self, x: jax.Array, decoder_out: jax.Array) -> jax.Array:
    """log p(x|z) per image (B,), nats, for images x in [-1, 1]."""
    if self.kind == "gaussian":
      return gaussian_log_prob(x, decoder_out, self.variance)
    if self.kind == "bernoulli":
      return bernoulli_log_prob((x + 1) / 2, decoder_out)
    out = self._unpack(decoder_out)
    if self.kind == "gaussian_learned":
      return gaussian_logvar_log_prob(x, out[..., 0], self.log_variance(out))
    k = self.mixtures
    logits = out[..., 2 * k:3 * k] if k > 1 else None
    return discretized_logistic_log_prob(x, out[..., :k], out[..., k:2 * k], logits,
                                         self.bit_depth)

  def mean(self, decoder_out: jax.Array) -> jax.Array:
    """The reconstruction E[x|z] in image space [-1, 1].

    discretized_logistic: the mixture's mean Σ_k π_k·mean_k, clipped to [-1, 1] (the
    discrete distribution's mean differs from it only by the edge bins' mass).
    """
    if self.kind == "gaussian":
      return decoder_out
    if self.kind == "bernoulli":
      return 2 * jax.nn.sigmoid(decoder_out) - 1
    out = self._unpack(decoder_out)
    k = self.mixtures
    if self.kind == "gaussian_learned" or k == 1:
      mean = out[..., 0]
    else:
      mean = jnp.sum(jax.nn.softmax(out[..., 2 * k:3 * k], axis=-1) * out[..., :k], axis=-1)
    return mean if self.kind == "gaussian_learned" else jnp.clip(mean, -1.0, 1.0)

  def train_rec(self, x: jax.Array, decoder_out: jax.Array) -> jax.Array:
    """Reconstruction term of the training loss (B,): SSE (gaussian) or −log p(x|z)."""
    if self.kind == "gaussian":
      return _sum_per_example(jnp.square(x - decoder_out))
    return -self.log_prob(x, decoder_out)


def _check_int(value, lo: int, hi: int, key: str, meaning: str) -> None:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not (
      lo <= value <= hi):
    raise ConfigError(f"{key}={value!r} must be an int in {lo}..{hi} ({meaning}): set "
                      f"--config.{key}")


def make_likelihood(model_cfg: ml_collections.ConfigDict, bit_depth: int = 8) -> Likelihood:
  """The likelihood `model_cfg.likelihood` with weight `model_cfg.beta`, K =
  `model_cfg.likelihood_mixtures` (1 if absent) and the data's `bit_depth`
  (config.data.bit_depth: pass it, the discrete likelihood's levels depend on it)."""
  for key in ("likelihood", "beta"):
    if key not in model_cfg:
      raise ConfigError(f"model.{key} is missing; set e.g. model.likelihood='gaussian', "
                        f"model.beta=0.01")
  beta = model_cfg.beta
  if isinstance(beta, numbers.Real) and not isinstance(beta, bool):
    beta = float(beta)
  return Likelihood(kind=model_cfg.likelihood, beta=beta,
                    mixtures=model_cfg.get("likelihood_mixtures", 1), bit_depth=bit_depth)
