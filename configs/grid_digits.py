"""A small robustness grid on scikit-learn's digits: 16 conv VAEs in 2 groups, on a CPU.

Zimmerer et al.'s protocol at toy scale: the decoder variance c (β = 2c), the left-out
class and the seed are vmapped (8 members train in one compiled step); the latent size
makes 2 groups. Synthetic lesions give pixel-wise AUROCs too. About 1.5 minutes on 2 busy cores:

  python -m jaxad.grid --config=configs/grid_digits.py --workdir=workdirs/grid_digits

One member alone, with the same numbers (here latent 4, c = 0.25, class 7, seed 1):

  python -m jaxad.train --config=configs/grid_digits.py --workdir=DIR/member \
      --config.model.latent_dim=4 --config.model.beta=0.5 \
      --config.data.anomalous_classes='(7,)' --config.seed=1

Writes DIR/grid.csv (16 members × 11 scores = 176 rows), DIR/grid.json, the figures and
DIR/grid.html. Expect sample-wise AUROCs of roughly 0.6–0.95, depending on the class.
"""

import os

import ml_collections

from jaxad.grid import axes as grid_axes


def get_config():
  base = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits_vae.py")
  c = grid_axes.with_grid(grid_axes.load_experiment(base))
  c.data.image_size = 16  # 4·2^2: two stride-2 blocks
  c.data.synthetic_lesions.enabled = True  # pixel-wise scores on lesioned normal digits
  c.model.widths = (16, 32)
  c.train.batch_size = 32
  c.train.num_epochs = 8
  c.train.learning_rate = 2e-3
  c.train.log_every_steps = 60
  c.eval.num_samples = 8
  c.eval.bootstrap = 0
  c.grid.axes = ml_collections.ConfigDict({
      "c": (0.025, 0.25),  # σ² of p(x|z) on [-1, 1] pixels: β = 0.05 and 0.5
      "left_out_class": (1, 7),
      "seed": (0, 1),
      "latent_dim": (4, 16),  # a shape axis: one group per value
  })
  return c
