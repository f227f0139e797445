"""The variance-preserving SDE of score models (Song et al. 2021) and its DSM loss.

  dx = −½β(t)·x dt + √β(t) dw,   β(t) = β_min + t·(β_max − β_min),   t ∈ [0, 1],

so x_t | x_0 ~ N(a(t)·x_0, σ(t)²·I) with log a(t) = −¼t²(β_max − β_min) − ½t·β_min and
σ(t)² = 1 − a(t)². The network predicts the noise: x_t = a·x_0 + σ·ε, eps_pred ≈ ε, and
the score is s(x, t) = −eps_pred/σ(t). It is given the time label (N − 1)·t = 999·t.

The continuous form (β_min = 0.1, β_max = 20) and DDPM's discrete 1000-step chain
(β_i = linspace(1e-4, 0.02, 1000) = β(t_i)/N) are the same SDE: the chain is its
Euler–Maruyama discretisation, with ᾱ_i = Π_{j≤i}(1 − β_j) ≈ a(i/(N − 1))².
"""

import dataclasses
import functools
import math
import numbers

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxad.errors import ConfigError
from jaxad.objectives import likelihood as likelihood_lib

WEIGHTINGS = ("sigma2", "likelihood")


def _per_example(values: jax.Array, like: jax.Array) -> jax.Array:
  """Reshapes (B,) values to (B, 1, ..., 1) to broadcast against `like` (B, ...)."""
  return jnp.reshape(values, values.shape + (1,) * (like.ndim - values.ndim))


@dataclasses.dataclass(frozen=True)
class VPSDE:
  """dx = −½β(t)x dt + √β(t) dw, β(t) = β_min + t(β_max − β_min), t ∈ [0, 1].

  discrete=True is DDPM's N-step chain with β_i = linspace(β_min/N, β_max/N, N): times
  live on the grid t = i/(N − 1) and the marginal uses ᾱ_i (t is rounded to the grid).
  Frozen and hashable, so it can be closed over by, or passed statically to, jit.
  """

  beta_min: float = 0.1
  beta_max: float = 20.0
  num_scales: int = 1000
  discrete: bool = False
  t_eps: float = 1e-5

  def __post_init__(self):
    for name in ("beta_min", "beta_max", "t_eps"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(
          value):
        raise ConfigError(f"model.sde.{name} must be a finite number; got {value!r}")
    if not 0 < self.beta_min < self.beta_max:
      raise ConfigError(f"model.sde.beta_min={self.beta_min!r} and beta_max="
                        f"{self.beta_max!r} must satisfy 0 < beta_min < beta_max "
                        f"(e.g. 0.1 and 20)")
    if (isinstance(self.num_scales, bool) or not isinstance(self.num_scales, numbers.Integral)
        or self.num_scales < 2):
      raise ConfigError(f"model.sde.num_scales must be an int >= 2 (e.g. 1000); got "
                        f"{self.num_scales!r}")
    if not isinstance(self.discrete, bool):
      raise ConfigError(f"model.sde.discrete must be True or False; got {self.discrete!r}")
    if not 0 < self.t_eps < 1:
      raise ConfigError(f"model.sde.t_eps must be in (0, 1) (e.g. 1e-5); got "
                        f"{self.t_eps!r}")

  @functools.cached_property
  def _discrete_table(self) -> tuple[np.ndarray, np.ndarray]:
    """(√ᾱ_i, √(1 − ᾱ_i)) for i = 0..N−1, computed in float64."""
    n = self.num_scales
    betas = np.linspace(self.beta_min / n, self.beta_max / n, n, dtype=np.float64)
    log_alpha_bar = np.cumsum(np.log1p(-betas))
    return np.exp(0.5 * log_alpha_bar), np.sqrt(-np.expm1(log_alpha_bar))

  def beta(self, t: jax.Array) -> jax.Array:
    """β(t), the continuous noise rate (also for the discrete form)."""
    return self.beta_min + t * (self.beta_max - self.beta_min)

  def grid_index(self, t: jax.Array) -> jax.Array:
    """i = round(t·(N − 1)), the discrete step of t, clipped to 0..N−1."""
    return jnp.clip(jnp.round(t * (self.num_scales - 1)), 0, self.num_scales - 1).astype(
        jnp.int32)

  def marginal(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(a(t), σ(t)) of p_0t(x_t|x_0) = N(a(t)·x_0, σ(t)²·I), each shaped like t."""
    t = jnp.asarray(t, jnp.result_type(t, jnp.float32))
    if self.discrete:
      mean_coeff, std = self._discrete_table
      i = self.grid_index(t)
      return jnp.asarray(mean_coeff, t.dtype)[i], jnp.asarray(std, t.dtype)[i]
    log_a = -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min
    return jnp.exp(log_a), jnp.sqrt(-jnp.expm1(2 * log_a))  # expm1: σ exact at small t.

  def time_label(self, t: jax.Array) -> jax.Array:
    """(N − 1)·t, the time the network is given (999·t for N = 1000)."""
    return (self.num_scales - 1) * t

  def sample_time(self, rng: jax.Array, n: int) -> jax.Array:
    """n training times: U(t_eps, 1), or i/(N − 1) with i ~ U{0..N−1} if discrete."""
    if self.discrete:
      i = jax.random.randint(rng, (n,), 0, self.num_scales)
      return i.astype(jnp.float32) / (self.num_scales - 1)
    return jax.random.uniform(rng, (n,), minval=self.t_eps, maxval=1.0)

  def perturb(self, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """x_t = a(t)·x0 + σ(t)·noise for images x0 (B, ...) and times t (B,)."""
    mean_coeff, std = self.marginal(t)
    return _per_example(mean_coeff, x0) * x0 + _per_example(std, x0) * noise

  def drift(self, x: jax.Array, t: jax.Array) -> jax.Array:
    """f(x, t) = −½β(t)·x for x (B, ...) and t (B,)."""
    return -0.5 * _per_example(self.beta(t), x) * x

  def diffusion(self, t: jax.Array) -> jax.Array:
    """g(t) = √β(t)."""
    return jnp.sqrt(self.beta(t))

  def prior_log_prob(self, z: jax.Array) -> jax.Array:
    """log N(z; 0, I) per example (B,), every non-batch axis summed, constants kept."""
    return likelihood_lib.gaussian_log_prob(z, 0.0, 1.0)


def score_from_eps(eps_pred: jax.Array, std: jax.Array) -> jax.Array:
  """The score −eps_pred/σ, σ (B,) broadcast over the trailing axes of eps_pred."""
  return -eps_pred / _per_example(jnp.asarray(std), eps_pred)


def make_score_fn(sde: VPSDE, apply_fn):
  """score_fn(x, t) = −apply_fn(x, 999·t)/σ(t) for an ε-prediction network.

  σ(t) is the sde's own marginal std (rounded to the grid if discrete), as in score_sde.
  """
  def score_fn(x, t):
    return score_from_eps(apply_fn(x, sde.time_label(t)), sde.marginal(t)[1])
  return score_fn


def _check_weighting(weighting: str):
  if weighting not in WEIGHTINGS:
    raise ValueError(f"weighting={weighting!r} is not a DSM weighting; use one of "
                     f"{WEIGHTINGS}")


def dsm_loss_at(sde: VPSDE, apply_fn, x0: jax.Array, t: jax.Array, noise: jax.Array,
                weighting: str = "sigma2") -> jax.Array:
  """Per-image denoising score matching loss (B,) at given times t (B,) and noise.

  sigma2 (λ = σ², the usual): mean over the image of (eps_pred − noise)², which is
    σ²·‖s_θ − ∇log p_0t(x_t|x_0)‖²/D.
  likelihood (λ = g² = β, Song et al. 2021 "Maximum likelihood training"): the same
    times β(t)/σ(t)², so that its time integral bounds the negative log-likelihood.
  """
  _check_weighting(weighting)
  x_t = sde.perturb(x0, t, noise)
  eps_pred = apply_fn(x_t, sde.time_label(t))
  sq = jnp.square(eps_pred - noise)
  loss = jnp.mean(sq.reshape(sq.shape[0], -1), axis=-1)
  if weighting == "likelihood":
    loss = loss * sde.beta(t) / jnp.square(sde.marginal(t)[1])
  return loss


def dsm_loss(sde: VPSDE, apply_fn, x0: jax.Array, rng: jax.Array,
             weighting: str = "sigma2") -> jax.Array:
  """dsm_loss_at at t = sde.sample_time and noise ~ N(0, I), one draw per image (B,)."""
  _check_weighting(weighting)
  t_rng, noise_rng = jax.random.split(rng)
  t = sde.sample_time(t_rng, x0.shape[0])
  noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
  return dsm_loss_at(sde, apply_fn, x0, t, noise, weighting)


def make_sde(sde_config: ml_collections.ConfigDict) -> VPSDE:
  """The VPSDE of `model.sde`, after checking every field (weighting included).

  The weighting is not part of the SDE: pass `sde_config.weighting` to dsm_loss.
  """
  fields = ("beta_min", "beta_max", "num_scales", "discrete", "t_eps", "weighting")
  for key in fields:
    if key not in sde_config:
      raise ConfigError(f"model.sde.{key} is missing; set e.g. model.sde = dict("
                        f"beta_min=0.1, beta_max=20.0, num_scales=1000, discrete=False, "
                        f"t_eps=1e-5, weighting='sigma2')")
  if sde_config.weighting not in WEIGHTINGS:
    raise ConfigError(f"model.sde.weighting={sde_config.weighting!r} is not a DSM "
                      f"weighting; use one of {WEIGHTINGS}")
  values = {key: sde_config[key] for key in fields[:-1]}
  for key in ("beta_min", "beta_max", "t_eps"):
    if isinstance(values[key], numbers.Real) and not isinstance(values[key], bool):
      values[key] = float(values[key])
  return VPSDE(**values)
