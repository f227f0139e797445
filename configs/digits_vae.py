"""Default experiment: conv VAE on scikit-learn's digits, digit 9 held out as the anomaly.

The data ships with scikit-learn (1797 8×8 digits, upsampled to 32×32), so this runs
anywhere with no download, on a CPU in about a minute:

  python -m jaxad.train --config=configs/digits_vae.py --workdir=workdirs/digits_vae
"""

from jaxad import defaults


def get_config():
  c = defaults.get_config()
  c.data.source = "digits"
  c.data.anomalous_classes = (9,)  # the thesis's MNIST protocol: 0–8 normal, 9 anomalous
  c.data.image_size = 32  # 4·2^3: three stride-2 blocks
  c.data.channels = 1
  c.model.name = "conv_vae"
  c.model.widths = (32, 64, 128)
  c.model.latent_dim = 16
  c.model.norm = "batch"
  c.model.beta = 0.05  # σ² = 0.025 on [-1, 1] pixels
  c.train.batch_size = 32
  c.train.num_epochs = 30
  c.train.learning_rate = 1e-3
  c.train.log_every_steps = 30
  c.train.checkpoint_every_steps = 300
  return c
