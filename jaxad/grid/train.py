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

from jaxad import background, checkpoint, compile_options, families, keys, parallel
from jaxad import config as config_lib
from jaxad import schedule
from jaxad import state as state_lib
from jaxad.errors import ConfigError
from jaxad.families import vae as vae_family
from jaxad.grid.axes import Group
from jaxad.grid.data import GroupData, Streams, load_data, padded_batches
from jaxad.models import vae as vae_models
from jaxad.objectives import likelihood as likelihood_lib

log = logging.getLogger("jaxad")


def member_family(model, likelihood, beta, **eval_settings) -> vae_family.VAE:
  """The VAE family of one member: the group's likelihood (`group_setup`; a kind name
  gives that kind's defaults) with β a traced per-member array (checked in group_setup)."""
  if isinstance(likelihood, str):
    likelihood = likelihood_lib.Likelihood(likelihood)
  return vae_family.VAE(model, dataclasses.replace(likelihood, beta=beta), **eval_settings)


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
  return state_lib.make_optimizer(config)


def group_setup(group: Group, shape: tuple[int, ...]):
  """(model, likelihood, optimiser) shared by every member of the group; the model
  computes in the group's train.compute_dtype, its decoder sized for the likelihood.

  The likelihood (kind, mixtures, bit depth: group-level keys) has β = 1; each member's
  step puts in its own traced β (`member_family`), so the compiled steps, cached on the
  likelihood, do not depend on any member's β.
  """
  config = group.config
  model = vae_models.build_model(config.model, shape, families.compute_dtype(config))
  for m in group.members:  # checks every member's β and the kind, with the config key
    likelihood_lib.make_likelihood(m.config.model, int(m.config.data.bit_depth))
  likelihood = dataclasses.replace(
      likelihood_lib.make_likelihood(config.model, int(config.data.bit_depth)), beta=1.0)
  train = json.dumps(config_lib.to_dict(config)["train"], sort_keys=True)
  return model, likelihood, _optimizer(train)


@functools.lru_cache(maxsize=16)
def _init_fn(model, likelihood, tx, shape):
  @jax.jit
  def init(seed):  # the trainer's initial state (state.initial_state), its seed traced
    start = state_lib.initial_state(member_family(model, likelihood, 1.0), tx, shape,
                                    seed)
    return start.params, start.model_state, start.opt_state
  return init


def init_state(model, likelihood, tx, shape, seeds, lrs, layout: Layout) -> GridState:
  """Each member initialised exactly as the trainer does (one jit, K calls), stacked."""
  init = _init_fn(model, likelihood, tx, tuple(shape))
  parts = [init(jnp.asarray(s, jnp.int32)) for s in seeds]
  params, model_state, opt_state = jax.tree.map(lambda *x: jnp.stack(x), *parts)
  opt_state = state_lib.with_learning_rate(opt_state, jnp.asarray(np.asarray(lrs, np.float32)))
  k = len(seeds)
  state = GridState(
      step=jnp.zeros((k,), jnp.int32), params=params, model_state=model_state,
      opt_state=opt_state, best_val=jnp.full((k,), jnp.inf, jnp.float32),
      bad_epochs=jnp.zeros((k,), jnp.int32), stopped=jnp.zeros((k,), jnp.int32),
      diverged=jnp.zeros((k,), jnp.int32))
  return layout.put(state)


@functools.lru_cache(maxsize=16)
def make_train_step(model, likelihood, tx, layout: Layout,
                    mutation: tuple[float, int] = (0.0, 8)):
  """jit(vmap(member step)): (state, images (N, ...), idx (K, B), betas, seeds, active).

  Member k trains on images[idx[k]] with β = betas[k] and keys from seeds[k]; members
  with active[k] False, or whose loss or gradient is not finite, keep their state.
  `mutation` = (rate, bit_depth) perturbs the inputs first, with the trainer's keys
  (a background model's step).
  """

  def member(state: GridState, images, beta, seed, active):
    rng = jax.random.fold_in(keys.purpose_key(seed, keys.TRAIN), state.step)
    if mutation[0]:
      images = background.mutate(
          images, jax.random.fold_in(keys.purpose_key(seed, keys.MUTATION),
                                     state.step), *mutation)
    params, model_state, opt_state, metrics = families.gradient_update(
        member_family(model, likelihood, beta), tx, state.params, state.model_state,
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
def make_val_step(model, likelihood, layout: Layout):
  """Per member: masked sums of the eval-mode −ELBO over its batch `b` (trainer keys)."""

  def member(params, model_state, images, valid, beta, seed, b):
    rng = jax.random.fold_in(keys.purpose_key(seed, keys.VAL), b)
    neg_elbo = member_family(model, likelihood, beta).val_loss(
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


def _member_values(group: Group, get) -> np.ndarray:
  return np.array([get(m.config) for m in group.members])


def _end_of_epoch(host: dict, k: int, val: float, t) -> str:
  """schedule.plateau_schedule for member k, on host copies of its state."""
  old_lr = float(host["lr"][k])
  best, bad, lr, stop = schedule.plateau_schedule(
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
  lr = state.opt_state.hyperparams["learning_rate"]
  return state.replace(
      opt_state=state_lib.with_learning_rate(
          state.opt_state, layout.put(jnp.asarray(host["lr"], lr.dtype))),
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


@dataclasses.dataclass
class _GroupRun:
  """What one group's training holds fixed: members, data on the devices, steps."""
  group: Group
  data: GroupData
  layout: Layout
  streams: Streams
  num_steps: np.ndarray  # (K,) each member's step budget
  needs_val: bool
  betas: Any
  seeds: Any
  train_step: Any
  dev_train: Any
  ckpt: checkpoint.Checkpoints
  val: tuple | None = None  # (val_step, device images, (K, nb, B) indices, valid)


def _setup_group(group: Group, directory: str, mesh, data: GroupData):
  """The group's run (compiled steps, data on the devices), its initial or restored
  stacked state and the step it starts from."""
  config, members = group.config, group.members
  t = config.train
  seeds = [int(m.config.seed) for m in members]
  streams = Streams(data.train_splits, seeds, int(t.batch_size))
  num_steps = np.array([config_lib.total_steps(m.config, int(s))
                        for m, s in zip(members, streams.steps_per_epoch)])
  needs_val = any(schedule.needs_validation(m.config.train) for m in members)
  schedule.check_validation(data.val is not None, needs_val)
  layout = Layout.make(mesh, len(members), int(t.batch_size))
  model, likelihood, tx = group_setup(group, data.shape)
  limit = float(config.grid.max_device_data_mb) if "grid" in config else 2048.0
  run = _GroupRun(
      group, data, layout, streams, num_steps, needs_val,
      layout.put(jnp.asarray(_member_values(group, lambda c: c.model.beta), jnp.float32)),
      layout.put(jnp.asarray(seeds, jnp.int32)),
      make_train_step(model, likelihood, tx, layout,
                      (float(t.mutation_rate), int(config.data.bit_depth))),
      _put_images(data.train["image"], layout, limit),
      checkpoint.Checkpoints(directory, keep=t.keep_checkpoints))
  if needs_val:
    run.val = (make_val_step(model, likelihood, layout),
               _put_images(data.val["image"], layout, limit),
               *padded_batches([s.normal_indices for s in data.val_splits], int(t.batch_size)))
  state = init_state(model, likelihood, tx, data.shape, seeds,
                     _member_values(group, lambda c: c.train.learning_rate), layout)
  start = int(run.ckpt.latest_step() or 0)
  if start:
    state = run.ckpt.restore(state)
    log.info("%s: resumed at step %d", group.name, start)
  return run, state, start


def _validate_members(run: _GroupRun, state, host: dict, ended, diverged, step: int):
  """Validation −ELBO of every member, then the schedule of those whose epoch ended."""
  val_step, dev_val, val_idx, val_valid = run.val
  vals = _validate(val_step, state, val_idx, val_valid, dev_val, run.betas, run.seeds,
                   run.layout)
  for j in np.flatnonzero(ended & ~diverged):
    note = _end_of_epoch(host, j, float(vals[j]), run.group.members[j].config.train)
    log.info("%s member %d epoch %d: validation -ELBO %.5g%s", run.group.name, j,
             step // int(run.streams.steps_per_epoch[j]), vals[j], note)
  return _set_schedule(state, host, run.layout)


class _Progress:
  """Each log window's losses (fetched only at log steps), rate and progress bar."""

  def __init__(self, run: _GroupRun, start: int, total: int, enabled: bool):
    from tqdm.auto import tqdm
    self.bar = tqdm(total=total, initial=start, disable=not enabled, unit="step",
                    dynamic_ncols=True, mininterval=1.0, desc=run.group.name)
    self.name, self.batch = run.group.name, int(run.group.config.train.batch_size)
    self.window, self.images, self.tick = [], 0, time.perf_counter()
    self.last_loss = np.full(len(run.group.members), np.nan)

  def add(self, active, loss) -> None:
    self.window.append((active, loss))
    self.images += int(active.sum()) * self.batch
    self.bar.update(1)

  def flush(self, step: int, active, log_line: bool) -> None:
    for a, l in self.window:
      self.last_loss = np.where(a, np.asarray(jax.device_get(l)), self.last_loss)
    now = time.perf_counter()
    rate = self.images / (now - self.tick)
    self.bar.set_postfix(active=int(active.sum()), loss=f"{np.nanmean(self.last_loss):.4g}",
                         img_s=f"{rate:.0f}")
    if log_line:
      log.info("%s step %d: %d active, mean loss %.5g, %.0f images/s", self.name, step,
               int(active.sum()),
               float(np.nanmean(np.where(active, self.last_loss, np.nan))), rate)
    self.window, self.images, self.tick = [], 0, now


def _group_loop(run: _GroupRun, state, start: int, progress: _Progress, stop_at_step):
  """Steps every active member until none is (or stop_at_step); (state, step, finished)."""
  t, spe = run.group.config.train, run.streams.steps_per_epoch
  host = _host_schedule(state)
  diverged = np.asarray(jax.device_get(state.diverged)).astype(bool)
  total, step = int(run.num_steps.max()), start
  active_now = lambda: (step < run.num_steps) & (host["stopped"] == 0) & ~diverged
  while (active := active_now()).any():
    idx = run.layout.put(run.streams.indices(step), run.layout.batch)
    state, metrics = run.train_step(state, run.dev_train, idx, run.betas, run.seeds,
                                    run.layout.put(jnp.asarray(active)))
    progress.add(active, metrics["loss"])
    step += 1
    ended = active & schedule.due(step, spe)
    if schedule.due(step, t.log_every_steps, total) or ended.any():
      diverged = np.asarray(jax.device_get(state.diverged)).astype(bool)
      progress.flush(step, active, schedule.due(step, t.log_every_steps))
    if ended.any() and run.needs_val:
      state = _validate_members(run, state, host, ended, diverged, step)
    done = not active_now().any()
    if schedule.due(step, t.checkpoint_every_steps) or done:
      run.ckpt.save(step, state)
    if stop_at_step is not None and step >= stop_at_step and not done:
      break
  return state, step, not active_now().any()


def train_group(group: Group, directory: str, mesh, *, data: GroupData | None = None,
                stop_at_step: int | None = None, progress: bool = True) -> tuple[GridState, dict]:
  """Trains (or resumes, from `directory/checkpoints`) every member of `group`.

  Returns the stacked final state and a summary: per member its steps, epochs, best
  validation −ELBO, whether it stopped early or diverged, its last training loss and
  the histogram of training labels it saw. `stop_at_step` ends the loop after that
  (global) step as if interrupted; the summary then has finished=False.
  """
  data = load_data(group) if data is None else data
  run, state, start = _setup_group(group, directory, mesh, data)
  total = int(run.num_steps.max())
  bar = _Progress(run, start, total, progress)
  log.info("%s: %d members, %d steps at most, %s/epoch, layout %s", group.name,
           len(group.members), total, sorted(set(run.streams.steps_per_epoch.tolist())),
           run.layout.members.spec)
  try:
    state, step, finished = _group_loop(run, state, start, bar, stop_at_step)
  finally:
    bar.bar.close()
    run.ckpt.close()
  return state, _summary(group, state, data, run.streams, run.num_steps, finished,
                         bar.last_loss, run.needs_val)


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
