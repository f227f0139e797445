"""A grid group's data: each split preprocessed once, and each member's view of it.

The pixels are the pipeline's own (bit-identical to what the trainer and the eval binary
read); members differ only in which classes are normal and in their batch order
(`Streams`, the trainer's `epoch_order` per member), so the arrays are shared.
"""

import dataclasses
import json
from typing import Any

import numpy as np

from jaxad import config as config_lib
from jaxad import state as state_lib
from jaxad.data import pipeline
from jaxad.errors import DataError
from jaxad.grid.axes import Group
from jaxad.scores import complexity, complexity_cache


def preprocess(split: pipeline.Split, data, batch: int = 256) -> dict[str, np.ndarray]:
  """Every example of a split through the pipeline's preprocessing: image (N, ...),
  label (N,) and mask (N, ..., 1) when the source has masks."""
  parts = {}
  for b in pipeline.eval_batches(split, data, global_batch=batch):
    valid = b["valid"] > 0
    for k in ("image", "label", "mask"):
      if k in b:
        parts.setdefault(k, []).append(b[k][valid])
  return {k: np.concatenate(v) for k, v in parts.items()}


def member_split(base: pipeline.Split, data, role: str) -> pipeline.Split:
  """The split of `base`'s source with one member's normal classes."""
  split = pipeline.Split(base.source, pipeline.normal_labels(base.source, data))
  if role != "test" and not len(split.normal_indices):
    raise DataError(f"the {role} split of {base.source.name} has no image of the normal "
                    f"classes {list(split.normal_labels)}: check the grid's class axis")
  return split


class Streams:
  """Each member's global batch of example indices at a step, as `train_batches` yields.

  Member k at step s reads row s mod S_k of `epoch_order(split_k, seed_k, s // S_k, B)`,
  S_k its steps per epoch. Members with the same seed and normal classes share orders.
  """

  def __init__(self, splits: list[pipeline.Split], seeds: list[int], batch: int):
    self.splits, self.seeds, self.batch = splits, seeds, batch
    self.steps_per_epoch = np.array([pipeline.steps_per_epoch(s, batch) for s in splits])
    self._orders = {}

  def _order(self, k: int, epoch: int) -> np.ndarray:
    key = (self.seeds[k], tuple(self.splits[k].normal_labels), epoch)
    if key not in self._orders:
      if len(self._orders) > 4 * len(self.splits):
        self._orders.clear()
      self._orders[key] = pipeline.epoch_order(self.splits[k], self.seeds[k], epoch,
                                               self.batch)
    return self._orders[key]

  def indices_of(self, k: int, step: int) -> np.ndarray:
    """(B,) example indices of member k's batch at `step`."""
    epoch, row = divmod(step, int(self.steps_per_epoch[k]))
    return self._order(k, epoch)[row]

  def indices(self, step: int) -> np.ndarray:
    """(K, B) example indices of every member's batch at `step`."""
    return np.stack([self.indices_of(k, step) for k in range(len(self.splits))]
                    ).astype(np.int32)

  def labels_seen(self, k: int, steps: int, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """How many training images of each class member k saw in its first `steps` steps."""
    spe = int(self.steps_per_epoch[k])
    seen = np.zeros(num_classes, np.int64)
    for epoch in range(-(-steps // spe)):
      rows = self._order(k, epoch)[:min(spe, steps - epoch * spe)]
      seen += np.bincount(labels[rows.reshape(-1)], minlength=num_classes)
    return seen


def padded_batches(index_lists: list[np.ndarray], batch: int) -> tuple[np.ndarray, np.ndarray]:
  """(K, nb, B) indices and valid flags: each list in order, padded as `eval_batches`
  pads (`pipeline.padded_indices`), shorter lists padded further with empty batches."""
  nb = max(-(-len(ix) // batch) for ix in index_lists)
  padded = [pipeline.padded_indices(ix, batch, nb * batch) for ix in index_lists]
  idx = np.stack([i for i, _ in padded]).astype(np.int32)
  valid = np.stack([v for _, v in padded])
  return idx.reshape(len(index_lists), nb, batch), valid.reshape(len(index_lists), nb, batch)


@dataclasses.dataclass
class GroupData:
  """A group's splits: preprocessed arrays and each member's view of them."""
  shape: tuple[int, ...]
  train: dict
  val: dict | None
  test: dict | None
  test_split: pipeline.Split | None  # member 0's classes; members re-label via member_split
  train_splits: list
  val_splits: list | None
  test_lengths: Any = None  # future of complexity.lengths(test images) (eval.complexity)


def load_data(group: Group, cache: dict | None = None, with_test: bool = True) -> GroupData:
  """Reads and preprocesses the group's splits (cached by data config in `cache`);
  without the test split (None) for a model that is only trained on them."""
  config = group.config
  cache = {} if cache is None else cache
  base_train = pipeline.load_split(config.data, "train")
  base_val = pipeline.load_split(config.data, "val")
  test = pipeline.load_split(config.data, "test") if with_test else None
  shape = state_lib.image_shape(config, base_train.source.spatial_ndim)
  key = json.dumps(config_lib.to_dict(config)["data"], sort_keys=True)

  def arrays(role, split):
    if (key, role) not in cache:
      if len(cache) > 6:  # keep the latest data config only
        cache.clear()
      cache[(key, role)] = preprocess(split, config.data)
    return cache[(key, role)]

  lengths = None
  if with_test and config.eval.complexity:  # coded once per data, while the group trains
    bits = int(config.data.bit_depth)
    if (key, "lengths", bits) not in cache:
      pool = complexity.ComplexityPool(
          bits, cache_dir=complexity_cache.resolve_dir(config.eval.complexity_cache))
      cache[(key, "lengths", bits)] = pool.submit(arrays("test", test)["image"])
      pool.close(wait=False)
    lengths = cache[(key, "lengths", bits)]
  trains = [member_split(base_train, m.config.data, "train") for m in group.members]
  vals = None if base_val is None else [member_split(base_val, m.config.data, "val")
                                        for m in group.members]
  return GroupData(shape, arrays("train", base_train),
                   None if base_val is None else arrays("val", base_val),
                   arrays("test", test) if with_test else None, test, trains, vals,
                   lengths)
