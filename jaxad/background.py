"""The background model of a likelihood ratio (Ren et al., NeurIPS 2019).

Much of an image's likelihood comes from what every image shares (smooth backgrounds,
the statistics of natural intensities), not from what makes it normal. Ren et al. fit a
second model to the same images with heavy input noise (each value replaced by a
uniform random level with probability μ), which keeps the shared statistics and
destroys the semantic content, and score with the ratio

  llr(x) = −log p(x) + log p_bg(x),

high when the model explains x no better than the background model does. Here the
background model is a smaller model of the same family (widths × background.width_factor)
trained by the same binary into WORKDIR/background, on the normal training images with
train.mutation_rate = background.mutation_rate, or on every image of a generic dataset
(background.source). The eval binary scores both on the same images with the same keys
and reports `<score>_llr` for every likelihood score, in bits per dimension.
"""

import jax
import jax.numpy as jnp
import ml_collections

SUBDIR = "background"  # WORKDIR/background holds its checkpoints and config.json
PREFIX = "background_"  # its raw scores, while the eval binary gathers them


def _scaled(widths, factor: float) -> tuple[int, ...]:
  return tuple(max(1, int(round(w * factor))) for w in widths)


def background_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The background model's config: the model's, smaller, trained on mutated inputs
  (or on a generic dataset), with no background of its own."""
  bg = config.copy_and_resolve_references()
  b = config.background
  bg.background.enabled = False
  m, f = bg.model, float(b.width_factor)
  m.widths = _scaled(m.widths, f)
  m.hidden = _scaled(m.hidden, f)
  m.base_width = max(1, int(round(m.base_width * f)))
  m.unet.base_width = max(1, int(round(m.unet.base_width * f)))
  bg.train.mutation_rate = float(b.mutation_rate)
  bg.eval.regret.enabled = False  # its scores feed only *_llr: no regret pass for it
  if b.source:
    d = bg.data
    d.source, d.name, d.path = b.source, b.name, b.path
    d.normal_classes, d.anomalous_classes = ("*",), ()  # every image of it
    d.train_split, d.val_split, d.val_fraction = "train", "", 0.0
    d.val_anomaly_fraction = 0.0  # a generic dataset: no validation, nothing to move
    bg.train.plateau_patience = bg.train.early_stop_patience = 0  # no validation split
  return bg


def mutate(images: jax.Array, rng: jax.Array, rate: float, bit_depth: int) -> jax.Array:
  """Each value replaced, with probability `rate`, by one of the 2^bit_depth levels of
  the [-1, 1] scale drawn uniformly (Ren et al.'s perturbation)."""
  pick, level = jax.random.split(rng)
  top = 2 ** bit_depth - 1
  noise = jax.random.randint(level, images.shape, 0, top + 1).astype(images.dtype)
  noise = noise * (2.0 / top) - 1.0
  return jnp.where(jax.random.bernoulli(pick, rate, images.shape), noise, images)


def llr_scores(model_bpd: dict, background_bpd: dict) -> dict:
  """`<score>_llr` = bpd(x) − bpd_bg(x) = (−log₂ p(x) + log₂ p_bg(x))/D per score."""
  return {f"{k}_llr": v - background_bpd[k] for k, v in model_bpd.items()}
