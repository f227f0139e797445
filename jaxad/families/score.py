"""The score family (SANO, Gonzalez-Jimenez et al.): a VP-SDE ε-prediction U-Net.

Training minimises denoising score matching (`jaxad.objectives.sde`). Evaluation makes
one forward pass of the (EMA) network on the clean image at a small t = eval.sano.t:
s(x, t) = −ε_θ(x, 999t)/σ(t) ≈ ∇ₓ log p(x). Healthy tissue sits where the density is
high and its score is small; an anomaly pulls the score towards the healthy manifold.

  pixel map  sano       = gaussian_filter(mean_c |s(x, t)|, eval.sano.smooth_sigma)
  sample     sano_mean  = mean of the map over the image
             sano_topk  = mean of its largest eval.sano.top_k_fraction of values
             dsm        = DSM loss (σ² weighting) at t = eval.sano.dsm_t, averaged
                          over eval.sano.dsm_samples noise draws
             prob_flow_nll, prob_flow_bpd (eval.prob_flow.enabled): the exact
                          likelihood through the probability-flow ODE

The N·σ threshold of the map comes from healthy images only (the eval binary).
"""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxad import families
from jaxad.errors import ConfigError
from jaxad.models import unet as unet_models
from jaxad.objectives import likelihood as likelihood_lib
from jaxad.objectives import sde as sde_lib
from jaxad.scores import pixel
from jaxad.scores import prob_flow

SAMPLE_SCORES = ("sano_mean", "sano_topk", "dsm")
PROB_FLOW_SCORES = ("prob_flow_nll", "prob_flow_bpd")
PIXEL_MAPS = ("sano",)


@dataclasses.dataclass(frozen=True)
class ScoreModel:
  """A time-conditioned ε-prediction network, its VP-SDE and the SANO eval settings."""

  module: nn.Module
  sde: sde_lib.VPSDE
  weighting: str = "sigma2"
  map_t: float = 1e-3
  smooth_sigma: float = 2.0
  top_k_fraction: float = 0.01
  dsm_t: float = 0.05
  dsm_samples: int = 4
  prob_flow_steps: int = 0  # 0: no probability-flow likelihood
  prob_flow_probes: int = 1
  levels: int = 256
  val_metric: str = "dsm"
  pixel_maps: tuple[str, ...] = PIXEL_MAPS

  @property
  def sample_scores(self) -> tuple[str, ...]:
    return SAMPLE_SCORES + (PROB_FLOW_SCORES if self.prob_flow_steps else ())

  @property
  def likelihood_scores(self) -> tuple[str, ...]:
    """Scores with a −log p(x) behind them (for complexity correction)."""
    return ("prob_flow",) if self.prob_flow_steps else ()

  def likelihood_bpd(self, scores: dict, num_dims: int, bit_depth: int) -> dict:
    """prob_flow: the probability-flow bpd of the image at `bit_depth` bits (dequantised
    at eval.prob_flow.levels = 2^bit_depth; for continuous levels=0, the density's
    −log p(x) with the bin width of 2^bit_depth levels, as `likelihood.bits_per_dim`)."""
    if not self.prob_flow_steps:
      return {}
    if self.levels:
      return {"prob_flow": scores["prob_flow_bpd"]}
    return {"prob_flow": likelihood_lib.bits_per_dim(-scores["prob_flow_nll"], num_dims,
                                                     2 ** bit_depth)}

  def init(self, rng: jax.Array, shape: tuple[int, ...]) -> dict:
    return dict(self.module.init(rng, jnp.zeros((1, *shape)), jnp.zeros((1,)), train=False))

  def _eps_fn(self, variables, train: bool, rng=None):
    """ε_θ(x, label) with label = 999t; the Fourier embedding gets log σ(t) instead
    (as NCSN++), since its random frequencies would alias on 999t."""
    rngs = {"dropout": rng} if train and rng is not None else None

    def eps(x, label):
      if self.module.embedding == "fourier":
        label = jnp.log(self.sde.marginal(label / (self.sde.num_scales - 1))[1])
      return self.module.apply(variables, x, label, train, rngs=rngs)
    return eps

  def train_loss(self, params, model_state: dict, images: jax.Array, rng: jax.Array):
    """Mean per-image DSM loss over the batch (t, noise and dropout from rng)."""
    loss_rng, dropout_rng = jax.random.split(rng)
    eps_fn = self._eps_fn({"params": params, **model_state}, True, dropout_rng)
    per_image = sde_lib.dsm_loss(self.sde, eps_fn, images, loss_rng, self.weighting)
    loss = jnp.mean(per_image)
    return loss, ({"dsm": loss}, {})

  def val_loss(self, variables, images: jax.Array, rng: jax.Array) -> jax.Array:
    """Per-image DSM loss at random t, eval mode (the validation curve)."""
    return sde_lib.dsm_loss(self.sde, self._eps_fn(variables, False), images, rng,
                            self.weighting)

  def score_fn(self, variables):
    """s(x, t) for continuous t (B,), as the probability-flow ODE needs it."""
    return sde_lib.make_score_fn(self.sde, self._eps_fn(variables, False))

  def sano_map(self, variables, images: jax.Array) -> jax.Array:
    """mean_c |s(x, map_t)|, smoothed: (B, H, W)."""
    t = jnp.full((images.shape[0],), self.map_t, images.dtype)
    score = self.score_fn(variables)(images, t)
    return pixel.gaussian_smooth(pixel.channel_mean(jnp.abs(score)), self.smooth_sigma)

  def score(self, variables, images: jax.Array, rng: jax.Array, with_maps: bool):
    sano = self.sano_map(variables, images)
    flat = sano.reshape(sano.shape[0], -1)
    k = max(1, int(math.ceil(self.top_k_fraction * flat.shape[1])))
    eps_fn = self._eps_fn(variables, False)
    t = jnp.full((images.shape[0],), self.dsm_t, images.dtype)

    def dsm_at(key):
      noise = jax.random.normal(key, images.shape, images.dtype)
      return sde_lib.dsm_loss_at(self.sde, eps_fn, images, t, noise, self.weighting)
    dsm = jnp.mean(jax.lax.map(dsm_at, jax.random.split(rng, self.dsm_samples)), axis=0)
    out = {"sano_mean": jnp.mean(flat, axis=1),
           "sano_topk": jnp.mean(jax.lax.top_k(flat, k)[0], axis=1),
           "dsm": dsm}
    if self.prob_flow_steps:
      out.update(prob_flow.prob_flow_scores(
          self.sde, self.score_fn(variables), images, jax.random.fold_in(rng, 1),
          steps=self.prob_flow_steps, num_probes=self.prob_flow_probes,
          levels=self.levels))
    return out, ({"sano": sano} if with_maps else {})

  def reconstruct(self, variables, images: jax.Array, rng: jax.Array):
    """No reconstruction: the report shows the image, its map and its mask."""
    del variables, images, rng
    return None


def build(config: ml_collections.ConfigDict, image_shape: tuple[int, ...]) -> ScoreModel:
  s, pf = config.eval.sano, config.eval.prob_flow
  bits = int(config.data.bit_depth)
  if pf.enabled and config.eval.complexity and pf.levels not in (0, 2 ** bits):
    raise ConfigError(
        f"eval.prob_flow.levels={pf.levels} does not match data.bit_depth={bits}: the "
        f"complexity-corrected prob_flow score needs both to describe the same image; "
        f"set eval.prob_flow.levels={2 ** bits} (or 0), or eval.complexity=False")
  return ScoreModel(
      module=unet_models.build_unet(config.model.unet, image_shape,
                                    families.compute_dtype(config)),
      sde=sde_lib.make_sde(config.model.sde),
      weighting=config.model.sde.weighting,
      map_t=float(s.t), smooth_sigma=float(s.smooth_sigma),
      top_k_fraction=float(s.top_k_fraction), dsm_t=float(s.dsm_t),
      dsm_samples=int(s.dsm_samples),
      prob_flow_steps=int(pf.steps) if pf.enabled else 0,
      prob_flow_probes=int(pf.probes), levels=int(pf.levels))
