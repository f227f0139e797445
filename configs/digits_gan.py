"""The thesis's GAN-AD at CPU scale: a DCGAN on scikit-learn's digits, 9 held out.

Digits 0–8 are normal, 9 is the anomaly (the thesis's MNIST protocol), upsampled to
MNIST's 28×28 (7·2²: the generator grows 7 → 14 → 28). Test images are scored by
AnoGAN latent search (100 SGD-with-momentum steps, λ = 0.5), every image of a batch at
once. A few minutes on a CPU:

  python -m jaxad.train --config=configs/digits_gan.py --workdir=workdirs/digits_gan
  python -m jaxad.evaluate --workdir=workdirs/digits_gan

The WGAN-GP variant: --config.model.name=wgan_gp --config.train.b1=0.0 --config.train.b2=0.9
"""

from jaxad import defaults


def get_config():
  c = defaults.get_config()
  c.data.source = "digits"
  c.data.anomalous_classes = (9,)
  c.data.image_size = 28
  c.data.channels = 1
  c.model.family = "gan"
  c.model.name = "dcgan"
  c.model.latent_dim = 32
  c.model.widths = (32, 64)  # discriminator 28 → 14 → 7; the generator mirrors it
  c.train.batch_size = 64
  c.train.num_epochs = 30
  c.train.learning_rate = 2e-4  # DCGAN: Adam 2e-4, β1 = 0.5
  c.train.b1 = 0.5
  c.train.log_every_steps = 25
  c.train.checkpoint_every_steps = 250
  c.eval.latent_steps = 100
  c.eval.latent_lr = 1e-3
  c.eval.latent_lambda = 0.5
  return c
