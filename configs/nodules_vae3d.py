"""Thesis (TU/e): VAE-AD on 3D lung-nodule cubes (benign normal, malignant anomalous).

Any npz in the MedMNIST 3D layout (NoduleMNIST3D: `train_images` N×28×28×28 uint8,
`train_labels` N×1 with 0 = benign, 1 = malignant, `val_*`, `test_*`). The 3D conv VAE
needs sides 4·2^k, so cubes are resized to 32³ (three stride-2 blocks):

  python -m jaxad.train --config=configs/nodules_vae3d.py --workdir=workdirs/nodules_vae3d \
      --config.data.path=nodulemnist3d.npz
  python -m jaxad.evaluate --workdir=workdirs/nodules_vae3d

Every VAE score (ELBO, KL, rec, IWAE) and voxel maps when the npz has `<split>_masks`;
figures show the middle slice.
"""

from jaxad import defaults


def get_config():
  c = defaults.get_config()
  c.data.source = "npz"
  c.data.path = "nodulemnist3d.npz"
  c.data.ndim = 3
  c.data.normal_classes = (0,)  # benign
  c.data.image_size = 32
  c.data.depth = 32
  c.data.channels = 1
  c.model.name = "conv_vae"
  c.model.widths = (16, 32, 64)
  c.model.latent_dim = 64
  c.model.norm = "batch"
  c.model.likelihood = "gaussian"
  c.model.beta = 0.05
  c.train.batch_size = 32
  c.train.num_epochs = 50
  c.train.learning_rate = 1e-3
  c.train.log_every_steps = 20
  c.train.checkpoint_every_steps = 500
  return c
