"""SANO on scikit-learn's digits: a small score model that trains on a CPU in minutes.

The method of configs/sano_hands.py (VP-SDE, discrete 1000-step schedule, DSM, EMA,
map = smoothed channel mean of |score| at t = 1e-3, threshold at 3σ of healthy maps) on
digits 0–8 upsampled to 16×16. Pixel-wise evaluation inserts synthetic lesions (with
masks) into the healthy test digits; the sample-wise scores rank lesion images.

  python -m jaxad.train --config=configs/sano_digits.py --workdir=workdirs/sano_digits
  python -m jaxad.evaluate --workdir=workdirs/sano_digits
"""

from jaxad import defaults


def get_config():
  c = defaults.get_config()
  d = c.data
  d.source = "digits"
  d.anomalous_classes = (9,)
  d.image_size = 16
  d.channels = 1
  d.synthetic_lesions.enabled = True
  m = c.model
  m.family = "score"
  m.name = "unet"
  m.unet.base_width = 16
  m.unet.channel_mult = (1, 2, 2)
  m.unet.num_res_blocks = 1
  m.unet.attention_resolutions = (4,)
  m.unet.groups = 8
  m.sde.discrete = True
  t = c.train
  t.batch_size = 64
  t.learning_rate = 2e-4
  t.num_steps = 1500
  t.warmup_steps = 100
  t.grad_clip = 1.0
  t.ema_rate = 0.995
  t.checkpoint_every_steps = 500
  t.log_every_steps = 50
  c.eval.batch_size = 64
  return c
