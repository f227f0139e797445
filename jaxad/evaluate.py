"""Evaluates a trained workdir: `python -m jaxad.evaluate --workdir=DIR [--split=test]`.

Loads DIR/config.json and the latest checkpoint, computes every sample-wise score and,
when masks or synthetic lesions exist, every pixel map; writes DIR/eval/<split>/scores.csv
and .npz, DIR/eval/metrics.json and DIR/eval/report.html, and prints the headline table.
Any config value can be overridden (`--config.eval.num_samples=100`,
`--config.data.synthetic_lesions.enabled=True`). `--input=PATH` scores an unlabelled
image folder or .npz instead (batch scoring, flat memory). Multi-process: run the same
command in every process (with `--coordinator_address`, `--num_processes`,
`--process_id` where the cluster does not provide them); each scores its shard of every
batch and process 0 writes the files.
"""

import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from jaxad import parallel

flags.DEFINE_string("workdir", None, "A training workdir (holds config.json and checkpoints/).")
flags.DEFINE_string("split", "test", "Which split to evaluate: train, val or test.")
flags.DEFINE_string("input", None, "Score the unlabelled images in this folder or .npz instead.")
parallel.define_flags()
FLAGS = flags.FLAGS


def _workdir_from_argv(argv) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith("--workdir="):
      return arg.split("=", 1)[1]
    if arg == "--workdir" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _define_config_flag(argv) -> None:
  """`--config.*` overrides apply to the workdir's own config, so load it first."""
  from jaxad import evaluation
  from jaxad.errors import CheckpointError
  workdir = _workdir_from_argv(argv)
  if workdir is None:
    sys.exit("error: --workdir is required (a folder made by python -m jaxad.train)")
  try:
    config = evaluation.load_config(workdir)
  except CheckpointError as e:
    sys.exit(f"error: {e}")
  config_flags.DEFINE_config_dict("config", config, lock_config=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from jaxad import evaluation
  from jaxad.errors import CheckpointError, ConfigError, DataError
  absl_logging.set_verbosity(absl_logging.WARNING)
  try:
    parallel.initialize_from_flags()
    result = evaluation.evaluate(FLAGS.workdir, split=FLAGS.split, input_path=FLAGS.input,
                                 config=FLAGS.config)
  except (ConfigError, DataError, CheckpointError) as e:
    sys.exit(f"error: {e}")
  if not parallel.is_main_process():
    return
  print(evaluation.headline_table(result))
  print(f"results in {os.path.join(FLAGS.workdir, 'eval')}")


if __name__ == "__main__":
  _define_config_flag(sys.argv)
  app.run(main)
