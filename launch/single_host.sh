#!/usr/bin/env bash
# Train or evaluate on every accelerator of this machine (1 GPU, a node of 8, or the CPU),
# as one process. Several machines: launch/slurm_gpu.sbatch, launch/tpu_vm.sh.
#
# Expects: jaxad installed in ./.venv (`make install`; for GPUs also
# `.venv/bin/pip install -e ".[cuda]"`), or PYTHON naming another interpreter that has it,
# and a config in configs/. Relative paths are taken from the repository root.
# Usage:   launch/single_host.sh train --config=configs/oct_vae.py --workdir=workdirs/oct \
#              --config.data.path=/data/OCT2017
#          launch/single_host.sh evaluate --workdir=workdirs/oct
# Re-running the same train command resumes from the latest checkpoint in the workdir.
# train.batch_size is the global batch: it must divide evenly over the devices.
set -euo pipefail
usage="usage: launch/single_host.sh train|evaluate [--flag=value ...]"
binary=${1:?$usage}
shift
case $binary in
  train | evaluate) ;;
  *) echo "$usage (got '$binary')" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
# Let JAX take GPU memory as it needs it rather than 75% up front (tf.data shares the host).
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
exec "${PYTHON:-.venv/bin/python}" -m "jaxad.$binary" "$@"
