"""Thesis (TU/e): VAE-AD on MNIST, digits 0–8 normal and 9 anomalous.

Conv VAE on 32×32 (MNIST's 28×28 resized to 4·2^3), Bernoulli decoder, ELBO scores.
Works with tensorflow-datasets' `mnist` or any npz in the MedMNIST layout:

  python -m jaxad.train --config=configs/mnist_vae.py --workdir=workdirs/mnist_vae
  python -m jaxad.train --config=configs/mnist_vae.py --workdir=workdirs/mnist_npz \
      --config.data.source=npz --config.data.path=FILE.npz

Published: VAE-AD AUROC 0.84 (logistic regression on the score).
"""

from jaxad import defaults


def get_config():
  c = defaults.get_config()
  c.data.source = "tfds"
  c.data.name = "mnist"
  c.data.train_split = "train"
  c.data.val_split = ""  # hold 10% of train out (works for tfds and npz alike)
  c.data.val_fraction = 0.1
  c.data.test_split = "test"
  c.data.anomalous_classes = (9,)
  c.data.image_size = 32
  c.data.channels = 1
  c.model.name = "conv_vae"
  c.model.widths = (32, 64, 128)
  c.model.latent_dim = 32
  c.model.norm = "batch"
  c.model.likelihood = "bernoulli"
  c.model.beta = 1.0
  c.train.batch_size = 128
  c.train.num_epochs = 20
  c.train.learning_rate = 1e-3
  c.train.checkpoint_every_steps = 1000
  c.train.log_every_steps = 100
  return c
