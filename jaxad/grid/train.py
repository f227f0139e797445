"""Trains the K members of one grid group together: stacked state, one vmapped step.

Each member computes exactly what `trainer.train_and_evaluate` computes for its own
config: the same init key, the same step keys (`fold_in(purpose_key(seed, TRAIN),
step)`), the same global batches (`pipeline.epoch_order` of its own normal classes and
seed), the same validation batches and keys, and Zimmerer et al.'s plateau and early
stopping per member. What changes is how: the split is preprocessed once (the
pipeline's own per-example preprocessing, so the pixels are bit-identical) and each
step gathers every member's batch by index; β, seed and learning rate are per-member
arrays; a member that stopped (early stopping, its step budget, or a non-finite loss)
keeps its parameters, batch statistics and optimiser state frozen while the others go
on. The group ends when no member is active.

The member axis is sharded over the devices when K divides evenly, else every
member's batch is (data parallel, as in the trainer), else everything is replicated.
"""

import dataclasses
import functools
import json
import logging
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxad import background, checkpoint, compile_options, families, parallel, trainer
from jaxad import config as config_lib
from jaxad.data import pipeline
from jaxad.errors import ConfigError, DataError
from jaxad.families import vae as vae_family
from jaxad.grid_axes import Group
from jaxad.models import vae as vae_models
from jaxad.objectives import likelihood as likelihood_lib
from jaxad.scores import complexity

log = logging.getLogger("jaxad")


def member_family(model, kind: str, beta, **eval_settings) -> vae_family.VAE:
  """The VAE family of one member, β a traced per-member array (checked in group_setup)."""
  return vae_family.VAE(model, likelihood_lib.Likelihood(kind, beta), **eval_settings)


@flax.struct.dataclass
class GridState:
  """The train states of K members, each leaf stacked on a leading member axis."""
  step: jax.Array  # (K,) int32: optimiser steps each member has taken
  params: Any
  model_state: Any
  opt_state: Any  # learning rate per member in opt_state.hyperparams["learning_rate"]
  best_val: jax.Array  # (K,) float32
  bad_epochs: jax.Array  # (K,) int32
  stopped: jax.Array  # (K,) int32: early stopping ended the member
  diverged: jax.Array  # (K,) int32: a non-finite loss froze the member


# ---------------------------------------------------------------------------- data


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
  pads (repeating its first index), shorter lists padded further with empty batches."""
  nb = max(-(-len(ix) // batch) for ix in index_lists)
  idx = np.zeros((len(index_lists), nb * batch), np.int32)
  valid = np.zeros((len(index_lists), nb * batch), np.float32)
  for k, ix in enumerate(index_lists):
    idx[k] = ix[0] if len(ix) else 0
    idx[k, :len(ix)] = ix
    valid[k, :len(ix)] = 1.0
  return idx.reshape(len(index_lists), nb, batch), valid.reshape(len(index_lists), nb, batch)


# ----------------------------------------------------------------------- shardings


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where the member axis and the batch axis live on the mesh.

  With the member axis sharded, each device runs the vmapped step on its own members
  (`jax.shard_map`): no collective, and no partitioning of vmap's grouped convolutions
  (which XLA's SPMD partitioner gets wrong when the group axis is split).
  """
  mesh: Any
  shard_members: bool
  members: NamedSharding  # (K, ...) leaves
  batch: NamedSharding  # (K, B) index arrays
  replicated: NamedSharding

  @classmethod
  def make(cls, mesh, num_members: int, batch: int) -> "Layout":
    n = mesh.devices.size
    axis = parallel.DATA_AXIS
    if num_members % n == 0:
      members, batched = P(axis), P(axis)
    elif batch % n == 0:
      members, batched = P(), P(None, axis)
    else:
      members, batched = P(), P()
    return cls(mesh, n > 1 and num_members % n == 0, NamedSharding(mesh, members),
               NamedSharding(mesh, batched), NamedSharding(mesh, P()))

  def put(self, tree, sharding=None):
    return jax.device_put(tree, sharding or self.members)

  def gather(self, images, idx):
    """images[idx]: every member's batch, placed as the layout says."""
    batch = images[idx]
    if self.shard_members:
      return batch
    return jax.lax.with_sharding_constraint(batch, self.batch)

  def per_member(self, fn, member_args: tuple[bool, ...]):
    """fn itself, or fn run per device on its members (args flagged False replicated)."""
    if not self.shard_members:
      return fn
    axis = parallel.DATA_AXIS
    return jax.shard_map(fn, mesh=self.mesh, out_specs=P(axis),
                         in_specs=tuple(P(axis) if m else P() for m in member_args))


# -------------------------------------------------------------------------- the step


@functools.lru_cache(maxsize=16)
def _optimizer(train_json: str) -> optax.GradientTransformation:
  """One optimiser object per train config, so compiled steps can be cached on it."""
  config = ml_collections.ConfigDict({"train": json.loads(train_json)})
  return trainer.make_optimizer(config)


def group_setup(group: Group, shape: tuple[int, ...]):
  """(model, likelihood kind, optimiser) shared by every member of the group."""
  config = group.config
  model = vae_models.build_model(config.model, shape)
  for m in group.members:  # checks every member's β and the kind, with the config key
    likelihood_lib.make_likelihood(m.config.model)
  train = json.dumps(config_lib.to_dict(config)["train"], sort_keys=True)
  return model, config.model.likelihood, _optimizer(train)


@functools.lru_cache(maxsize=16)
def _init_fn(model, tx, shape):
  @jax.jit
  def init(seed):
    variables = model.init(trainer.purpose_key(seed, trainer.INIT), jnp.zeros((1, *shape)),
                           train=False)
    params = variables.pop("params")
    return params, dict(variables), tx.init(params)
  return init


def init_state(model, tx, shape, seeds, lrs, layout: Layout) -> GridState:
  """Each member initialised exactly as the trainer does (one jit, K calls), stacked."""
  init = _init_fn(model, tx, tuple(shape))
  parts = [init(jnp.asarray(s, jnp.int32)) for s in seeds]
  params, model_state, opt_state = jax.tree.map(lambda *x: jnp.stack(x), *parts)
  hyper = dict(opt_state.hyperparams)
  hyper["learning_rate"] = jnp.asarray(np.asarray(lrs, np.float32))
  opt_state = opt_state._replace(hyperparams=hyper)
  k = len(seeds)
  state = GridState(
      step=jnp.zeros((k,), jnp.int32), params=params, model_state=model_state,
      opt_state=opt_state, best_val=jnp.full((k,), jnp.inf, jnp.float32),
      bad_epochs=jnp.zeros((k,), jnp.int32), stopped=jnp.zeros((k,), jnp.int32),
      diverged=jnp.zeros((k,), jnp.int32))
  return layout.put(state)


@functools.lru_cache(maxsize=16)
def make_train_step(model, kind: str, tx, layout: Layout,
                    mutation: tuple[float, int] = (0.0, 8)):
  """jit(vmap(member step)): (state, images (N, ...), idx (K, B), betas, seeds, active).

  Member k trains on images[idx[k]] with β = betas[k] and keys from seeds[k]; members
  with active[k] False, or whose loss or gradient is not finite, keep their state.
  `mutation` = (rate, bit_depth) perturbs the inputs first, with the trainer's keys
  (a background model's step).
  """

  def member(state: GridState, images, beta, seed, active):
    rng = jax.random.fold_in(trainer.purpose_key(seed, trainer.TRAIN), state.step)
    if mutation[0]:
      images = background.mutate(
          images, jax.random.fold_in(trainer.purpose_key(seed, trainer.MUTATION),
                                     state.step), *mutation)
    params, model_state, opt_state, metrics = families.gradient_update(
        member_family(model, kind, beta), tx, state.params, state.model_state,
        state.opt_state, images, rng)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    go = active & finite & (state.diverged == 0)
    new = state.replace(step=state.step + 1, params=params, model_state=model_state,
                        opt_state=opt_state)
    new = jax.tree.map(lambda a, b: jnp.where(go, a, b), new, state)
    new = new.replace(diverged=jnp.where(active & ~finite, 1, state.diverged))
    return new, metrics

  def step(state, images, idx, betas, seeds, active):
    return jax.vmap(member)(state, layout.gather(images, idx), betas, seeds, active)

  m, r = layout.members, layout.replicated
  step = layout.per_member(step, (True, False, True, True, True, True))
  return compile_options.jit(step, in_shardings=(m, r, layout.batch, m, m, m),
                             out_shardings=(m, m), donate_argnums=0)


@functools.lru_cache(maxsize=16)
def make_val_step(model, kind: str, layout: Layout):
  """Per member: masked sums of the eval-mode −ELBO over its batch `b` (trainer keys)."""

  def member(params, model_state, images, valid, beta, seed, b):
    rng = jax.random.fold_in(trainer.purpose_key(seed, trainer.VAL), b)
    neg_elbo = member_family(model, kind, beta).val_loss(
        {"params": params, **model_state}, images, rng)
    return jnp.sum(neg_elbo * valid), jnp.sum(valid)

  def step(state, images, idx, valid, betas, seeds, b):
    return jax.vmap(member, in_axes=(0, 0, 0, 0, 0, 0, None))(
        state.params, state.model_state, layout.gather(images, idx), valid, betas, seeds, b)

  return compile_options.jit(
      layout.per_member(step, (True, False, True, True, True, True, False)))


def background_group(group: Group) -> Group:
  """The group of the members' background models (`background.background_config` of
  each member's config): same members and axis values, smaller, mutated inputs."""
  members = tuple(dataclasses.replace(m, config=background.background_config(m.config))
                  for m in group.members)
  return dataclasses.replace(group, name=f"{group.name}_{background.SUBDIR}",
                             members=members)


# ---------------------------------------------------------------- the group's loop


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
  shape = trainer.image_shape(config, base_train.source.spatial_ndim)
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
      pool = complexity.ComplexityPool(bits)
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


def _member_values(group: Group, get) -> np.ndarray:
  return np.array([get(m.config) for m in group.members])


def _end_of_epoch(host: dict, k: int, val: float, t) -> str:
  """trainer.plateau_schedule for member k, on host copies of its state."""
  old_lr = float(host["lr"][k])
  best, bad, lr, stop = trainer.plateau_schedule(
      float(host["best_val"][k]), int(host["bad_epochs"][k]), old_lr, val, t)
  host["best_val"][k], host["bad_epochs"][k], host["lr"][k] = best, bad, lr
  note = f", learning rate -> {lr:.3g}" if lr != old_lr else ""
  if stop:
    host["stopped"][k] = 1
    note += ", early stop"
  return note


def _host_schedule(state: GridState) -> dict:
  got = jax.device_get({"best_val": state.best_val, "bad_epochs": state.bad_epochs,
                        "stopped": state.stopped,
                        "lr": state.opt_state.hyperparams["learning_rate"]})
  return {k: np.array(v) for k, v in got.items()}


def _set_schedule(state: GridState, host: dict, layout: Layout) -> GridState:
  hyper = dict(state.opt_state.hyperparams)
  hyper["learning_rate"] = layout.put(jnp.asarray(host["lr"], hyper["learning_rate"].dtype))
  return state.replace(
      opt_state=state.opt_state._replace(hyperparams=hyper),
      best_val=layout.put(jnp.asarray(host["best_val"], jnp.float32)),
      bad_epochs=layout.put(jnp.asarray(host["bad_epochs"], jnp.int32)),
      stopped=layout.put(jnp.asarray(host["stopped"], jnp.int32)))


def _validate(val_step, state, val_idx, val_valid, dev_val, betas, seeds,
              layout) -> np.ndarray:
  """Mean validation −ELBO per member (float64 sums of float32 batch sums, as trainer)."""
  total = np.zeros(len(seeds))
  count = np.zeros(len(seeds))
  for b in range(val_idx.shape[1]):
    s, n = jax.device_get(val_step(state, dev_val, layout.put(val_idx[:, b], layout.batch),
                                   layout.put(val_valid[:, b], layout.batch), betas, seeds,
                                   jnp.int32(b)))
    total += np.asarray(s, np.float64)
    count += np.asarray(n, np.float64)
  return total / np.maximum(count, 1)


def _put_images(array: np.ndarray, layout: Layout, limit_mb: float):
  """The split on every device (gathered inside the step) if it fits the limit."""
  if array.nbytes > limit_mb * 2**20:
    raise ConfigError(
        f"the preprocessed split is {array.nbytes / 2**20:.0f} MiB, above "
        f"grid.max_device_data_mb={limit_mb}: raise it if the devices have the memory, "
        "or lower data.image_size")
  return layout.put(jnp.asarray(array), layout.replicated)


def train_group(group: Group, directory: str, mesh, *, data: GroupData | None = None,
                stop_at_step: int | None = None, progress: bool = True) -> tuple[GridState, dict]:
  """Trains (or resumes, from `directory/checkpoints`) every member of `group`.

  Returns the stacked final state and a summary: per member its steps, epochs, best
  validation −ELBO, whether it stopped early or diverged, its last training loss and
  the histogram of training labels it saw. `stop_at_step` ends the loop after that
  (global) step as if interrupted; the summary then has finished=False.
  """
  config = group.config
  t = config.train
  data = load_data(group) if data is None else data
  members = group.members
  k = len(members)
  seeds = [int(m.config.seed) for m in members]
  batch = int(t.batch_size)
  streams = Streams(data.train_splits, seeds, batch)
  spe = streams.steps_per_epoch
  num_steps = np.array([config_lib.total_steps(m.config, int(s))
                        for m, s in zip(members, spe)])
  schedules = [m.config.train for m in members]
  needs_val = any(s.plateau_patience or s.early_stop_patience for s in schedules)
  if needs_val and data.val is None:
    raise ConfigError("train.plateau_patience / train.early_stop_patience need a "
                      "validation split: set data.val_split or data.val_fraction > 0")
  layout = Layout.make(mesh, k, batch)
  model, kind, tx = group_setup(group, data.shape)
  betas = layout.put(jnp.asarray(_member_values(group, lambda c: c.model.beta), jnp.float32))
  dev_seeds = layout.put(jnp.asarray(seeds, jnp.int32))
  lrs = _member_values(group, lambda c: c.train.learning_rate)

  ckpt = checkpoint.Checkpoints(directory, keep=t.keep_checkpoints)
  state = init_state(model, tx, data.shape, seeds, lrs, layout)
  start = ckpt.latest_step() or 0
  if start:
    state = ckpt.restore(state)
    log.info("%s: resumed at step %d", group.name, start)
  limit = float(config.grid.max_device_data_mb) if "grid" in config else 2048.0
  dev_train = _put_images(data.train["image"], layout, limit)
  train_step = make_train_step(model, kind, tx, layout, (float(t.mutation_rate),
                                                        int(config.data.bit_depth)))
  if needs_val:
    val_step = make_val_step(model, kind, layout)
    dev_val = _put_images(data.val["image"], layout, limit)
    val_idx, val_valid = padded_batches([s.normal_indices for s in data.val_splits], batch)
  host = _host_schedule(state)
  diverged = np.asarray(jax.device_get(state.diverged)).astype(bool)
  total = int(num_steps.max())
  from tqdm.auto import tqdm
  bar = tqdm(total=total, initial=start, disable=not progress, unit="step",
             dynamic_ncols=True, mininterval=1.0, desc=group.name)
  log.info("%s: %d members, %d steps at most, %s/epoch, layout %s", group.name, k, total,
           sorted(set(spe.tolist())), layout.members.spec)
  window, last_loss, tick = [], np.full(k, np.nan), time.perf_counter()
  step, images_done = start, 0
  try:
    while True:
      active = (step < num_steps) & (host["stopped"] == 0) & ~diverged
      if not active.any():
        break
      idx = streams.indices(step)
      state, metrics = train_step(state, dev_train, layout.put(idx, layout.batch), betas,
                                  dev_seeds, layout.put(jnp.asarray(active)))
      window.append((active, metrics["loss"]))
      images_done += int(active.sum()) * batch
      step += 1
      bar.update(1)
      ended = active & (step % spe == 0)
      if step % t.log_every_steps == 0 or ended.any() or step == total:
        losses = [(a, np.asarray(jax.device_get(l))) for a, l in window]
        for a, l in losses:
          last_loss = np.where(a, l, last_loss)
        diverged = np.asarray(jax.device_get(state.diverged)).astype(bool)
        now = time.perf_counter()
        rate = images_done / (now - tick)
        bar.set_postfix(active=int(active.sum()), loss=f"{np.nanmean(last_loss):.4g}",
                        img_s=f"{rate:.0f}")
        if step % t.log_every_steps == 0:
          log.info("%s step %d: %d active, mean loss %.5g, %.0f images/s", group.name, step,
                   int(active.sum()), float(np.nanmean(np.where(active, last_loss, np.nan))),
                   rate)
        window, images_done, tick = [], 0, now
      if ended.any() and needs_val:
        vals = _validate(val_step, state, val_idx, val_valid, dev_val, betas,
                         dev_seeds, layout)
        for j in np.flatnonzero(ended & ~diverged):
          note = _end_of_epoch(host, j, float(vals[j]), schedules[j])
          log.info("%s member %d epoch %d: validation -ELBO %.5g%s", group.name, j,
                   step // int(spe[j]), vals[j], note)
        state = _set_schedule(state, host, layout)
      done = not ((step < num_steps) & (host["stopped"] == 0) & ~diverged).any()
      if step % t.checkpoint_every_steps == 0 or done:
        ckpt.save(step, state)
      if stop_at_step is not None and step >= stop_at_step and not done:
        break
  finally:
    bar.close()
    ckpt.close()
  finished = not ((step < num_steps) & (host["stopped"] == 0) & ~diverged).any()
  return state, _summary(group, state, data, streams, num_steps, finished, last_loss,
                         needs_val)


def _summary(group, state, data, streams, num_steps, finished, last_loss, needs_val):
  steps, best, stopped, diverged = (np.asarray(x) for x in jax.device_get(
      (state.step, state.best_val, state.stopped, state.diverged)))
  params = jax.device_get(state.params)
  labels = data.train["label"]
  names = data.train_splits[0].source.class_names
  out = []
  for k in range(len(group.members)):
    seen = streams.labels_seen(k, int(steps[k]), labels, len(names))
    norm = np.sqrt(sum(float(np.sum(np.square(np.asarray(x[k], np.float64))))
                       for x in jax.tree.leaves(params)))
    out.append({
        "member": k, "steps": int(steps[k]), "num_steps": int(num_steps[k]),
        "epochs": float(steps[k] / streams.steps_per_epoch[k]),
        "stopped_early": bool(stopped[k]), "diverged": bool(diverged[k]),
        "best_val_neg_elbo": float(best[k]) if needs_val and np.isfinite(best[k]) else None,
        "last_loss": None if not np.isfinite(last_loss[k]) else float(last_loss[k]),
        "param_norm": norm,
        "labels_seen": {names[i]: int(c) for i, c in enumerate(seen) if c}})
  return {"finished": finished, "members": out}
