"""Zimmerer et al.: fully convolutional VAE for brain-MRI slices, KL-gradient localisation.

Model: stride-2 convs with 16-32-64-256 feature maps (64×64 → 4×4), conv heads for mean
and log-variance, 256 latents, LeakyReLU, no normalisation, transposed convs back;
Gaussian decoder with c = σ² = 0.5 (β = 1, training loss SSE + KL). Adam 1e-4, ×0.1 on
a validation plateau, stop after 3 epochs without improvement.
Data: an image folder of 2D slices, `ROOT/<split>/<class>/*.png`, healthy slices in
`healthy/`, tumour slices elsewhere, lesion masks in `ROOT/<split>/masks/<class>/`.

  python -m jaxad.train --config=configs/brain_vae.py --workdir=workdirs/brain \
      --config.data.path=/data/brain_slices
"""

from jaxad import defaults


def get_config():
  c = defaults.use_zimmerer_schedule(defaults.get_config())
  c.data.source = "folder"
  c.data.path = ""
  c.data.val_split = "val"
  c.data.normal_classes = ("healthy",)
  c.data.image_size = 64
  c.data.channels = 1
  c.data.intensity = "minmax"  # MRI intensities have no fixed scale
  c.model.name = "conv_vae"
  c.model.widths = (16, 32, 64, 256)
  c.model.latent_dim = 256
  c.model.norm = "none"
  c.model.encoder_activation = "leaky_relu"
  c.model.decoder_activation = "leaky_relu"
  c.model.likelihood = "gaussian"
  c.model.beta = 1.0
  return c
