"""Model families: what the trainer and the eval binary need to know about a model kind.

A family object (hashable, so compiled functions can be cached on it) bundles the flax
module with its objective and its scores:

  init(rng, shape)                      → variables {"params": ..., other collections}
  train_loss(params, state, x, rng)     → (loss, (metrics, collection updates))
  val_loss(variables, x, rng)           → (B,) per-image validation loss
  score(variables, x, rng, with_maps)   → ({sample score: (B,)}, {pixel map: (B, *spatial)})
  reconstruct(variables, x, rng)        → what the report shows beside each image, or
                                          None; rng is the key score() got for x

and names its `val_metric`, `sample_scores` and `pixel_maps`. A family whose training
step is not one gradient of one loss (the GAN's alternating updates) also defines

  init_opt_state(tx, params)            → its optimiser state
  train_update(tx, params, state, opt_state, x, rng)
                                        → (params, state, opt_state, metrics with "loss")

A family with a likelihood (the VAE; the score model with prob_flow on) names its
`likelihood_scores` (sample scores that bound or estimate −log p(x)) and defines

  likelihood_bpd(scores, num_dims, bit_depth)
                                        → {likelihood score: bits per dimension of the
                                          image quantised to bit_depth bits}

from which the eval binary and the grid derive the complexity-corrected scores (Serrà
et al.) and the background model's likelihood ratio (Ren et al.).

The trainer and the eval binary only ever call these, so a new family is one new module
here.

Precision: a family's `build` gives its modules `compute_dtype(config)`, the dtype
config.train.compute_dtype names (jaxad.models.precision). With bfloat16 the networks
compute in bfloat16, but every parameter, optimiser state, loss and score is float32:
the modules return float32 outputs, so the likelihoods, KL, DSM and GAN losses, their
reductions, and every sample score and pixel map are computed in float32.
"""

import importlib

import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxad.errors import ConfigError

FAMILIES = ("vae", "score", "gan")  # module names in this package
# train.compute_dtype → the modules' computation dtype (None: as the float32 inputs, so a
# float32 model's parameters, numbers and compiled programs are those of no dtype at all).
COMPUTE_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}


def compute_dtype(config: ml_collections.ConfigDict):
  """The computation dtype of config.train.compute_dtype: None (float32) or jnp.bfloat16.

  The one place the key is read; every family's `build` (and the grid) passes the result
  to its model builders.
  """
  train = config.get("train", None)
  name = train.get("compute_dtype", "float32") if train is not None else "float32"
  if name not in COMPUTE_DTYPES:
    raise ConfigError(f"train.compute_dtype={name!r} is not a compute dtype; use one of "
                      f"{list(COMPUTE_DTYPES)}")
  return COMPUTE_DTYPES[name]


def build(config: ml_collections.ConfigDict, image_shape: tuple[int, ...]):
  """The family object config.model describes, for images of `image_shape`."""
  name = config.model.family
  if name not in FAMILIES:
    raise ConfigError(f"model.family={name!r} is not one of {list(FAMILIES)}")
  module = importlib.import_module(f"jaxad.families.{name}")
  return module.build(config, tuple(image_shape))


def gradient_update(family, tx: optax.GradientTransformation, params, model_state: dict,
                    opt_state, images: jax.Array, rng: jax.Array):
  """The default training update: one step of `tx` on the gradient of family.train_loss.

  Returns (params, model_state, opt_state, metrics with "loss" and "grad_norm"), the
  shape of a family's own `train_update`.
  """
  (loss, (metrics, updates)), grads = jax.value_and_grad(
      family.train_loss, has_aux=True)(params, model_state, images, rng)
  param_updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, param_updates)
  metrics = {"loss": loss, **metrics, "grad_norm": optax.tree.norm(grads)}
  return params, {**model_state, **updates}, opt_state, metrics
