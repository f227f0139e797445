"""SANO (Gonzalez-Jimenez et al., 2023): score-based anomaly localization on hands.

A VP-SDE score model (DDPM ε-prediction U-Net, discrete 1000-step schedule 1e-4..0.02)
trained by denoising score matching on hands without jewelry, 256×256 RGB, batch 64,
Adam 2e-4. Evaluation: one forward pass of the EMA model on the clean image at
t = 1e-3, |score| averaged over colour channels, gaussian filter σ = 2, anomalous where
the map exceeds 3 standard deviations of the healthy validation maps; pixel AUROC/AUPRC,
Dice/IoU at the 3σ and PR operating points, bootstrap (50 resamples).

Data: the 11k Hands images (Afifi 2019) with the jewelry masks, as an image folder:

  ROOT/train/normal/*.jpg          hands without accessories
  ROOT/val/normal/*.jpg            (healthy maps for the 3σ threshold)
  ROOT/test/normal/*.jpg, ROOT/test/jewelry/*.jpg
  ROOT/test/masks/jewelry/<same stem>.png   binary jewelry masks

For the bootstrap stratified by individual, use the CSV source on HandInfo.csv
instead: --config.data.source=csv --config.data.path=ROOT/HandInfo_{split}.csv
--config.data.id_column=imageName --config.data.label_column=accessories
--config.data.group_column=id --config.data.mask_dir=ROOT/masks
--config.data.normal_classes=0.

  python -m jaxad.train --config=configs/sano_hands.py --workdir=workdirs/sano_hands \
      --config.data.path=/data/11k_hands
  python -m jaxad.evaluate --workdir=workdirs/sano_hands

The U-Net is DDPM's 256×256 network (base 128, multipliers 1,1,2,2,4,4, attention at
16×16) with score_sde's optimisation details (warm-up 5000 steps, gradient clipping at
1, EMA 0.9999); the paper does not state the number of steps: we train 100k. Needs an
accelerator (about 2 TFLOP per training image).
"""

from jaxad import defaults


def get_config():
  c = defaults.get_config()
  d = c.data
  d.source = "folder"
  d.path = ""  # set --config.data.path=ROOT
  d.normal_classes = ("normal",)
  d.image_size = 256
  d.channels = 3
  m = c.model
  m.family = "score"
  m.name = "unet"
  m.unet.base_width = 128
  m.unet.channel_mult = (1, 1, 2, 2, 4, 4)
  m.unet.num_res_blocks = 2
  m.unet.attention_resolutions = (16,)
  m.unet.dropout = 0.0
  m.sde.discrete = True  # DDPM: 1000 steps, β from 1e-4 to 0.02
  m.sde.num_scales = 1000
  t = c.train
  t.batch_size = 64
  t.learning_rate = 2e-4
  t.num_steps = 100_000
  t.warmup_steps = 5000
  t.grad_clip = 1.0
  t.ema_rate = 0.9999
  t.checkpoint_every_steps = 5000
  t.log_every_steps = 100
  e = c.eval
  e.batch_size = 32
  e.sano.t = 1e-3
  e.sano.smooth_sigma = 2.0
  e.n_sigma = 3.0
  e.bootstrap = 50
  return c
