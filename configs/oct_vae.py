"""Liu & Mitrovic: VAE anomaly scores on retinal OCT (Kermany et al. OCT2017).

Data: the OCT2017 image-folder release, `ROOT/train/{NORMAL,CNV,DME,DRUSEN}/*.jpeg` and
`ROOT/test/...`; training sees NORMAL only, 5% of it held out for validation.
Model: DCGAN-like fully convolutional VAE, 128×128 input → 5 stride-2 blocks (32…512),
separate conv heads for mean and log-variance, latent 300; loss SSE + 0.01·KL;
Adam 1e-4, batch 32, 40 epochs.

  python -m jaxad.train --config=configs/oct_vae.py --workdir=workdirs/oct \
      --config.data.path=/data/OCT2017

Published (reconstruction score AUROC): CNV 0.93, DME 0.90, drusen 0.77, all 0.87.
About 84k normal-class images → ~1.6k steps/epoch; hours on one GPU, days on a CPU.
"""

from jaxad import defaults


def get_config():
  c = defaults.use_dcgan128_vae(defaults.get_config())
  c.data.source = "folder"
  c.data.path = ""  # the OCT2017 root (holding train/ and test/)
  c.data.val_split = ""  # OCT2017's val/ has 8 images per class: hold out instead
  c.data.val_fraction = 0.05
  c.data.normal_classes = ("NORMAL",)
  c.data.channels = 1  # OCT B-scans are grayscale
  return c
