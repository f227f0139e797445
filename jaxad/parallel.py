"""Data parallelism: one device mesh, batches sharded on their leading axis, state replicated.

`jax.jit` inserts the collectives: a train step written for one device computes the
same global-batch mean (and global BatchNorm statistics) on 8 devices or a pod. Each
process feeds only its own slice of the global batch; `jax.make_array_from_process_local_data`
assembles the global array.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxad.errors import ConfigError

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh over every device of every process (or the given devices)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def local_batch_size(global_batch: int, mesh: Mesh) -> int:
  """This process's share of the global batch; checks divisibility first."""
  num_devices = mesh.devices.size
  if global_batch % num_devices:
    raise ConfigError(
        f"train.batch_size={global_batch} is not divisible by the {num_devices} devices "
        f"in use: set --config.train.batch_size to a multiple of {num_devices}.")
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
