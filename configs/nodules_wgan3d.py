"""Thesis (TU/e): GAN-AD on 3D lung-nodule cubes with a WGAN-GP, 28³ natively.

Any npz in the MedMNIST 3D layout (NoduleMNIST3D: 28×28×28 cubes, 0 = benign normal,
1 = malignant anomalous). 28 = 7·2², so generator and critic need no resizing. WGAN-GP
settings of Gulrajani et al.: Adam 1e-4, β = (0, 0.9), 5 critic steps per generator
step, penalty weight 10, a layer-normalised critic. Scored by latent search:

  python -m jaxad.train --config=configs/nodules_wgan3d.py --workdir=workdirs/nodules_wgan3d \
      --config.data.path=nodulemnist3d.npz
  python -m jaxad.evaluate --workdir=workdirs/nodules_wgan3d
"""

from jaxad import defaults


def get_config():
  c = defaults.get_config()
  c.data.source = "npz"
  c.data.path = "nodulemnist3d.npz"
  c.data.ndim = 3
  c.data.normal_classes = (0,)  # benign
  c.data.image_size = 28
  c.data.depth = 28
  c.data.channels = 1
  c.model.family = "gan"
  c.model.name = "wgan_gp"
  c.model.latent_dim = 100
  c.model.widths = (32, 64)  # 28 → 14 → 7 per axis
  c.model.gan.discriminator_norm = "layer"
  c.model.gan.critic_steps = 5
  c.model.gan.gp_weight = 10.0
  c.train.batch_size = 32
  c.train.num_epochs = 100
  c.train.learning_rate = 1e-4
  c.train.b1 = 0.0
  c.train.b2 = 0.9
  c.train.log_every_steps = 20
  c.train.checkpoint_every_steps = 500
  c.eval.latent_steps = 100
  c.eval.latent_lr = 1e-4  # the loss sums over 28³ voxels
  c.eval.latent_lambda = 0.5
  return c
