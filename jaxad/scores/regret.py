"""Likelihood Regret (Xiao, Yan & Amit, NeurIPS 2020): how much a VAE's bound on one
image improves when its posterior is fitted to that image alone.

An amortised encoder is good where it was trained; an out-of-distribution image gets a
poor q(z|x) while the decoder may still explain it, and a few optimisation steps on that
image alone recover part of its bound. For each image x (nats; higher = more anomalous):

  nll_trained    = −bound_L(x; q from the trained encoder)
  nll_optimised  = −bound_L(x; q after `steps` Adam steps on −ELBO(x), x alone)
  vae_regret     = nll_trained − min(nll_trained, nll_optimised)  ≥ 0

Two things can be optimised (`target`):
  encoder    every encoder weight, one private copy per image (the paper: Adam 1e-4,
             100 steps); memory per image: the encoder's weights × 4 (weights, two
             Adam moments, gradient)
  posterior  q(z|x)'s (mu, logvar) directly (cheaper; the decoder pass dominates)

Each step's −ELBO = KL(q‖p) − (1/S) Σ log p(x|z_s) with S = samples_per_step fresh draws
(the paper: S = 1, as in training). bound_L before and after uses the same L draws of
eps (common random numbers: the difference is the optimisation's, not the noise's):

  bound = "elbo"  KL(q‖p) − (1/L) Σ log p(x|z_i): what the steps optimise, so its gain
                  is the fitted part of the amortisation gap KL(q ‖ p(z|x))
  bound = "iwae"  −log (1/L) Σ p(x, z_i)/q(z_i|x): the paper's −log p(x) estimate

On a toy (tests/test_regret.py: an MLP VAE trained on a plane, anomalies moved off it;
8 seeds, L = 16) the ELBO gain separated the two (AUROC 1.0 on 7 seeds, 0.875 on one)
and the IWAE gain less well (0.375–1.0): fitting q to the ELBO makes it more
mode-seeking, which can lower the IWAE bound while the ELBO rises. Hence the default
"elbo".

The optimiser may end worse than it started (stochastic steps, a large learning rate);
the optimised posterior is then the trained one, so the regret is ≥ 0, and the raw
difference is returned as `improvement`.

Images are independent: the per-image optimisation is `jax.vmap`ped over the batch (one
compiled program per batch shape), the model in eval mode (BatchNorm running
statistics), so a batch gives each image what optimising it alone gives. Image i's
noise comes from fold_in(rng, index[i]), as `jaxad.scoring.per_image` keys images.
"""

import dataclasses
import math
import numbers

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxad.errors import ConfigError
from jaxad.objectives import likelihood as likelihood_lib
from jaxad.scores import sample

SAMPLE_SCORES = ("vae_regret",)
TARGETS = ("encoder", "posterior")
BOUNDS = ("elbo", "iwae")
# eval.regret.learning_rate = 0 picks these: the paper's for the encoder; for (mu,
# logvar), in latent units of about 1, a step that can move them by 1 in 100 steps.
DEFAULT_LEARNING_RATES = {"encoder": 1e-4, "posterior": 1e-2}
ENCODER_COLLECTION = "encoder"  # the params subtree the encoder target optimises


@flax.struct.dataclass
class RegretResult:
  """What likelihood_regret returns; the batch is the leading axis except in `losses`."""

  regret: jax.Array  # (B,) nats, ≥ 0: nll_trained − nll_optimised
  nll_trained: jax.Array  # (B,) −bound_L with the trained posterior
  nll_optimised: jax.Array  # (B,) the same bound, same noise, after optimisation
  improvement: jax.Array  # (B,) nll_trained − the bound at the last step (may be < 0)
  losses: jax.Array  # (steps, B) the −ELBO estimate of each step (before its update)


@dataclasses.dataclass(frozen=True)
class RegretSettings:
  """eval.regret resolved: likelihood_regret's keyword arguments (hashable)."""

  target: str = "encoder"
  steps: int = 100
  learning_rate: float = 1e-4
  num_samples: int = 15
  samples_per_step: int = 1
  bound: str = "elbo"

  def __post_init__(self):
    check_settings(**self.kwargs())

  def kwargs(self) -> dict:
    """The keyword arguments of likelihood_regret."""
    return dataclasses.asdict(self)


def _is_int(value, low: int) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= low


def check_settings(*, target, steps, learning_rate, num_samples, samples_per_step=1,
                   bound="elbo") -> None:
  """ConfigError naming the eval.regret key of a bad setting (traced values pass)."""
  for value, key, valid in ((target, "target", TARGETS), (bound, "bound", BOUNDS)):
    if value not in valid:
      raise ConfigError(f"eval.regret.{key}={value!r} is not valid; use one of {valid}")
  if not _is_int(steps, 0):
    raise ConfigError(f"eval.regret.steps must be an int >= 0 (the paper: 100); got "
                      f"{steps!r}")
  for value, key in ((num_samples, "num_samples"), (samples_per_step, "samples_per_step")):
    if not _is_int(value, 1):
      raise ConfigError(f"eval.regret.{key} must be a positive int; got {value!r}")
  if isinstance(learning_rate, numbers.Real) and not (
      math.isfinite(learning_rate) and learning_rate > 0):
    raise ConfigError(f"eval.regret.learning_rate must be > 0 (or 0 in the config for the "
                      f"target's default, {DEFAULT_LEARNING_RATES}); got {learning_rate!r}")


def settings_from_config(eval_cfg: ml_collections.ConfigDict) -> RegretSettings:
  """eval.regret as RegretSettings; learning_rate 0 = DEFAULT_LEARNING_RATES[target]."""
  r = eval_cfg.regret
  lr = r.learning_rate
  if isinstance(lr, numbers.Real) and lr == 0:
    check_settings(target=r.target, steps=0, learning_rate=1.0, num_samples=1)
    lr = DEFAULT_LEARNING_RATES[r.target]
  return RegretSettings(target=r.target, steps=r.steps, learning_rate=float(lr),
                        num_samples=r.num_samples, samples_per_step=r.samples_per_step,
                        bound=r.bound)


def draw_noise(key: jax.Array, latent_dim: int, *, steps: int, num_samples: int,
               samples_per_step: int = 1, dtype=jnp.float32
               ) -> tuple[jax.Array, jax.Array]:
  """One image's standard-normal noise: (eval (L, d), steps (steps, S, d)).

  eval = normal(fold_in(key, 0)), the draws of the bound before and after; step t's
  draws = normal(fold_in(fold_in(key, 1), t)).
  """
  eval_eps = jax.random.normal(jax.random.fold_in(key, 0), (num_samples, latent_dim), dtype)
  step_key = jax.random.fold_in(key, 1)
  step_eps = jax.vmap(lambda t: jax.random.normal(
      jax.random.fold_in(step_key, t), (samples_per_step, latent_dim), dtype))(
          jnp.arange(steps))
  return eval_eps, step_eps.reshape(steps, samples_per_step, latent_dim)


def _posterior_fn(module: nn.Module, variables, x1: jax.Array, target: str):
  """(theta0, posterior): the optimised parameters and theta → (mu, logvar) (1, d)."""
  if target == "posterior":
    return sample.encode(module, variables, x1), lambda theta: theta
  params = variables["params"]
  if ENCODER_COLLECTION not in params:
    raise ConfigError(
        f"eval.regret.target='encoder' needs the model's encoder weights under params"
        f"[{ENCODER_COLLECTION!r}]; this model has {sorted(params)}: use "
        f"eval.regret.target='posterior'")

  def posterior(theta):
    new = {**variables, "params": {**params, ENCODER_COLLECTION: theta}}
    return sample.encode(module, new, x1)
  return params[ENCODER_COLLECTION], posterior


def _log_px(module, variables, likelihood, x1, z):
  """log p(x|z_i) for latents z (N, d) of the one image x1 (1, ...) → (N,)."""
  out = sample.decode(module, variables, z)
  out = out.reshape(z.shape[0], 1, *out.shape[1:])
  return jax.vmap(lambda o: likelihood.log_prob(x1, o))(out)[:, 0]


def _one_image(module, variables, likelihood, optimizer, x, key, *, target, steps,
               num_samples, samples_per_step, bound):
  """One image x (no batch axis): (regret, nll_trained, nll_optimised, improvement,
  losses (steps,)), as RegretResult names them."""
  x1 = x[None]
  theta0, posterior = _posterior_fn(module, variables, x1, target)
  mu0, _ = posterior(theta0)
  eval_eps, step_eps = draw_noise(key, mu0.shape[-1], steps=steps, num_samples=num_samples,
                                  samples_per_step=samples_per_step, dtype=mu0.dtype)

  def parts(theta, eps):  # eps (N, d) → mu, logvar (1, d), z (N, d), log p(x|z) (N,)
    mu, logvar = posterior(theta)
    z = mu + jnp.exp(0.5 * logvar) * eps
    return mu, logvar, z, _log_px(module, variables, likelihood, x1, z)

  def neg_elbo(theta, eps):
    mu, logvar, _, log_px = parts(theta, eps)
    return likelihood_lib.gaussian_kl(mu, logvar)[0] - jnp.mean(log_px)

  def neg_bound(theta):
    if bound == "elbo":
      return neg_elbo(theta, eval_eps)
    _, logvar, z, log_px = parts(theta, eval_eps)
    log_w = (log_px + likelihood_lib.log_standard_normal(z)
             - sample.log_q_from_eps(eval_eps, logvar))
    return -sample.log_mean_exp(log_w)

  def step(carry, eps):
    theta, opt_state = carry
    loss, grad = jax.value_and_grad(neg_elbo)(theta, eps)
    updates, opt_state = optimizer.update(grad, opt_state, theta)
    return (optax.apply_updates(theta, updates), opt_state), loss

  # lax.scan, not latent_search's Python loop: on XLA:CPU the posterior target's steps
  # ran about 2× faster unrolled (digits VAE, 10 steps), but 100 unrolled steps took
  # over 6 minutes to compile; scan compiles in seconds whatever `steps`.
  (theta, _), losses = jax.lax.scan(step, (theta0, optimizer.init(theta0)), step_eps)
  before = neg_bound(theta0)
  last = neg_bound(theta) if steps else before  # bit-equal, whatever XLA fuses
  after = jnp.minimum(before, last)
  return before - after, before, after, before - last, losses


def likelihood_regret(module: nn.Module, variables, images: jax.Array, rng: jax.Array,
                      likelihood: likelihood_lib.Likelihood, *, steps: int,
                      learning_rate, num_samples: int, target: str = "encoder",
                      samples_per_step: int = 1, bound: str = "elbo",
                      index: jax.Array | None = None) -> RegretResult:
  """Likelihood Regret of each image of `images` (B, ...), in nats (see the module doc).

  module/variables: a VAE of jaxad.models.vae (encode/decode methods, eval mode; the
  encoder target optimises variables["params"]["encoder"]). rng: one key; image i draws
  its noise from fold_in(rng, index[i]), index defaulting to arange(B), so an image's
  result depends on (rng, its index) only. steps, num_samples, samples_per_step, target
  and likelihood are static; learning_rate may be traced. Jit-able; steps=0 gives 0.
  """
  check_settings(target=target, steps=steps, learning_rate=learning_rate,
                 num_samples=num_samples, samples_per_step=samples_per_step, bound=bound)
  if index is None:
    index = jnp.arange(images.shape[0])
  if index.shape != images.shape[:1]:
    raise ValueError(f"index must be ({images.shape[0]},), one per image; got {index.shape}")
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, index)
  one = lambda x, key: _one_image(
      module, variables, likelihood, optax.adam(learning_rate), x, key, target=target,
      steps=steps, num_samples=num_samples, samples_per_step=samples_per_step, bound=bound)
  regret, before, after, improvement, losses = jax.vmap(one)(images, keys)
  return RegretResult(regret=regret, nll_trained=before, nll_optimised=after,
                      improvement=improvement, losses=losses.T)


def regret_scores(module: nn.Module, variables, images: jax.Array, rng: jax.Array,
                  likelihood: likelihood_lib.Likelihood, settings: RegretSettings
                  ) -> dict[str, jax.Array]:
  """{"vae_regret": (B,)}: the sample score a VAE family adds when eval.regret.enabled."""
  result = likelihood_regret(module, variables, images, rng, likelihood, **settings.kwargs())
  return {"vae_regret": result.regret}
