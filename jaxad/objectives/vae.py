"""The VAE objective as per-image terms, reduced late (after google-research/vdm).

`vae_terms` runs encoder, one reparameterised sample and decoder in a single `apply`
(so BatchNorm statistics update once per step) and returns per-image values in nats;
callers average, mask or sum them as they need.
"""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxad.objectives import likelihood as likelihood_lib


@flax.struct.dataclass
class VAETerms:
  """Per-image terms of the VAE objective, each (B,)."""

  rec: jax.Array  # −log p(x|z) for one sample z ~ q(z|x), nats.
  kl: jax.Array  # closed-form KL(q(z|x) ‖ p(z)), nats.
  train_rec: jax.Array  # reconstruction term of the training loss (SSE, or −log p(x|z)).

  @property
  def neg_elbo(self) -> jax.Array:
    """Single-sample −ELBO estimate per image, nats."""
    return self.rec + self.kl


def _encode_sample_decode(module: nn.Module, x: jax.Array, rng: jax.Array, train: bool):
  """(mu, logvar, decoder output) with z = mu + exp(½·logvar)·eps, eps ~ N(0, I)."""
  mu, logvar = module.encode(x, train)
  eps = jax.random.normal(rng, mu.shape, mu.dtype)
  z = mu + jnp.exp(0.5 * logvar) * eps
  return mu, logvar, module.decode(z, train)


def vae_terms(model: nn.Module, variables, x: jax.Array, rng: jax.Array,
              likelihood: likelihood_lib.Likelihood, *, train: bool
              ) -> tuple[VAETerms, dict]:
  """One reparameterised sample; returns per-image terms and updated mutable collections.

  The dict holds the new 'batch_stats' when the model has BatchNorm and train=True
  (merge it into the variables for the next step), else it is empty. `train` must be
  a Python bool. Jit-able, differentiable w.r.t. params and x, and vmappable.
  """
  mutable = ["batch_stats"] if train and "batch_stats" in variables else False
  outputs = model.apply(variables, x, rng, train, method=_encode_sample_decode,
                        mutable=mutable)
  updates = {}
  if mutable:
    outputs, updates = outputs
    updates = dict(updates)
  mu, logvar, decoder_out = outputs
  terms = VAETerms(
      rec=-likelihood.log_prob(x, decoder_out),
      kl=likelihood_lib.gaussian_kl(mu, logvar),
      train_rec=likelihood.train_rec(x, decoder_out))
  return terms, updates


def training_loss(terms: VAETerms, likelihood: likelihood_lib.Likelihood) -> jax.Array:
  """mean_b(train_rec + beta·KL): beta·(−ELBO) + const for the fixed-σ Gaussian; for
  the others (train_rec = −log p(x|z)) the β-weighted −ELBO, the −ELBO itself at β = 1."""
  return jnp.mean(terms.train_rec + likelihood.beta * terms.kl)
