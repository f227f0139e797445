#!/usr/bin/env bash
# Train or evaluate on a Cloud TPU VM pod slice (e.g. v4-32: 4 workers × 4 chips): run
# this same command on every worker at once, one jaxad process per worker.
#
# Expects, on every worker: this repository at the same path, with .venv holding jaxad
# and the TPU extra (`.venv/bin/pip install -e ".[tpu]"`), or PYTHON naming another
# interpreter that has them; the data at the same path; and a --workdir that all workers
# share (a Filestore/NFS mount or a gcsfuse-mounted bucket): every worker writes its
# checkpoint shards there and reads config.json back. JAX reads the workers, the
# coordinator and this worker's id from the TPU VM metadata: no flags are needed. A
# single-host TPU VM (v4-8) works too. Relative paths are taken from the repository root.
# Usage (from your machine; --worker=all runs it on every worker of the slice):
#   gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command \
#     "cd ~/jaxad && launch/tpu_vm.sh train --config=configs/oct_vae.py \
#      --workdir=/mnt/shared/oct --config.data.path=/mnt/shared/OCT2017"
#   ... --command "cd ~/jaxad && launch/tpu_vm.sh evaluate --workdir=/mnt/shared/oct"
# Every worker must start (a pod slice runs only when all its workers take part); worker
# 0's output is the log, the others print only warnings and errors. A run outlives a
# dropped ssh session when started as `nohup launch/tpu_vm.sh ... > jaxad.out 2>&1 &`.
# train.batch_size is the global batch: it must divide over every chip of the slice.
set -euo pipefail
usage="usage: launch/tpu_vm.sh train|evaluate [--flag=value ...]"
binary=${1:?$usage}
shift
case $binary in
  train | evaluate) ;;
  *) echo "$usage (got '$binary')" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
exec "${PYTHON:-.venv/bin/python}" -m "jaxad.$binary" "$@"
