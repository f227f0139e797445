"""The training loop: config → data → model → jit-compiled steps → checkpoints and logs.

`train_and_evaluate(config, workdir)` is the library function behind `python -m
jaxad.train`; it returns the final state and a summary so tests can check numbers.
Random keys come from `config.seed` and the step (`fold_in`), and data order from the
seed and the epoch, so a run restarted from its latest checkpoint draws exactly what an
uninterrupted run draws and ends with the same parameters.
"""

import functools
import logging
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tensorflow as tf

from jaxad import background, checkpoint, compile_options, families, files, parallel
from jaxad import config as config_lib
from jaxad.data import pipeline
from jaxad.errors import ConfigError

log = logging.getLogger("jaxad")

# Key purposes: every random draw derives from config.seed through one of these.
INIT, TRAIN, VAL = 0, 1, 2
MUTATION = 5  # train.mutation_rate's perturbation (evaluation uses 3 and 4)


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimiser steps taken
  params: Any
  model_state: Any  # mutable collections (batch_stats) or {}
  opt_state: Any  # optax state (per network for a GAN); learning rate in its hyperparams
  ema_params: Any  # exponential moving average of params (train.ema_rate > 0), else {}
  best_val: jax.Array  # best validation loss so far (−ELBO in nats, or DSM)
  bad_epochs: jax.Array  # epochs since best_val improved
  stopped: jax.Array  # 1 once early stopping has ended the run


def purpose_key(seed: int, purpose: int) -> jax.Array:
  return jax.random.fold_in(jax.random.key(seed), purpose)


def image_shape(config: ml_collections.ConfigDict, spatial_ndim: int) -> tuple[int, ...]:
  return pipeline.output_shape(config.data, spatial_ndim)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam, with optional warm-up and gradient clipping, its learning rate injected into
  the state (`opt_state.hyperparams["learning_rate"]`) for plateaus and grids."""
  t = config.train

  def adam(learning_rate):
    rate = learning_rate
    if t.warmup_steps:
      rate = lambda count: learning_rate * jnp.minimum(1.0, (count + 1) / t.warmup_steps)
    tx = optax.adam(rate, b1=t.b1, b2=t.b2, eps=t.eps)
    return optax.chain(optax.clip_by_global_norm(t.grad_clip), tx) if t.grad_clip else tx

  return optax.inject_hyperparams(adam)(learning_rate=t.learning_rate)


def _is_hyper(x) -> bool:
  """An optax.inject_hyperparams state (its class differs across optax versions)."""
  return hasattr(x, "hyperparams") and hasattr(x, "_replace")


def _hyper_states(opt_state) -> list:
  """Every inject_hyperparams state in opt_state (one, or one per network of a GAN)."""
  return [s for s in jax.tree.leaves(opt_state, is_leaf=_is_hyper) if _is_hyper(s)]


def learning_rate(opt_state) -> float:
  """The current train.learning_rate (shared by every optimiser state)."""
  return float(_hyper_states(opt_state)[0].hyperparams["learning_rate"])


def create_state(family, tx, shape, seed, mesh, ema: bool = False) -> TrainState:
  """Initialises parameters directly replicated on every device of the mesh."""
  def init():
    variables = family.init(purpose_key(seed, INIT), shape)
    params = variables.pop("params")
    init_opt = getattr(family, "init_opt_state", None)
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, model_state=dict(variables),
        opt_state=init_opt(tx, params) if init_opt else tx.init(params),
        ema_params=params if ema else {},
        best_val=jnp.full((), jnp.inf, jnp.float32),
        bad_epochs=jnp.zeros((), jnp.int32), stopped=jnp.zeros((), jnp.int32))
  return jax.jit(init, out_shardings=parallel.replicated(mesh))()


def eval_params(state: TrainState):
  """The parameters evaluation uses: the EMA when the run keeps one."""
  return state.ema_params if state.ema_params else state.params


def make_train_step(family, tx, seed, mesh, ema_rate: float = 0.0,
                    mutation: tuple[float, int] = (0.0, 8)):
  """The jit-compiled step: the family's update (by default the gradient of its loss
  and Adam), the EMA, metrics. `mutation` = (rate, bit_depth) perturbs the inputs first
  (`background.mutate`, the background model of a likelihood ratio)."""
  train_key, mutation_key = purpose_key(seed, TRAIN), purpose_key(seed, MUTATION)
  update = getattr(family, "train_update", None) or functools.partial(
      families.gradient_update, family)

  def step(state: TrainState, images: jax.Array):
    rng = jax.random.fold_in(train_key, state.step)
    if mutation[0]:
      images = background.mutate(images, jax.random.fold_in(mutation_key, state.step),
                                 *mutation)
    params, model_state, opt_state, metrics = update(
        tx, state.params, state.model_state, state.opt_state, images, rng)
    ema = state.ema_params
    if ema_rate:
      ema = jax.tree.map(lambda e, p: ema_rate * e + (1.0 - ema_rate) * p, ema, params)
    state = state.replace(step=state.step + 1, params=params, ema_params=ema,
                          model_state=model_state, opt_state=opt_state)
    return state, metrics

  replicated = parallel.replicated(mesh)
  return compile_options.jit(step, in_shardings=(replicated, parallel.batch_sharded(mesh)),
                             out_shardings=(replicated, replicated), donate_argnums=0)


def make_val_step(family, seed, mesh):
  """Masked sums of the family's per-image validation loss over one padded batch."""
  val_key = purpose_key(seed, VAL)

  def step(state: TrainState, images, valid, batch_index):
    rng = jax.random.fold_in(val_key, batch_index)
    variables = {"params": eval_params(state), **state.model_state}
    return jnp.sum(family.val_loss(variables, images, rng) * valid), jnp.sum(valid)

  return compile_options.jit(step)


def validation_loss(val_step, state, split, config, mesh) -> float:
  """Mean validation loss per image over the normal images of the validation split."""
  total, count = 0.0, 0.0
  batches = pipeline.eval_batches(
      split, config.data, global_batch=config.train.batch_size, normal_only=True,
      process_index=jax.process_index(), process_count=jax.process_count())
  for i, batch in enumerate(batches):
    images, valid = parallel.put_batch((batch["image"], batch["valid"]), mesh)
    s, n = val_step(state, images, valid, i)
    total, count = total + float(s), count + float(n)
  return total / count


def _set_learning_rate(state: TrainState, value: float, mesh) -> TrainState:
  def set_rate(s):
    if not _is_hyper(s):
      return s
    hyper = dict(s.hyperparams)
    hyper["learning_rate"] = parallel.put_replicated(
        jnp.asarray(value, hyper["learning_rate"].dtype), mesh)
    return s._replace(hyperparams=hyper)
  opt_state = jax.tree.map(set_rate, state.opt_state, is_leaf=_is_hyper)
  return state.replace(opt_state=opt_state)


def plateau_schedule(best_val: float, bad_epochs: int, lr: float, val_loss: float,
                     t: ml_collections.ConfigDict) -> tuple[float, int, float, bool]:
  """One epoch of Zimmerer et al.'s schedule on the validation loss, from config.train:
  (best loss, epochs without improvement, learning rate, stop early)."""
  improved = val_loss < best_val - t.min_delta
  best = val_loss if improved else best_val
  bad = 0 if improved else bad_epochs + 1
  if t.plateau_patience and bad and bad % t.plateau_patience == 0:
    lr *= t.plateau_factor
  stop = bool(t.early_stop_patience) and bad >= t.early_stop_patience
  return best, bad, lr, stop


def end_of_epoch(state: TrainState, val_loss: float, config, mesh) -> TrainState:
  """Reduce-on-plateau and early stopping on the validation loss (Zimmerer et al.)."""
  old_lr = learning_rate(state.opt_state)
  best, bad, lr, stop = plateau_schedule(float(state.best_val), int(state.bad_epochs),
                                         old_lr, val_loss, config.train)
  if lr != old_lr:
    log.info("validation loss plateaued for %d epochs: learning rate -> %.3g", bad, lr)
    state = _set_learning_rate(state, lr, mesh)
  put = lambda v, dtype: parallel.put_replicated(jnp.asarray(v, dtype), mesh)
  return state.replace(best_val=put(best, jnp.float32), bad_epochs=put(bad, jnp.int32),
                       stopped=put(int(stop), jnp.int32))


def _check_finite(metrics: dict, step: int) -> None:
  bad = {k: v for k, v in metrics.items() if not np.isfinite(v)}
  if bad:
    raise FloatingPointError(
        f"training diverged at step {step}: {bad}. Lower train.learning_rate, "
        "check the data scaling (images must be in [-1, 1]), or resume from the last "
        "checkpoint with a smaller learning rate.")


def log_to_file(workdir: str, filename: str = "train.log") -> None:
  """Adds WORKDIR/filename as a plain-text log of the "jaxad" logger (once per path)."""
  log.setLevel(logging.INFO)
  path = os.path.join(os.path.abspath(workdir), filename)
  if not any(getattr(h, "baseFilename", None) == path for h in log.handlers):
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)


class _Writer:
  """TensorBoard scalars from process 0 (a no-op elsewhere)."""

  def __init__(self, workdir: str, enabled: bool):
    self._writer = tf.summary.create_file_writer(os.path.join(workdir, "events")) \
        if enabled else None

  def scalars(self, step: int, values: dict) -> None:
    if self._writer is None:
      return
    with self._writer.as_default(step=step):
      for k, v in values.items():
        tf.summary.scalar(k, v)
    self._writer.flush()

  def close(self):
    if self._writer is not None:
      self._writer.close()


def _progress(total: int, initial: int, enabled: bool):
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=initial, disable=not enabled, unit="step",
              dynamic_ncols=True, mininterval=1.0)


def build(config: ml_collections.ConfigDict, spatial_ndim: int):
  """The model family object and optimiser a config describes (shared with eval)."""
  family = families.build(config, image_shape(config, spatial_ndim))
  return family, make_optimizer(config)


def _prepare_workdir(config, workdir, ckpt) -> None:
  path = os.path.join(workdir, "config.json")
  if ckpt.latest_step() is not None and os.path.exists(path):
    config_lib.check_compatible(files.read_json(path), config, workdir)
  if jax.process_index() == 0:
    files.write_json(path, config_lib.to_dict(config))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_at_step: int | None = None,
                       devices=None) -> tuple[TrainState, dict]:
  """Trains (or resumes) the configured model in `workdir`; returns (state, summary).

  `stop_at_step` ends the run after that step as if it were interrupted (no extra
  checkpoint), for preemptible jobs and resume tests. `devices` (default: all)
  restricts the mesh.
  """
  config_lib.validate(config)
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  if is_main:
    log_to_file(workdir)
  t = config.train
  train_split = pipeline.load_split(config.data, "train")
  val_split = pipeline.load_split(config.data, "val")
  if val_split is None and (t.plateau_patience or t.early_stop_patience):
    raise ConfigError("train.plateau_patience / train.early_stop_patience need a "
                      "validation split: set data.val_split or data.val_fraction > 0")
  mesh = parallel.make_mesh(devices)
  parallel.local_batch_size(t.batch_size, mesh)
  steps_per_epoch = pipeline.steps_per_epoch(train_split, t.batch_size)
  num_steps = config_lib.total_steps(config, steps_per_epoch)
  family, tx = build(config, train_split.source.spatial_ndim)
  shape = image_shape(config, train_split.source.spatial_ndim)
  metric = family.val_metric

  ckpt = checkpoint.Checkpoints(workdir, keep=t.keep_checkpoints)
  _prepare_workdir(config, workdir, ckpt)
  state = create_state(family, tx, shape, config.seed, mesh, ema=bool(t.ema_rate))
  if ckpt.latest_step() is not None:
    state = ckpt.restore(state)
    log.info("resumed from step %d in %s", int(state.step), ckpt.directory)
  start = int(state.step)
  log.info("training %s on %s: %d normal images, %d steps/epoch, %d steps, %d devices",
           config.model.name, train_split.source.name, len(train_split.normal_indices),
           steps_per_epoch, num_steps, mesh.devices.size)

  train_step = make_train_step(family, tx, config.seed, mesh, float(t.ema_rate),
                               (float(t.mutation_rate), int(config.data.bit_depth)))
  val_step = make_val_step(family, config.seed, mesh) if val_split else None
  batches = pipeline.train_batches(
      train_split, config.data, seed=config.seed, global_batch=t.batch_size,
      start_step=start, process_index=jax.process_index(),
      process_count=jax.process_count())
  writer = _Writer(workdir, is_main)
  bar = _progress(num_steps, start, is_main and t.progress_bar)
  summary = {"stopped_early": bool(state.stopped)}
  if np.isfinite(float(state.best_val)):
    summary[f"best_val_{metric}"] = float(state.best_val)
  pending, window, tick = None, [], time.perf_counter()
  step = start
  try:
    while step < num_steps and not int(state.stopped):
      batch = next(batches)
      state, metrics = train_step(state, parallel.put_batch(batch["image"], mesh))
      if pending is not None:  # check the previous step while this one runs
        window.append(jax.device_get(pending))
        _check_finite(window[-1], step)
      pending, step = metrics, step + 1
      bar.update(1)
      if step % t.log_every_steps == 0 or step == num_steps:
        window.append(jax.device_get(pending))
        _check_finite(window[-1], step)
        pending = None
        now = time.perf_counter()
        means = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
        means["images_per_second"] = len(window) * t.batch_size / (now - tick)
        means["learning_rate"] = learning_rate(state.opt_state)
        writer.scalars(step, {f"train/{k}": v for k, v in means.items()})
        bar.set_postfix(loss=f"{means['loss']:.4g}", img_s=f"{means['images_per_second']:.0f}")
        log.info("step %d: %s", step, ", ".join(f"{k}={v:.5g}" for k, v in means.items()))
        summary.update({f"train_{k}": v for k, v in means.items()})
        window, tick = [], time.perf_counter()
      if step % steps_per_epoch == 0 and val_split is not None:
        val = validation_loss(val_step, state, val_split, config, mesh)
        state = end_of_epoch(state, val, config, mesh)
        writer.scalars(step, {f"val/{metric}": val})
        log.info("epoch %d: validation %s %.5g per image", step // steps_per_epoch, metric, val)
        summary[f"val_{metric}"] = val
        summary[f"best_val_{metric}"] = float(state.best_val)
      if step % t.checkpoint_every_steps == 0 or step == num_steps or int(state.stopped):
        ckpt.save(step, state)
      if stop_at_step is not None and step >= stop_at_step:
        break
  finally:
    bar.close()
    writer.close()
    ckpt.close()
  summary.update(step=step, epoch=step / steps_per_epoch, num_steps=num_steps,
                 stopped_early=bool(int(state.stopped)), devices=mesh.devices.size,
                 train_step_compilations=train_step._cache_size())
  if int(state.stopped):
    log.info("early stopping: no validation improvement for %d epochs", t.early_stop_patience)
  if config.background.enabled and (step >= num_steps or int(state.stopped)):
    summary.update(train_background(config, workdir, devices=devices))
  return state, summary


def train_background(config: ml_collections.ConfigDict, workdir: str, *,
                     devices=None) -> dict:
  """Trains (or resumes) the likelihood ratio's background model in WORKDIR/background
  (`background.background_config`); its summary, keys prefixed background_."""
  directory = os.path.join(workdir, background.SUBDIR)
  log.info("training the background model (Ren et al.) in %s", directory)
  _, summary = train_and_evaluate(background.background_config(config), directory,
                                  devices=devices)
  return {f"{background.PREFIX}{k}": v for k, v in summary.items()}
