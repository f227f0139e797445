"""Per-image anomaly scores from L posterior samples: −ELBO and IWAE bounds, in nats.

With z_i = mu + σ·eps_i ~ q(z|x), i = 1..L, and log w_i = log p(x|z_i) + log p(z_i) −
log q(z_i|x), the scores are (higher = more anomalous):

  vae      = KL(q‖p) − (1/L) Σ log p(x|z_i)      (closed-form KL)
  vae_kl   = KL(q‖p)
  vae_rec  = −(1/L) Σ log p(x|z_i)
  iwae     = −[logsumexp_i log w_i − log L]        (≥ −log p(x) in expectation)
  iwae_kl  = −[logsumexp_i (log p(z_i) − log q(z_i|x)) − log L]
  iwae_rec = −[logsumexp_i log p(x|z_i) − log L]

and, for a likelihood with a variance per value (gaussian_learned), AE-U's score (Mao et
al., MICCAI 2020) with x̂_i, σ²_i the decoded mean and variance of sample i:

  vae_rec_normalized = (1/L) Σ_i mean over values of (x − x̂_i)²·exp(−log σ²_i)

Every constant is kept, so `iwae` approaches −log p(x) as L grows. With the discretised
logistic likelihood log p(x|z) is the log-probability of the stored discrete image, so
`vae` and `iwae` bound its bits (× ln 2).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxad.objectives import likelihood as likelihood_lib

SAMPLE_SCORES = ("vae", "vae_kl", "vae_rec", "iwae", "iwae_kl", "iwae_rec")  # every one
VARIANCE_SCORES = ("vae_rec_normalized",)  # likelihoods with a variance per value


def score_names(likelihood: likelihood_lib.Likelihood) -> tuple[str, ...]:
  """The scores `sample_scores` returns under `likelihood`, in order."""
  return SAMPLE_SCORES + (VARIANCE_SCORES if likelihood.has_pixel_variance else ())


def encode(model: nn.Module, variables, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(mu, logvar) of q(z|x), each (B, d), in eval mode."""
  return model.apply(variables, x, False, method="encode")


def decode(model: nn.Module, variables, z: jax.Array) -> jax.Array:
  """Decoder output for latents z (N, d), in eval mode."""
  return model.apply(variables, z, False, method="decode")


def draw_eps(rng: jax.Array, num_samples: int, mu: jax.Array) -> jax.Array:
  """The standard-normal noise (L, B, d) behind the L posterior samples of each image."""
  return jax.random.normal(rng, (num_samples, *mu.shape), mu.dtype)


def log_q_from_eps(eps: jax.Array, logvar: jax.Array) -> jax.Array:
  """log q(z|x) at z = mu + σ·eps: log N(eps; 0, I) − ½Σ logvar (change of variables).

  Equals log_normal_diag(z, mu, logvar) exactly, without the round trip z − mu and
  exp(−logvar), which loses precision when σ is small.
  """
  return likelihood_lib.log_standard_normal(eps) - 0.5 * jnp.sum(logvar, axis=-1)


def log_mean_exp(values: jax.Array) -> jax.Array:
  """log (1/L) Σ_i exp(values_i) over the leading (sample) axis, computed stably."""
  return jax.nn.logsumexp(values, axis=0) - math.log(values.shape[0])


def sample_scores(model: nn.Module, variables, x: jax.Array, rng: jax.Array,
                  likelihood: likelihood_lib.Likelihood, num_samples: int
                  ) -> dict[str, jax.Array]:
  """The `score_names(likelihood)` of each image of x (B, ...) from `num_samples` draws
  of q(z|x).

  eps = jax.random.normal(rng, (L, B, d)); all L·B latents are decoded in one call, so
  memory grows with L·B decoded images. Pure and jit-able (`num_samples` and
  `likelihood` static); the same rng gives the same scores. Each value is (B,).
  """
  if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
    raise ValueError(f"num_samples must be a positive int; got {num_samples!r}")
  mu, logvar = encode(model, variables, x)
  eps = draw_eps(rng, num_samples, mu)
  z = mu + jnp.exp(0.5 * logvar) * eps  # (L, B, d)
  out = decode(model, variables, z.reshape(-1, z.shape[-1]))
  out = out.reshape(num_samples, x.shape[0], *out.shape[1:])
  log_px_z = jax.vmap(lambda o: likelihood.log_prob(x, o))(out)  # (L, B)
  log_prior_ratio = likelihood_lib.log_standard_normal(z) - log_q_from_eps(eps, logvar)
  kl = likelihood_lib.gaussian_kl(mu, logvar)
  rec = -jnp.mean(log_px_z, axis=0)
  scores = {
      "vae": kl + rec,
      "vae_kl": kl,
      "vae_rec": rec,
      "iwae": -log_mean_exp(log_px_z + log_prior_ratio),
      "iwae_kl": -log_mean_exp(log_prior_ratio),
      "iwae_rec": -log_mean_exp(log_px_z),
  }
  if likelihood.has_pixel_variance:
    normalized = jax.vmap(lambda o: likelihood.normalized_error(x, o))(out)  # (L, B, ...)
    scores["vae_rec_normalized"] = jnp.mean(
        normalized.reshape(num_samples, x.shape[0], -1), axis=(0, 2))
  return scores
