"""Model families: what the trainer and the eval binary need to know about a model kind.

A family object (hashable, so compiled functions can be cached on it) bundles the flax
module with its objective and its scores:

  init(rng, shape)                      → variables {"params": ..., other collections}
  train_loss(params, state, x, rng)     → (loss, (metrics, collection updates))
  val_loss(variables, x, rng)           → (B,) per-image validation loss
  score(variables, x, rng, with_maps)   → ({sample score: (B,)}, {pixel map: (B, *spatial)})
  reconstruct(variables, x)             → what the report shows beside each image, or None

and names its `val_metric`, `sample_scores` and `pixel_maps`. A family whose training
step is not one gradient of one loss (the GAN's alternating updates) also defines

  init_opt_state(tx, params)            → its optimiser state
  train_update(tx, params, state, opt_state, x, rng)
                                        → (params, state, opt_state, metrics with "loss")

The trainer and the eval binary only ever call these, so a new family is one new module
here.
"""

import importlib

import ml_collections

from jaxad.errors import ConfigError

FAMILIES = ("vae", "score", "gan")  # module names in this package


def build(config: ml_collections.ConfigDict, image_shape: tuple[int, ...]):
  """The family object config.model describes, for images of `image_shape`."""
  name = config.model.family
  if name not in FAMILIES:
    raise ConfigError(f"model.family={name!r} is not one of {list(FAMILIES)}")
  module = importlib.import_module(f"jaxad.families.{name}")
  return module.build(config, tuple(image_shape))
