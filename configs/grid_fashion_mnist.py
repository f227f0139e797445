"""Zimmerer et al.'s robustness study on FashionMNIST: 1200 VAEs, 6 groups of 200.

The fully connected VAE of configs/fashion_mnist_mlp.py (3×400, ReLU, Gaussian decoder,
Adam 1e-4, ×0.1 on a validation plateau, early stopping after 3 epochs) trained for
every combination of

  c               (0.1, 1, 10, 25)   decoder variance σ² (β = 2c; jaxad's pixels are in
                                     [-1, 1], so c here is 4× the same σ² on [0, 1])
  left_out_class  0..9               the anomaly; the other nine classes are normal
  seed            0..4               the runs behind the min/max bands
  latent_dim      (2, 20, 128)       shape axis: one group each
  image_size      (28, 56)           shape axis (the MLP's input grows with it)

c, class and seed are vmapped (200 members per compiled step); latent size × image
size make 6 groups run one after another. Sample-wise: the six vae/iwae scores of the
left-out class against the rest (the paper's reconstruction, KL and ELBO scores are
vae_rec, vae_kl and vae); pixel-wise: the five maps on synthetic lesions inserted into
normal test images (FashionMNIST has no masks).

  python -m jaxad.grid --config=configs/grid_fashion_mnist.py --workdir=workdirs/grid_fmnist

One member alone (same numbers), e.g. c = 10, class 3, seed 2, latent 20, 28×28:

  python -m jaxad.train --config=configs/fashion_mnist_mlp.py --workdir=DIR/member \
      --config.model.beta=20 --config.data.anomalous_classes='(3,)' --config.seed=2

Needs tensorflow-datasets' fashion_mnist prepared (data.data_dir) and an accelerator:
about 1.3M parameters per 28×28 member, so a group holds ~200× that with Adam's state
(~3 GB at 28×28, ~9 GB at 56×56 with 128 latents); lower grid.max_members to split
groups on smaller devices. Runtime is not measured yet (an estimate: each group does
up to 100 epochs × 843 steps of 200 × 64 images, early stopping usually ends it far
sooner); a smaller study, e.g. --config.grid.axes.latent_dim='(20,)'
--config.grid.axes.image_size='(28,)', is one group. The paper reports the KL and
ELBO scores more robust than reconstruction across c and latent size; expect the
left-out class to dominate the spread.
"""

import os

import ml_collections

from jaxad.grid import axes as grid_axes


def get_config():
  base = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fashion_mnist_mlp.py")
  c = grid_axes.with_grid(grid_axes.load_experiment(base))
  c.data.synthetic_lesions.enabled = True  # pixel-wise scores (the maps' AUROC)
  c.eval.bootstrap = 0  # grids report AUROC/AUPRC per member; bands come from seeds
  c.grid.axes = ml_collections.ConfigDict({
      "c": (0.1, 1.0, 10.0, 25.0),
      "left_out_class": tuple(range(10)),
      "seed": (0, 1, 2, 3, 4),
      "latent_dim": (2, 20, 128),
      "image_size": (28, 56),
  })
  return c
