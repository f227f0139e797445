"""Trains a model: `python -m jaxad.train --config=configs/X.py --workdir=DIR`.

Override any config value with `--config.a.b=value` (the config is locked, so a
mistyped key fails). Running the same command again resumes from the latest
checkpoint in DIR. Multi-process (GPU cluster, TPU pod): run the same command in every
process, adding `--coordinator_address`, `--num_processes`, `--process_id` where the
cluster does not provide them (see launch/); DIR must be one folder all processes see.
"""

from absl import flags
from ml_collections import config_flags

from jaxad import cli, parallel

flags.DEFINE_string("workdir", None, "Folder for checkpoints, logs, events and config.json.")
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                lock_config=True)
parallel.define_flags()
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  cli.check_no_args(argv)
  from jaxad import trainer
  with cli.session():
    _, summary = trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  if not parallel.is_main_process():
    return
  print(" ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}"
                 for k, v in sorted(summary.items())))


if __name__ == "__main__":
  cli.run(main)
