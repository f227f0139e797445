"""Hyperparameter robustness grids (Zimmerer et al.): many VAEs in one compiled program.

    python -m jaxad.grid --config=configs/grid_digits.py --workdir=workdirs/grid_digits
    python -m jaxad.grid --config=configs/grid_fashion_mnist.py --workdir=DIR \\
        --config.grid.axes.seed='(0, 1)'

The config is an experiment config plus `grid.axes` (see jaxad.grid.axes): axes that
keep array shapes (seed, c/β, learning rate, left-out class) are vmapped, so a group's
K members train in one jitted step on their own data streams (jaxad.grid.train); axes
that change shapes (latent size, image size, architecture) make groups that run one
after another. Every member is then scored with every sample-wise score (with the
complexity-corrected ones under eval.complexity), and every pixel map when the data has
masks or synthetic lesions (jaxad.grid.evaluate); jaxad.grid.report writes the tables
and figures, jaxad.grid.run the whole run, jaxad.grid.data the members' data. With background.enabled, each group's
background models (Ren et al.'s likelihood ratio, jaxad.background) train after it as
a second vmapped group, and every member gets its `<score>_llr`.

The workdir:

  DIR/grid.csv             one row per member and score: axis values, AUROC, AUPRC
  DIR/grid.json            config, axes, every member's training summary and metrics
  DIR/figures/*.png        AUROC per score against each axis, mean with min/max band
  DIR/grid.html            the figures and a table of mean AUROC per group
  DIR/groups/<g>.json      a finished group's results (written atomically)
  DIR/groups/<g>/checkpoints/  the running group's stacked state
  DIR/plan.json, grid.log  the plan the workdir holds; the log

Running the same command again resumes: finished groups are read back, the running
group restarts from its latest checkpoint and ends bit-identical to an uninterrupted run.
"""
