"""Thesis (TU/e): VAE-AD on MNIST, digits 0–8 normal and 9 anomalous.

Conv VAE on 32×32 (MNIST's 28×28 resized to 4·2^3), Bernoulli decoder, ELBO scores.
The protocol: train on the 0–8 images of MNIST's train part, choose the score and its
threshold on a labelled validation part that holds 9s, report on the official test set.
The data is the .npz `jaxad.data.prepare` writes from the four idx files as downloaded
(train/val/test, val = 10% of each class of train, stratified, seed 0):

  python -m jaxad.data.prepare --dataset=mnist --src=DIR --out=mnist.npz
  python -m jaxad.train --config=configs/mnist_vae.py --workdir=workdirs/mnist_vae \
      --config.data.path=mnist.npz
  python -m jaxad.evaluate --workdir=workdirs/mnist_vae

Its validation part already has 9s, so data.val_anomaly_fraction stays 0 (with a
validation part of normal images only, a fraction > 0 would move that part of the test
split's 9s into it). tensorflow-datasets' `mnist` (no val split: 10% of train held out,
9s included) instead:

  python -m jaxad.train --config=configs/mnist_vae.py --workdir=workdirs/mnist_tfds \
      --config.data.source=tfds --config.data.val_split= --config.data.val_fraction=0.1

About 48.6k normal training images → 380 steps/epoch at batch 128, 20 epochs; runtime
to be measured. Published: VAE-AD AUROC 0.84 (logistic regression on the score); the
best published VAE AUROC we know for 0–8 vs 9 is 0.66 (Tonnaer 2021, Table 3.3).
"""

from jaxad import defaults


def get_config():
  c = defaults.get_config()
  c.data.source = "npz"  # `jaxad.data.prepare --dataset=mnist` output (or tfds, above)
  c.data.path = "mnist.npz"
  c.data.name = "mnist"  # tfds only: the dataset name
  c.data.train_split = "train"
  c.data.val_split = "val"  # the stratified val part of the npz (it has 9s)
  c.data.val_fraction = 0.0  # used only with data.val_split='' (tfds: 0.1)
  c.data.val_anomaly_fraction = 0.0  # val already holds 9s: nothing to move from test
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
