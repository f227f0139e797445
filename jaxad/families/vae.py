"""The VAE family: −ELBO training, the six sample-wise scores and the five pixel maps
(and AE-U's normalised reconstruction error, score and map, under a likelihood with a
variance per value: `sample.score_names`, `pixel.map_names`)."""

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxad import families
from jaxad.models import vae as vae_models
from jaxad.objectives import likelihood as likelihood_lib
from jaxad.objectives import vae as vae_objectives
from jaxad.scores import pixel, sample
from jaxad.scores import regret as regret_lib


@dataclasses.dataclass(frozen=True)
class VAE:
  """A VAE with its decoder likelihood and the eval settings of its scores."""

  module: nn.Module
  likelihood: likelihood_lib.Likelihood
  num_samples: int = 15  # L posterior samples of the vae/iwae scores
  smooth_sigma: float = 0.0  # gaussian smoothing of the pixel maps
  val_metric: str = "neg_elbo"
  likelihood_scores: tuple[str, ...] = ("vae", "iwae")  # bounds on −log p(x), nats
  regret: regret_lib.RegretSettings | None = None  # eval.regret (None: off)

  @property
  def sample_scores(self) -> tuple[str, ...]:
    return sample.score_names(self.likelihood) + (
        regret_lib.SAMPLE_SCORES if self.regret is not None else ())

  @property
  def pixel_maps(self) -> tuple[str, ...]:
    return pixel.map_names(self.likelihood)

  def init(self, rng: jax.Array, shape: tuple[int, ...]) -> dict:
    return dict(self.module.init(rng, jnp.zeros((1, *shape)), train=False))

  def train_loss(self, params, model_state: dict, images: jax.Array, rng: jax.Array):
    """mean_b(train_rec + β·KL) with one reparameterised sample; updates batch stats."""
    terms, updates = vae_objectives.vae_terms(
        self.module, {"params": params, **model_state}, images, rng, self.likelihood,
        train=True)
    loss = vae_objectives.training_loss(terms, self.likelihood)
    metrics = {"neg_elbo": terms.neg_elbo.mean(), "kl": terms.kl.mean(),
               "rec": terms.rec.mean()}
    return loss, (metrics, updates)

  def val_loss(self, variables, images: jax.Array, rng: jax.Array) -> jax.Array:
    """Single-sample −ELBO per image (nats), eval mode."""
    terms, _ = vae_objectives.vae_terms(self.module, variables, images, rng,
                                        self.likelihood, train=False)
    return terms.neg_elbo

  def score(self, variables, images: jax.Array, rng: jax.Array, with_maps: bool):
    out = sample.sample_scores(self.module, variables, images, rng, self.likelihood,
                               self.num_samples)
    if self.regret is not None:  # keys: rng feeds the scores, fold_in(rng, 1) the maps
      out.update(regret_lib.regret_scores(self.module, variables, images,
                                          jax.random.fold_in(rng, 2), self.likelihood,
                                          self.regret))
    maps = pixel.pixel_maps(self.module, variables, images, jax.random.fold_in(rng, 1),
                            self.likelihood, smooth_sigma=self.smooth_sigma) \
        if with_maps else {}
    return out, maps

  def likelihood_bpd(self, scores: dict, num_dims: int, bit_depth: int) -> dict:
    """The `likelihood_scores` in bits per dimension of the image at `bit_depth` bits.

    Gaussian (fixed or learned variance): p(x|z) is a density on [-1, 1], and the
    discrete image's probability is about p(x)·w^D with bin width w = 2/(2^bit_depth − 1)
    (`likelihood.bits_per_dim`).
    Discretised logistic: −log p(x|z) is the probability of the discrete image at
    bit_depth bits itself: bits = nats/(D·ln 2), exact (up to the bound).
    Bernoulli: −log p(x|z) is already in the units of a probability of (x + 1)/2
    (exact for binary images, a cross-entropy for grey ones): bits = nats/ln 2.
    """
    kind, levels = self.likelihood.kind, 2 ** bit_depth
    if kind == "discretized_logistic" and bit_depth != self.likelihood.bit_depth:
      raise ValueError(f"the model's discrete likelihood has {self.likelihood.bit_depth} "
                       f"bits per value, not {bit_depth}: pass config.data.bit_depth")
    if kind in ("gaussian", "gaussian_learned"):
      convert = lambda nll: likelihood_lib.bits_per_dim(-nll, num_dims, levels)
    else:
      convert = lambda nll: nll / (num_dims * math.log(2))
    return {k: convert(scores[k]) for k in self.likelihood_scores}

  def reconstruct(self, variables, images: jax.Array, rng: jax.Array) -> Any:
    """The decoded posterior mean, E[x | z = mu(x)] (deterministic: `rng` unused)."""
    del rng
    mu, _ = sample.encode(self.module, variables, images)
    return self.likelihood.mean(sample.decode(self.module, variables, mu))


def build(config: ml_collections.ConfigDict, image_shape: tuple[int, ...]) -> VAE:
  """The VAE of config.model, its decoder sized for the likelihood's parameters."""
  return VAE(module=vae_models.build_model(config.model, image_shape,
                                          families.compute_dtype(config)),
             likelihood=likelihood_lib.make_likelihood(config.model,
                                                       int(config.data.bit_depth)),
             num_samples=int(config.eval.num_samples),
             smooth_sigma=float(config.eval.smooth_sigma),
             regret=regret_lib.settings_from_config(config.eval)
             if config.eval.regret.enabled else None)
