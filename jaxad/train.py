"""Trains a model: `python -m jaxad.train --config=configs/X.py --workdir=DIR`.

Override any config value with `--config.a.b=value` (the config is locked, so a
mistyped key fails). Running the same command again resumes from the latest
checkpoint in DIR. Multi-process (GPU cluster, TPU pod): run the same command in every
process, adding `--coordinator_address`, `--num_processes`, `--process_id` where the
cluster does not provide them (see launch/); DIR must be one folder all processes see.
"""

import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from jaxad import parallel

flags.DEFINE_string("workdir", None, "Folder for checkpoints, logs, events and config.json.")
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                lock_config=True)
parallel.define_flags()
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from tqdm.contrib.logging import logging_redirect_tqdm

  from jaxad import trainer
  from jaxad.errors import CheckpointError, ConfigError, DataError
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax's per-save chatter
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter("%(message)s"))
  logger = logging.getLogger("jaxad")
  logger.addHandler(handler)
  logger.propagate = False  # absl's root handler would print every line twice
  logger.setLevel(logging.INFO)
  try:
    parallel.initialize_from_flags()
    if not parallel.is_main_process():
      logger.setLevel(logging.WARNING)  # progress is logged by process 0 only
    with logging_redirect_tqdm([logging.getLogger("jaxad")]):
      _, summary = trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (ConfigError, DataError, CheckpointError) as e:
    sys.exit(f"error: {e}")
  if not parallel.is_main_process():
    return
  print(" ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}"
                 for k, v in sorted(summary.items())))


if __name__ == "__main__":
  app.run(main)
