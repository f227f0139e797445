"""Data parallelism: one device mesh, batches sharded on their leading axis, state replicated.

`jax.jit` inserts the collectives: a train step written for one device computes the
same global-batch mean (and global BatchNorm statistics) on 8 devices or a pod. Each
process feeds only its own slice of the global batch; `jax.make_array_from_process_local_data`
assembles the global array.

Multi-process runs (a GPU cluster, a TPU pod slice, N CPU processes for testing) use
JAX's own runtime: `initialize` calls `jax.distributed.initialize` with the
`--coordinator_address`, `--num_processes`, `--process_id` flags, or lets JAX read them
from the cluster environment (Cloud TPU, SLURM, Open MPI). The mesh groups devices by
process, so process p's slice of every global batch is the p-th contiguous block of rows,
as `data.pipeline` cuts it, and `allgather` returns rows in the same order.
"""

import collections
import logging
import socket
import time
from collections.abc import Iterator

import jax
import numpy as np
from absl import flags
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxad.errors import ConfigError

DATA_AXIS = "data"
log = logging.getLogger("jaxad")


def define_flags() -> None:
  """Adds the multi-process flags to an absl binary (train, evaluate)."""
  flags.DEFINE_string(
      "coordinator_address", None,
      "host:port of process 0, which every process connects to (multi-process runs). "
      "Leave unset on Cloud TPU and under SLURM: JAX reads it from the environment.")
  flags.DEFINE_integer("num_processes", None, "How many processes take part.")
  flags.DEFINE_integer("process_id", None, "This process's id, 0 .. num_processes-1.")


def initialize_from_flags() -> bool:
  """`initialize` with the values of the flags `define_flags` added."""
  f = flags.FLAGS
  return initialize(f.coordinator_address, f.num_processes, f.process_id)


# jax.distributed's cluster detectors that jaxad trusts to start a multi-process run
# unasked (not Kubernetes: a CI pod is not a training job).
AUTO_CLUSTERS = ("gcetpu", "gketpu", "slurm", "ompi")


def cluster_environment() -> tuple[str, int] | None:
  """(name, process count) of the cluster JAX can configure itself from, or None.

  Uses jax.distributed's own detection (Cloud TPU VMs, SLURM, Open MPI), which JAX
  exposes only through `initialize()`, so this reads its private registry.
  """
  try:
    from jax._src import clusters
    envs = [e for e in clusters.ClusterEnv._cluster_types if e.name in AUTO_CLUSTERS]
  except (ImportError, AttributeError) as e:  # JAX moved its cluster registry
    log.warning("cannot auto-detect a cluster with this JAX version (%s): pass "
                "--coordinator_address, --num_processes and --process_id", e)
    return None
  for env in envs:
    if env.is_env_present():
      return env.name, int(env.get_process_count())
  return None


def _check_flags(address, num_processes, process_id) -> None:
  if num_processes is not None and num_processes < 1:
    raise ConfigError(f"--num_processes={num_processes}: give the number of processes "
                      "taking part (1 or more)")
  if process_id is not None and (process_id < 0 or (
      num_processes is not None and process_id >= num_processes)):
    n = "N" if num_processes is None else num_processes
    raise ConfigError(
        f"--process_id={process_id} is out of range for --num_processes={n}: "
        f"give each process a distinct id in 0..{n} - 1")
  if address is not None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
      raise ConfigError(f"--coordinator_address={address!r} is not host:port: give the "
                        "address of process 0's machine and a free port, e.g. "
                        "10.0.0.1:1234")


def _wait_for_coordinator(address: str, process_id: int, timeout_s: float) -> None:
  """Waits until process 0's coordinator accepts connections, or fails saying what to check.

  JAX itself aborts the process (a C++ fatal error, no Python exception) when a worker
  cannot reach the coordinator, so workers look first.
  """
  host, _, port = address.rpartition(":")
  host = host.strip("[]")
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      socket.create_connection((host, int(port)), timeout=5).close()
      return
    except socket.gaierror as e:
      raise ConfigError(f"--coordinator_address={address}: cannot resolve {host!r} ({e}): "
                        "give process 0's hostname or IP address as this machine sees it")
    except OSError as e:
      if time.monotonic() > deadline:
        raise ConfigError(
            f"process {process_id}: nothing accepted connections at --coordinator_address="
            f"{address} within {timeout_s:g}s ({e}). Check that process 0 is running "
            f"with the same --coordinator_address, that {host} reaches process 0's "
            "machine from here (on several machines give its hostname or IP address, "
            f"not localhost), and that port {port} is open between the machines.") from None
      time.sleep(0.25)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, timeout_s: int = 300) -> bool:
  """Joins JAX's multi-process runtime when flags or the cluster environment ask for it.

  Explicit values win; JAX fills unset ones from a detected cluster. A single process
  with no flags does nothing. Returns whether this run is multi-process. Must run
  before anything touches a JAX device; every process blocks until all have joined
  (or `timeout_s` passes).
  """
  given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
           "process_id": process_id}
  _check_flags(coordinator_address, num_processes, process_id)
  env = None if None not in given.values() else cluster_environment()
  if all(v is None for v in given.values()) and (env is None or env[1] <= 1):
    return False
  if jax.distributed.is_initialized():
    return True
  missing = [f"--{k}" for k, v in given.items() if v is None]
  if env is None and missing:
    raise ConfigError(
        f"{', '.join(missing)} not set and no cluster environment (Cloud TPU, SLURM, Open "
        "MPI) detected: a multi-process run outside those needs all three of "
        "--coordinator_address, --num_processes and --process_id")
  if jax.config.jax_cpu_collectives_implementation is None:  # CPU processes need it
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  where = f"from the {env[0]} environment" if env else "from the flags"
  if coordinator_address is not None and process_id:
    _wait_for_coordinator(coordinator_address, process_id, timeout_s)
  try:
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               initialization_timeout=timeout_s)
  except (RuntimeError, ValueError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "must be called before" in str(e):
      raise ConfigError("jax.distributed.initialize must run before any JAX computation: "
                        "call jaxad.parallel.initialize first thing in the program"
                        ) from None
    if process_id == 0:
      raise ConfigError(
          f"process 0 could not start the coordinator at {coordinator_address} "
          f"({first[:300]}): the port may be in use (choose another free port in "
          "--coordinator_address for every process) or the address is not this "
          "machine's") from None
    raise ConfigError(
        f"could not join the multi-process run (coordinator {coordinator_address or '?'}, "
        f"process {process_id if process_id is not None else '?'} of "
        f"{num_processes or '?'}, {where}) within {timeout_s}s: {first[:300]}. Check "
        "that process 0 is running, that every process got the same "
        "--coordinator_address and --num_processes and a distinct --process_id, and that "
        "the coordinator's port is reachable from this machine.") from None
  if jax.process_index() == 0:
    log.info("joined %d processes (%s) with %d devices in all", jax.process_count(), where,
             jax.device_count())
  return True


def is_main_process() -> bool:
  """True on the process that writes files, logs and progress bars (process 0)."""
  return jax.process_index() == 0


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh over every device of every process (or the given devices).

  Devices are grouped by process (stable within one), so each process's shard of a
  global batch is one contiguous block of rows, in process order.
  """
  devices = jax.devices() if devices is None else list(devices)
  devices = sorted(devices, key=lambda d: d.process_index)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def local_batch_size(global_batch: int, mesh: Mesh, key: str = "train.batch_size") -> int:
  """This process's share of the global batch; checks divisibility first (the error
  names `key`, the config entry the batch size came from)."""
  num_devices = mesh.devices.size
  if global_batch % num_devices:
    raise ConfigError(
        f"{key}={global_batch} is not divisible by the {num_devices} devices "
        f"in use: set --config.{key} to a multiple of {num_devices}.")
  return global_batch // jax.process_count()


def put_replicated(tree, mesh: Mesh):
  """Places a pytree on every device of the mesh (parameters, optimiser state)."""
  return jax.device_put(tree, replicated(mesh))


def put_batch(local_batch, mesh: Mesh):
  """Assembles global arrays, sharded on the leading axis, from per-process numpy batches."""
  sharding = batch_sharded(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      local_batch)


def prefetch_to_device(batches: Iterator, mesh: Mesh, depth: int = 2,
                       put=None) -> Iterator:
  """`put_batch` (or `put`) of each item of `batches`, `depth` items ahead: the
  host→device copy of the next batches runs while the current step computes (depth 0:
  no look-ahead)."""
  put = put or (lambda batch: put_batch(batch, mesh))
  queue = collections.deque()
  for batch in batches:
    queue.append(put(batch))  # asynchronous: returns before the copy ends
    if len(queue) > depth:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def allgather(tree):
  """Every process's data as numpy, on every process (a collective: all must call it).

  A global `jax.Array` (the output of a jitted function over the mesh) comes back whole.
  A process-local array (numpy) is taken as this process's slice of a global batch: the
  slices (same shape on every process) are concatenated in process order, the row order
  of `put_batch`'s global arrays. One process: a copy to host.
  """
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)
