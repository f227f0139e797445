#!/usr/bin/env bash
# Train or evaluate as N processes on this machine, each with its own CPU device(s),
# joined by JAX's multi-process runtime (gloo collectives): a multi-host run in
# miniature, to test multi-process code without a cluster.
#
# Expects: jaxad installed in ./.venv (`make install`), or PYTHON naming another
# interpreter that has it; a free TCP port on localhost (PORT, default: one the OS hands
# out). Each process gets DEVICES_PER_PROCESS CPU devices (default 1), so
# train.batch_size and eval.batch_size must divide by N × DEVICES_PER_PROCESS.
# Relative paths are taken from the repository root.
# Usage:   launch/local_multiprocess.sh 2 train --config=configs/digits_vae.py --workdir=workdirs/mp
#          launch/local_multiprocess.sh 2 evaluate --workdir=workdirs/mp
# Process 0 logs, shows progress and writes the files; if any process fails, the
# others are stopped and the script exits with its status.
set -euo pipefail
usage="usage: launch/local_multiprocess.sh N train|evaluate [--flag=value ...]"
n=${1:?$usage}
binary=${2:?$usage}
shift 2
if ! [[ $n =~ ^[1-9][0-9]*$ ]]; then
  echo "$usage: N must be a positive number of processes (got '$n')" >&2; exit 2
fi
case $binary in
  train | evaluate) ;;
  *) echo "$usage (got '$binary')" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
port=${PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')}
export JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES=${DEVICES_PER_PROCESS:-1}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}

pids=()
stop_all() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap stop_all EXIT
trap 'exit 130' INT TERM
for ((i = 0; i < n; i++)); do
  "$python" -m "jaxad.$binary" "$@" --coordinator_address="localhost:$port" \
      --num_processes="$n" --process_id="$i" &
  pids+=("$!")
done
for ((i = 0; i < n; i++)); do
  status=0
  wait -n || status=$?
  if ((status != 0)); then
    echo "local_multiprocess.sh: a process exited with status $status; stopping the others" >&2
    exit "$status"
  fi
done
