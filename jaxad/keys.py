"""The one table of random-key purposes: every draw derives from `config.seed` by one.

A key is `fold_in(key(seed), purpose)`, then folded with the step (training) or the
batch (evaluation), so a resumed run or a rerun draws exactly the same numbers.
"""

import jax

INIT = 0  # parameter initialisation
TRAIN = 1  # the training step's noise (z samples, diffusion times, GAN latents)
VAL = 2  # the validation loss
EVAL = 3  # the eval binary's scores and maps
HEALTHY = 4  # healthy-map statistics (N-sigma thresholds, pixel-curve ranges)
MUTATION = 5  # train.mutation_rate's input perturbation (the background model)


def purpose_key(seed: int, purpose: int) -> jax.Array:
  """The root key of one purpose for a run with this seed."""
  return jax.random.fold_in(jax.random.key(seed), purpose)
