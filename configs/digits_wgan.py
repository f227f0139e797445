"""GAN-AD with a WGAN-GP critic on scikit-learn's digits (28×28), 9 held out; CPU-sized.

The WGAN-GP settings of Gulrajani et al.: Adam 1e-4, β = (0, 0.9), 5 critic updates per
generator update, gradient penalty 10, a layer-normalised critic. Scored by latent
search like configs/digits_gan.py:

  python -m jaxad.train --config=configs/digits_wgan.py --workdir=workdirs/digits_wgan
  python -m jaxad.evaluate --workdir=workdirs/digits_wgan
"""

import os

from jaxad.grid import axes as grid_axes


def get_config():
  base = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits_gan.py")
  c = grid_axes.load_experiment(base)
  c.model.name = "wgan_gp"
  c.model.gan.critic_steps = 5
  c.model.gan.gp_weight = 10.0
  c.train.learning_rate = 1e-4
  c.train.b1 = 0.0
  c.train.b2 = 0.9
  return c
