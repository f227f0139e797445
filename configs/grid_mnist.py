"""The TU/e thesis MNIST protocol (digits 0–8 normal, 9 anomalous) as a robustness grid,
with a decoder whose likelihood is the image's bits.

configs/mnist_vae.py's conv VAE (32×32, widths 32-64-128) with the discretised
logistic decoder at 8 bits (`model.likelihood=discretized_logistic`, β = 1: the ELBO),
MNIST's 28×28 enlarged to 32×32 by nearest neighbour (`data.resize=nearest`, so every
value stays one of the 256 stored levels and −ELBO bounds the image's bits), trained
for every combination of

  latent_dim  (2, 8, 32)   shape axis: one group each (Tonnaer 2021: latent 2 best)
  beta        (0.5, 1.0)   the KL weight (1 = the ELBO)
  seed        (0, 1, 2)    the runs behind the min/max bands

β and seed are vmapped (6 members per compiled step); the latent sizes make 3 groups.
Every member gets every sample score of the eval binary, the complexity-corrected ones
included (`vae_complexity` = bpd − JPEG XL bpd, in agreeing units now).

  python -m jaxad.data.prepare --dataset=mnist --src=MNIST_DIR --out=mnist.npz
  python -m jaxad.grid --config=configs/grid_mnist.py --workdir=workdirs/grid_mnist \
      --config.data.path=mnist.npz

One member alone, with the same numbers (latent 2, β = 1, seed 1):

  python -m jaxad.train --config=configs/grid_mnist.py --workdir=DIR/member \
      --config.model.latent_dim=2 --config.model.beta=1.0 --config.seed=1

6 epochs of 48.6k normal images per member (the single-model config trains 20). On 2
CPU cores one group of 3 members takes about 6 minutes (β = 1 only,
`--config.grid.axes.beta='(1.0,)'`, as the README's table was run); an accelerator
runs the whole grid in minutes. The README gives the measured table.
"""

import os

import ml_collections

from jaxad.grid import axes as grid_axes


def get_config():
  base = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mnist_vae.py")
  c = grid_axes.with_grid(grid_axes.load_experiment(base))
  c.data.resize = "nearest"  # 28 → 32 keeps the 8-bit levels: −ELBO is the image's bits
  c.model.likelihood = "discretized_logistic"
  c.model.likelihood_mixtures = 1
  c.model.beta = 1.0
  c.train.num_epochs = 6
  c.train.log_every_steps = 200
  c.eval.bootstrap = 0  # grids report AUROC/AUPRC per member; bands come from seeds
  c.grid.axes = ml_collections.ConfigDict({
      "latent_dim": (2, 8, 32),
      "beta": (0.5, 1.0),
      "seed": (0, 1, 2),
  })
  return c
