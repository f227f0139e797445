"""Thesis (TU/e): GAN-AD on MNIST, digits 0–8 normal and 9 anomalous.

A DCGAN at MNIST's native 28×28 (7·2²: no resizing), latent 100, Adam 2e-4 with β1 = 0.5;
test images are scored by AnoGAN latent search, 100 steps, λ = 0.5. Works with
tensorflow-datasets' `mnist` or any npz in the MedMNIST layout:

  python -m jaxad.train --config=configs/mnist_gan.py --workdir=workdirs/mnist_gan
  python -m jaxad.evaluate --workdir=workdirs/mnist_gan

The eval binary reports the `gan` scores' AUROC and the logistic-regression AUROC the
thesis uses, beside density plots of normal and anomalous scores.
"""

from jaxad import defaults


def get_config():
  c = defaults.get_config()
  c.data.source = "tfds"
  c.data.name = "mnist"
  c.data.train_split = "train"
  c.data.val_split = ""
  c.data.val_fraction = 0.1
  c.data.test_split = "test"
  c.data.anomalous_classes = (9,)
  c.data.image_size = 28
  c.data.channels = 1
  c.model.family = "gan"
  c.model.name = "dcgan"
  c.model.latent_dim = 100
  c.model.widths = (64, 128)  # 28 → 14 → 7; the generator mirrors it
  c.train.batch_size = 64
  c.train.num_epochs = 25
  c.train.learning_rate = 2e-4
  c.train.b1 = 0.5
  c.train.log_every_steps = 100
  c.train.checkpoint_every_steps = 1000
  c.eval.latent_steps = 100
  c.eval.latent_lr = 1e-3
  c.eval.latent_lambda = 0.5
  return c
