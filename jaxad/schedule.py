"""When things happen during training: periodic actions and Zimmerer et al.'s plateau.

`due` decides log / validate / checkpoint steps for the trainer and the grid alike
(firing on the last step too); `plateau_schedule` is one epoch of reduce-on-plateau and
early stopping on the validation loss, on host values.
"""

import ml_collections
import numpy as np

from jaxad.errors import ConfigError


def due(step, every, last=None):
  """True at every `every`-th step and at `last` (the final step), so a periodic action
  also fires when training ends. Works elementwise on arrays (a grid's members)."""
  hit = np.asarray(step) % np.asarray(every) == 0
  if last is not None:
    hit = hit | (np.asarray(step) == np.asarray(last))
  return bool(hit) if np.ndim(hit) == 0 else hit


def plateau_schedule(best_val: float, bad_epochs: int, lr: float, val_loss: float,
                     t: ml_collections.ConfigDict) -> tuple[float, int, float, bool]:
  """One epoch of Zimmerer et al.'s schedule on the validation loss, from config.train:
  (best loss, epochs without improvement, learning rate, stop early)."""
  improved = val_loss < best_val - t.min_delta
  best = val_loss if improved else best_val
  bad = 0 if improved else bad_epochs + 1
  if t.plateau_patience and bad and bad % t.plateau_patience == 0:
    lr *= t.plateau_factor
  stop = bool(t.early_stop_patience) and bad >= t.early_stop_patience
  return best, bad, lr, stop


def needs_validation(t: ml_collections.ConfigDict) -> bool:
  """Whether config.train's schedule reads a validation loss."""
  return bool(t.plateau_patience or t.early_stop_patience)


def check_validation(has_val_split: bool, needed: bool) -> None:
  """Refuses a plateau or early-stopping schedule (`needed`) without a validation split."""
  if needed and not has_val_split:
    raise ConfigError("train.plateau_patience / train.early_stop_patience need a "
                      "validation split: set data.val_split or data.val_fraction > 0")
