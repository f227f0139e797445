#!/usr/bin/env bash
# Train one experiment on every accelerator of this machine (1 GPU, a node of 8, or CPU).
#
# Expects: jaxad installed in ./.venv (`make install`; for GPUs also
# `.venv/bin/pip install -e ".[cuda]"`), and a config in configs/.
# Usage:   launch/single_host.sh configs/oct_vae.py workdirs/oct --config.data.path=/data/OCT2017
# Re-running the same command resumes from the latest checkpoint in the workdir.
# train.batch_size is the global batch: it must divide evenly over the devices.
set -euo pipefail
config=${1:?usage: launch/single_host.sh CONFIG WORKDIR [--config.key=value ...]}
workdir=${2:?usage: launch/single_host.sh CONFIG WORKDIR [--config.key=value ...]}
shift 2
cd "$(dirname "$0")/.."
# Let JAX take GPU memory as it needs it rather than 75% up front (tf.data shares the host).
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
exec .venv/bin/python -m jaxad.train --config="$config" --workdir="$workdir" "$@"
