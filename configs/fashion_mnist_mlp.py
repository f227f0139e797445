"""Zimmerer et al.: fully connected VAE on FashionMNIST with one class left out.

Model: 3 fully connected layers of 400 units with ReLU, 20 latents, Gaussian decoder
p(x|z) = N(g(z), c·I) with c = 1 (β = 2c). Adam 1e-4, ×0.1 on a validation plateau,
stop after 3 epochs without improvement. The left-out class (here 0, T-shirt/top) is
the anomaly; the robustness grid varies it with data.anomalous_classes.

  python -m jaxad.train --config=configs/fashion_mnist_mlp.py --workdir=workdirs/fmnist
"""

from jaxad import defaults


def get_config():
  c = defaults.use_zimmerer_schedule(defaults.get_config())
  c.data.source = "tfds"
  c.data.name = "fashion_mnist"
  c.data.train_split = "train"
  c.data.val_split = ""
  c.data.val_fraction = 0.1
  c.data.test_split = "test"
  c.data.anomalous_classes = (0,)
  c.data.image_size = 28
  c.data.channels = 1
  c.model.name = "mlp_vae"
  c.model.hidden = (400, 400, 400)
  c.model.latent_dim = 20
  c.model.likelihood = "gaussian"
  c.model.beta = 2.0  # c = σ² = β/2 = 1
  return c
