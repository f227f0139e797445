"""Lu & Xu: VAE anomaly detection on ISIC 2018 Task 3 skin lesions, nevus as normal.

Data: ISIC 2018 Task 3 images with the one-hot ground-truth CSV layout
(`image,MEL,NV,BCC,AKIEC,BKL,DF,VASC`), one CSV per split: `ROOT/{split}.csv` for
train/val/test (split the official training CSV, or use the official validation and
test ground truth), images in `ROOT/images/<image>.jpg`. Add a `lesion_id` column and
set data.group_column to keep a patient's lesions together in the bootstrap.
Model: the 128×128 DCGAN-like VAE of Liu & Mitrovic, latent 300, β = 0.01.

  python -m jaxad.train --config=configs/isic_vae.py --workdir=workdirs/isic \
      --config.data.path=/data/isic2018/{split}.csv --config.data.image_dir=/data/isic2018/images

Published (reconstruction score AUROC): all 0.779, AKIEC 0.872, MEL 0.864.
"""

from jaxad import defaults


def get_config():
  c = defaults.use_dcgan128_vae(defaults.get_config())
  c.data.source = "csv"
  c.data.path = ""  # e.g. /data/isic2018/{split}.csv
  c.data.image_dir = ""  # folder of the .jpg files
  c.data.id_column = "image"
  c.data.normal_classes = ("NV",)
  c.data.channels = 3
  return c
