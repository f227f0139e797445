"""`python -m jaxad.grid --config=configs/grid_X.py --workdir=DIR`: runs (or resumes) a grid."""

import os

from absl import flags
from ml_collections import config_flags

from jaxad import cli

flags.DEFINE_string("workdir", None, "Folder for the grid's results and checkpoints.")
config_flags.DEFINE_config_file("config", None, "Grid config file (configs/grid_*.py).",
                                lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  cli.check_no_args(argv)
  from jaxad.grid import run
  with cli.session():
    results = run.run_grid(FLAGS.config, FLAGS.workdir)
  print(run.headline_table(results))
  print(f"{results['num_rows']} rows in {os.path.join(FLAGS.workdir, 'grid.csv')}; "
        f"figures in {os.path.join(FLAGS.workdir, 'grid.html')}")


if __name__ == "__main__":
  cli.run(main)
