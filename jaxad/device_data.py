"""Training images kept on the devices (data.on_device): no host pipeline per step.

Most sets jaxad trains on (MedMNIST at 28–224 px, 3D nodules, digits, a few tens of
thousands of OCT slices) fit in a small share of one accelerator's memory, yet a
streamed pipeline sends every batch from the host every step. Here the normal training
images are preprocessed once, by the pipeline's own map (so pixels are bit-identical to
the streamed batches), and placed on the devices sharded along the example axis (each
process loads and places its block of rows). Each step then receives only its global
batch's row numbers (B int32) and gathers the images inside the compiled step; XLA
turns the gather of a sharded array into a masked local gather and one all-reduce of
the batch. Batches follow `pipeline.epoch_order`, so a seed gives the same batches as
the streamed path, from any start step.

`data.on_device`: "true", "false", or "auto" (the default), which keeps the images on
the devices when the train and validation sets take at most data.on_device_fraction of
one device's memory (on the CPU, of the host's memory shared by its devices) on every
process.
"""

import dataclasses
import logging
import math
import os
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxad import parallel
from jaxad.data import pipeline
from jaxad.errors import ConfigError

log = logging.getLogger("jaxad")
CHOICES = ("auto", "true", "false")


@dataclasses.dataclass(frozen=True)
class DeviceImages:
  """A split's normal images on the devices and where each source example lies."""
  images: jax.Array  # (rows, *shape) float32, sharded along rows
  row_of: np.ndarray  # source index -> row (-1: not a normal image)


def _device_memory(mesh) -> int:
  """Bytes one device of the mesh may hold (the host's memory split over its CPUs)."""
  device = next(d for d in mesh.devices.flat if d.process_index == jax.process_index())
  stats = device.memory_stats() or {}
  if stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  return host // max(1, jax.local_device_count())


def _padded_rows(n: int, mesh) -> int:
  return -(-max(n, 1) // mesh.devices.size) * mesh.devices.size


def bytes_per_device(splits, data, mesh) -> int:
  """What keeping the normal images of `splits` on the devices costs each device."""
  total = 0
  for split in splits:
    if split is not None:
      shape = pipeline.output_shape(data, split.source.spatial_ndim)
      total += _padded_rows(len(split.normal_indices), mesh) * math.prod(shape) * 4
  return total // mesh.devices.size


def wanted(data, splits, mesh) -> bool:
  """Whether data.on_device keeps these splits on the devices ("auto": if they fit)."""
  choice = str(data.on_device).lower()
  if choice not in CHOICES:
    raise ConfigError(f"data.on_device={data.on_device!r} is not one of {list(CHOICES)}")
  if choice != "auto":
    return choice == "true"
  need, limit = bytes_per_device(splits, data, mesh), _device_memory(mesh)
  fits = need <= float(data.on_device_fraction) * limit
  if jax.process_count() > 1:  # every process must take the same path
    fits = bool(np.all(multihost_utils.process_allgather(np.asarray(fits))))
  return fits


def place(split: pipeline.Split, data, mesh) -> DeviceImages:
  """The split's normal images, preprocessed once, sharded over the mesh's devices."""
  normal = split.normal_indices
  rows = _padded_rows(len(normal), mesh)
  source_rows = np.concatenate([normal, np.full(rows - len(normal), normal[0])])
  per_process = rows // jax.process_count()
  mine = source_rows[jax.process_index() * per_process:][:per_process]
  local = pipeline.preprocessed_images(split, data, mine)
  shape = (rows, *local.shape[1:])
  images = jax.make_array_from_process_local_data(parallel.batch_sharded(mesh), local, shape)
  row_of = np.full(len(split.source), -1, np.int64)
  row_of[normal] = np.arange(len(normal))
  log.info("data.on_device: %d images of %s on the devices (%.1f MiB per device)",
           len(normal), split.source.name, images.nbytes / mesh.devices.size / 2**20)
  return DeviceImages(images, row_of)


def batch_rows(split: pipeline.Split, resident: DeviceImages, *, seed: int,
               global_batch: int, start_step: int = 0) -> Iterator[np.ndarray]:
  """Each step's global batch as rows of `resident.images`, in `train_batches`' order."""
  steps = pipeline.steps_per_epoch(split, global_batch)
  epoch, skip = divmod(start_step, steps)
  while True:
    order = pipeline.epoch_order(split, seed, epoch, global_batch)
    yield from resident.row_of[order[skip:]].astype(np.int32)
    epoch, skip = epoch + 1, 0


def gather(images: jax.Array, rows: jax.Array, mesh) -> jax.Array:
  """images[rows], sharded as a streamed batch is (inside a jitted step)."""
  return jax.lax.with_sharding_constraint(jnp.take(images, rows, axis=0),
                                          parallel.batch_sharded(mesh))
