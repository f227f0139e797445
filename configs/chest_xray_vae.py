"""Chest X-rays: conv VAE anomaly scores, normal = no finding, pneumonia anomalous.

Grayscale 64×64 chest X-rays. The default data is MedMNIST's PneumoniaMNIST at 64×64
(Yang et al., MedMNIST v2/v3; from Kermany et al. 2018's pediatric chest X-rays): the
npz `jaxad.data.prepare` checks and copies, `{train,val,test}_images` uint8 N×64×64 and
`_labels` uint8 N×1, class 0 normal and 1 pneumonia (4708 / 524 / 624 images; its val
part has pneumonia, so the score and threshold are chosen there, never on test):

  python -m jaxad.data.prepare --dataset=medmnist --flag=pneumoniamnist --size=64 \
      --out=pneumoniamnist_64.npz
  python -m jaxad.train --config=configs/chest_xray_vae.py --workdir=workdirs/chest_xray
  python -m jaxad.evaluate --workdir=workdirs/chest_xray

A folder of chest X-rays in the ImageFolder layout `ROOT/{train,val,test}/{NORMAL,
PNEUMONIA}/*.jpeg` (Kermany et al.'s release) instead: its val/ holds 16 images, so 10%
of train is held out for validation (pneumonia included); for a folder whose train and
validation images are all normal, data.val_anomaly_fraction moves that part of the test
split's pneumonia images into validation (image by image: a folder has no patient
column, data.group_column, which the csv source reads):

  python -m jaxad.train --config=configs/chest_xray_vae.py --workdir=workdirs/chest_folder \
      --config.data.source=folder --config.data.path=/data/chest_xray \
      --config.data.normal_classes='("NORMAL",)' --config.data.val_split= \
      --config.data.val_fraction=0.1 [--config.data.val_anomaly_fraction=0.2]

Add `--config.background.enabled=True` for the likelihood-ratio scores (`vae_llr`).
Model: conv VAE 64×64 → 4 stride-2 blocks (32-64-128-256) → 4×4, latent 64,
BatchNorm; Gaussian decoder with β = 0.01 (Lu & Xu: SSE + 0.01·KL, σ² = 0.005 on
[-1, 1] pixels). Adam 1e-3, batch 32, at most 100 epochs, ×0.1 after 5 epochs without
validation improvement, stop after 10. PneumoniaMNIST has 1214 normal training images
→ 37 steps/epoch, at most 3.7k steps; runtime to be measured (minutes on one GPU).
Number to reproduce: AUROC normal vs pneumonia on the test split, score chosen on
validation, mean and min/max over 3 seeds: to be measured.
"""

from jaxad import defaults


def get_config():
  c = defaults.get_config()
  c.data.source = "npz"  # `jaxad.data.prepare --dataset=medmnist` output (or folder)
  c.data.path = "pneumoniamnist_64.npz"
  c.data.train_split = "train"
  c.data.val_split = "val"  # PneumoniaMNIST's val part (it has pneumonia images)
  c.data.val_fraction = 0.0  # used only with data.val_split='' (a folder: 0.1)
  c.data.val_anomaly_fraction = 0.0  # > 0 only when validation has no pneumonia
  c.data.test_split = "test"
  c.data.normal_classes = (0,)  # class 0, 'normal' (no finding); folder: ('NORMAL',)
  c.data.image_size = 64  # 4·2^4: four stride-2 blocks
  c.data.channels = 1  # grayscale (RGB files are converted)
  c.model.name = "conv_vae"
  c.model.widths = (32, 64, 128, 256)
  c.model.latent_dim = 64
  c.model.norm = "batch"
  c.model.likelihood = "gaussian"
  c.model.beta = 0.01  # σ² = β/2 = 0.005 on [-1, 1] pixels
  t = c.train
  t.batch_size = 32
  t.num_epochs = 100
  t.learning_rate = 1e-3
  t.plateau_patience = 5  # epochs without validation improvement before lr × 0.1
  t.early_stop_patience = 10  # ...and before stopping
  t.checkpoint_every_steps = 500
  t.log_every_steps = 25
  return c
