"""The training loop: config → data → model → jit-compiled steps → checkpoints and logs.

`train_and_evaluate(config, workdir)` is the library function behind `python -m
jaxad.train`; it returns the final state and a summary so tests can check numbers.
Random keys come from `config.seed` and the step (`fold_in`), and data order from the
seed and the epoch, so a run restarted from its latest checkpoint draws exactly what an
uninterrupted run draws and ends with the same parameters.
"""

import dataclasses
import functools
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow as tf

from jaxad import background, checkpoint, compile_options, families, files, keys, parallel
from jaxad import config as config_lib
from jaxad import device_data
from jaxad import schedule
from jaxad import state as state_lib
from jaxad.data import pipeline
from jaxad.errors import CheckpointError
from jaxad.state import TrainState

log = logging.getLogger("jaxad")


def make_train_step(family, tx, seed, mesh, ema_rate: float = 0.0,
                    mutation: tuple[float, int] = (0.0, 8), on_device: bool = False):
  """The jit-compiled step: the family's update (by default the gradient of its loss
  and Adam), the EMA, metrics. `mutation` = (rate, bit_depth) perturbs the inputs first
  (`background.mutate`, the background model of a likelihood ratio).

  step(state, images) takes a batch placed by `parallel.put_batch`; with `on_device`,
  step(state, device images, rows) gathers the batch from data kept on the devices
  (`device_data`)."""
  train_key = keys.purpose_key(seed, keys.TRAIN)
  mutation_key = keys.purpose_key(seed, keys.MUTATION)
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

  replicated, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  if on_device:
    gathered = lambda state, images, rows: step(state, device_data.gather(images, rows, mesh))
    return compile_options.jit(gathered, in_shardings=(replicated, sharded, replicated),
                               out_shardings=(replicated, replicated), donate_argnums=0)
  return compile_options.jit(step, in_shardings=(replicated, sharded),
                             out_shardings=(replicated, replicated), donate_argnums=0)


def make_val_step(family, seed, mesh):
  """Masked sums of the family's per-image validation loss over one padded batch."""
  val_key = keys.purpose_key(seed, keys.VAL)

  def step(state: TrainState, images, valid, batch_index):
    rng = jax.random.fold_in(val_key, batch_index)
    variables = {"params": state_lib.eval_params(state), **state.model_state}
    return jnp.sum(family.val_loss(variables, images, rng) * valid), jnp.sum(valid)

  return compile_options.jit(step)


def validation_batches(split, config, mesh) -> Iterator[tuple[jax.Array, jax.Array]]:
  """(images, valid) of each padded batch of the split's normal images, on the devices."""
  batches = pipeline.eval_batches(
      split, config.data, global_batch=config.train.batch_size, normal_only=True,
      process_index=jax.process_index(), process_count=jax.process_count())
  for batch in batches:
    yield parallel.put_batch((batch["image"], batch["valid"]), mesh)


def validation_loss(val_step, state, batches) -> float:
  """Mean validation loss per image over `validation_batches`."""
  total, count = 0.0, 0.0
  for i, (images, valid) in enumerate(batches):
    s, n = val_step(state, images, valid, i)
    total, count = total + float(s), count + float(n)
  return total / count


def end_of_epoch(state: TrainState, val_loss: float, config, mesh) -> TrainState:
  """Reduce-on-plateau and early stopping on the validation loss (Zimmerer et al.)."""
  old_lr = state_lib.learning_rate(state.opt_state)
  best, bad, lr, stop = schedule.plateau_schedule(float(state.best_val), int(state.bad_epochs),
                                                  old_lr, val_loss, config.train)
  if lr != old_lr:
    log.info("validation loss plateaued for %d epochs: learning rate -> %.3g", bad, lr)
    state = state_lib.set_learning_rate(state, lr, mesh)
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


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _check_finite_params(state: TrainState, step: int, ckpt) -> None:
  """Refuses to checkpoint non-finite parameters; names the last good checkpoint."""
  if bool(_all_finite((state.params, state.ema_params))):
    return
  last = ckpt.latest_step()
  where = (f"the last good checkpoint is step {last} in {ckpt.directory}" if last is not None
           else "no checkpoint was saved")
  raise FloatingPointError(
      f"training diverged by step {step}: non-finite parameters, not saved ({where}). "
      "Lower train.learning_rate (or set train.grad_clip) and run the same command again.")


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


def _check_workdir(config, workdir: str) -> None:
  """A workdir with checkpoints resumes only under its own config (`check_compatible`),
  checked before any data is read or any folder made; config.json always describes
  its checkpoints."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory) or not any(s.isdigit() for s in os.listdir(directory)):
    return
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise CheckpointError(
        f"{directory} holds checkpoints but {path} is missing, so nothing says which "
        "config they were trained with: use a new --workdir, or restore config.json")
  config_lib.check_compatible(files.read_json(path), config, workdir)


@dataclasses.dataclass
class _Run:
  """Everything one training run holds fixed: data, mesh, model, steps, checkpoints."""
  config: ml_collections.ConfigDict
  train_split: Any
  val_split: Any
  mesh: Any
  family: Any
  tx: Any
  steps_per_epoch: int
  num_steps: int
  ckpt: checkpoint.Checkpoints
  on_device: bool = False  # data.on_device: the train and val images live on the devices
  val_batches: Any = None  # with on_device: the validation batches, placed once


def _setup(config, workdir: str, devices) -> tuple[_Run, TrainState]:
  """Loads the splits, builds the model and the mesh, and creates or restores the state."""
  t = config.train
  _check_workdir(config, workdir)
  train_split = pipeline.load_split(config.data, "train")
  val_split = pipeline.load_split(config.data, "val")
  schedule.check_validation(val_split is not None, schedule.needs_validation(t))
  mesh = parallel.make_mesh(devices)
  parallel.local_batch_size(t.batch_size, mesh)
  steps_per_epoch = pipeline.steps_per_epoch(train_split, t.batch_size)
  ndim = train_split.source.spatial_ndim
  family, tx = state_lib.build(config, ndim)
  run = _Run(config, train_split, val_split, mesh, family, tx, steps_per_epoch,
             config_lib.total_steps(config, steps_per_epoch),
             checkpoint.Checkpoints(workdir, keep=t.keep_checkpoints),
             device_data.wanted(config.data, (train_split, val_split), mesh))
  if jax.process_index() == 0:
    files.write_json(os.path.join(workdir, "config.json"), config_lib.to_dict(config))
    files.write_json(os.path.join(workdir, state_lib.MODEL_JSON),  # what restoring it needs to know
                     {"spatial_ndim": ndim,
                      "image_shape": list(state_lib.image_shape(config, ndim))})
  args = (family, tx, state_lib.image_shape(config, ndim), config.seed, mesh, bool(t.ema_rate))
  if run.ckpt.latest_step() is None:
    return run, state_lib.create_state(*args)
  state = state_lib.restore_state(run.ckpt, *args)
  log.info("resumed from step %d in %s", int(state.step), run.ckpt.directory)
  return run, state


class _Log:
  """The training metrics of each log window. Steps add their metrics as device arrays,
  and nothing is read back until a log, validation or checkpoint step (`check`), so
  the host dispatches step after step without waiting for one to finish. `check`
  fetches the window at once and names the first step whose metrics are not finite."""

  def __init__(self, run: _Run, workdir: str, start: int, summary: dict):
    is_main = jax.process_index() == 0
    self.writer = _Writer(workdir, is_main)
    self.bar = _progress(run.num_steps, start, is_main and run.config.train.progress_bar)
    self.batch_size, self.summary = run.config.train.batch_size, summary
    self.pending, self.window, self.tick = [], [], time.perf_counter()

  def add(self, metrics, step: int) -> None:
    """Records a step's metrics, still on the device."""
    self.pending.append((step, metrics))
    self.bar.update(1)

  def check(self) -> None:
    """Fetches the steps added since the last check; raises at the first non-finite."""
    if not self.pending:
      return
    steps, values = zip(*self.pending)
    self.pending = []
    for step, fetched in zip(steps, jax.device_get(values)):
      _check_finite(fetched, step)
      self.window.append(fetched)

  def flush(self, step: int, state: TrainState) -> None:
    """Logs the window's means at `step`."""
    self.check()
    now = time.perf_counter()
    means = {k: float(np.mean([w[k] for w in self.window])) for k in self.window[0]}
    means["images_per_second"] = len(self.window) * self.batch_size / (now - self.tick)
    means["learning_rate"] = state_lib.learning_rate(state.opt_state)
    self.writer.scalars(step, {f"train/{k}": v for k, v in means.items()})
    self.bar.set_postfix(loss=f"{means['loss']:.4g}",
                         img_s=f"{means['images_per_second']:.0f}")
    log.info("step %d: %s", step, ", ".join(f"{k}={v:.5g}" for k, v in means.items()))
    self.summary.update({f"train_{k}": v for k, v in means.items()})
    self.window, self.tick = [], time.perf_counter()

  def close(self) -> None:
    self.bar.close()
    self.writer.close()


def _validate_epoch(run: _Run, val_step, state, step: int, logs: _Log) -> TrainState:
  """The validation loss at an epoch's end, then the plateau and early-stop schedule."""
  metric = run.family.val_metric
  batches = run.val_batches or validation_batches(run.val_split, run.config, run.mesh)
  val = validation_loss(val_step, state, batches)
  state = end_of_epoch(state, val, run.config, run.mesh)
  logs.writer.scalars(step, {f"val/{metric}": val})
  log.info("epoch %d: validation %s %.5g per image", step // run.steps_per_epoch, metric, val)
  logs.summary[f"val_{metric}"] = val
  logs.summary[f"best_val_{metric}"] = float(state.best_val)
  return state


def _step_inputs(run: _Run, step: int) -> Iterator[tuple]:
  """The train step's arguments after the state, from `step` on: (device images, rows)
  with data.on_device, else (images,) streamed; both prefetched to the devices."""
  config, t = run.config, run.config.train
  if run.on_device:
    resident = device_data.place(run.train_split, config.data, run.mesh)
    if run.val_split is not None:
      run.val_batches = list(validation_batches(run.val_split, config, run.mesh))
    rows = device_data.batch_rows(run.train_split, resident, seed=config.seed,
                                  global_batch=t.batch_size, start_step=step)
    put = lambda r: parallel.put_replicated(r, run.mesh)
    return ((resident.images, r) for r in parallel.prefetch_to_device(
        rows, run.mesh, t.prefetch_to_device, put=put))
  batches = pipeline.train_batches(
      run.train_split, config.data, seed=config.seed, global_batch=t.batch_size,
      start_step=step, process_index=jax.process_index(),
      process_count=jax.process_count())
  return ((images,) for images in parallel.prefetch_to_device(
      (b["image"] for b in batches), run.mesh, t.prefetch_to_device))


def _loop(run: _Run, state: TrainState, logs: _Log, stop_at_step) -> tuple[TrainState, int]:
  """Steps from the state's step to the end (or early stop, or stop_at_step)."""
  config, t = run.config, run.config.train
  train_step = make_train_step(run.family, run.tx, config.seed, run.mesh, float(t.ema_rate),
                               (float(t.mutation_rate), int(config.data.bit_depth)),
                               run.on_device)
  val_step = make_val_step(run.family, config.seed, run.mesh) if run.val_split else None
  step = int(state.step)
  inputs = _step_inputs(run, step) if step < run.num_steps else iter(())
  stopped = bool(int(state.stopped))  # changes only at an epoch's end
  while step < run.num_steps and not stopped:
    state, metrics = train_step(state, *next(inputs))
    step += 1
    logs.add(metrics, step)
    if schedule.due(step, t.log_every_steps, run.num_steps):
      logs.flush(step, state)
    if val_step is not None and schedule.due(step, run.steps_per_epoch):
      logs.check()  # a diverged step is named before validation reads its state
      state = _validate_epoch(run, val_step, state, step, logs)
      stopped = bool(int(state.stopped))
    if schedule.due(step, t.checkpoint_every_steps, run.num_steps) or stopped:
      logs.check()  # never save the state of a step whose loss was not finite
      _check_finite_params(state, step, run.ckpt)
      run.ckpt.save(step, state)
    if stop_at_step is not None and step >= stop_at_step:
      break
  logs.check()
  logs.summary["train_step_compilations"] = train_step._cache_size()
  return state, step


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
  if jax.process_index() == 0:
    files.log_to_file(workdir)
  t = config.train
  run, state = _setup(config, workdir, devices)
  log.info("training %s on %s: %d normal images, %d steps/epoch, %d steps, %d devices",
           config.model.name, run.train_split.source.name,
           len(run.train_split.normal_indices), run.steps_per_epoch, run.num_steps,
           run.mesh.devices.size)
  summary = {"stopped_early": bool(state.stopped)}
  if np.isfinite(float(state.best_val)):
    summary[f"best_val_{run.family.val_metric}"] = float(state.best_val)
  logs = _Log(run, workdir, int(state.step), summary)
  try:
    state, step = _loop(run, state, logs, stop_at_step)
  finally:
    logs.close()
    run.ckpt.close()
  summary.update(step=step, epoch=step / run.steps_per_epoch, num_steps=run.num_steps,
                 stopped_early=bool(int(state.stopped)), devices=run.mesh.devices.size)
  if int(state.stopped):
    log.info("early stopping: no validation improvement for %d epochs", t.early_stop_patience)
  if config.background.enabled and (step >= run.num_steps or int(state.stopped)):
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
