"""The train state: creation, optimiser, learning rate, and restore from a checkpoint.

Shared by the trainer, the eval binary, the grid and the benchmarks. The state is
created directly replicated on the mesh; a restore builds its target with
`jax.eval_shape` (shapes, dtypes, shardings) and never runs a real initialisation.
"""

import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxad import checkpoint, families, keys, parallel
from jaxad.data import pipeline


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


def image_shape(config: ml_collections.ConfigDict, spatial_ndim: int) -> tuple[int, ...]:
  """The model's input shape (spatial..., channels) after preprocessing."""
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


def build(config: ml_collections.ConfigDict, spatial_ndim: int):
  """The model family object and optimiser a config describes."""
  family = families.build(config, image_shape(config, spatial_ndim))
  return family, make_optimizer(config)


def _is_hyper(x) -> bool:
  """An optax.inject_hyperparams state (its class differs across optax versions)."""
  return hasattr(x, "hyperparams") and hasattr(x, "_replace")


def _learning_rate_array(opt_state) -> jax.Array:
  hyper = [s for s in jax.tree.leaves(opt_state, is_leaf=_is_hyper) if _is_hyper(s)]
  return hyper[0].hyperparams["learning_rate"]


def learning_rate(opt_state) -> float:
  """The current train.learning_rate (shared by every optimiser state)."""
  return float(_learning_rate_array(opt_state))


def with_learning_rate(opt_state, value: jax.Array):
  """opt_state with every injected learning rate replaced by `value` (already placed:
  a replicated scalar, or a grid's per-member array)."""
  def set_rate(s):
    if not _is_hyper(s):
      return s
    return s._replace(hyperparams={**s.hyperparams, "learning_rate": value})
  return jax.tree.map(set_rate, opt_state, is_leaf=_is_hyper)


def set_learning_rate(state: TrainState, value: float, mesh) -> TrainState:
  """The state with its learning rate set to `value`, replicated on the mesh."""
  dtype = _learning_rate_array(state.opt_state).dtype
  placed = parallel.put_replicated(jnp.asarray(value, dtype), mesh)
  return state.replace(opt_state=with_learning_rate(state.opt_state, placed))


def initial_state(family, tx, shape, seed: int, ema: bool = False) -> TrainState:
  """The freshly initialised state (pure: jit, vmap or eval_shape it)."""
  variables = family.init(keys.purpose_key(seed, keys.INIT), shape)
  params = variables.pop("params")
  init_opt = getattr(family, "init_opt_state", None)
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, model_state=dict(variables),
      opt_state=init_opt(tx, params) if init_opt else tx.init(params),
      ema_params=params if ema else {},
      best_val=jnp.full((), jnp.inf, jnp.float32),
      bad_epochs=jnp.zeros((), jnp.int32), stopped=jnp.zeros((), jnp.int32))


def create_state(family, tx, shape, seed, mesh, ema: bool = False) -> TrainState:
  """Initialises parameters directly replicated on every device of the mesh."""
  init = functools.partial(initial_state, family, tx, tuple(shape), seed, ema)
  return jax.jit(init, out_shardings=parallel.replicated(mesh))()


def abstract_state(family, tx, shape, seed, mesh, ema: bool = False) -> TrainState:
  """The state's shapes, dtypes and (replicated) shardings, without computing it."""
  shapes = jax.eval_shape(functools.partial(initial_state, family, tx, tuple(shape), seed,
                                            ema))
  sharding = parallel.replicated(mesh)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                      shapes)


def restore_state(ckpt, family, tx, shape, seed, mesh, ema: bool = False) -> TrainState:
  """The latest checkpoint of `ckpt` (a checkpoint.Checkpoints) as a replicated state."""
  return ckpt.restore(abstract_state(family, tx, shape, seed, mesh, ema))


def eval_params(state: TrainState):
  """The parameters evaluation uses: the EMA when the run keeps one."""
  return state.ema_params if state.ema_params else state.params


# WORKDIR/model.json, written by the trainer: the spatial rank and image shape of the
# model the checkpoints hold (jaxad.scorer restores from it without reading any data).
MODEL_JSON = "model.json"

@dataclasses.dataclass(frozen=True)
class Restored:
  """What evaluation needs of a workdir's latest checkpoint."""
  family: Any
  variables: Any  # {"params": the EMA where kept, else params; other collections}
  step: int
  stopped: bool  # early stopping ended its training
  directory: str  # the checkpoints folder it came from


def restore_for_eval(config: ml_collections.ConfigDict, workdir: str, spatial_ndim: int,
                     mesh) -> Restored:
  """A workdir's latest checkpoint, replicated on `mesh`, as evaluation uses it."""
  family, tx = build(config, spatial_ndim)
  ckpt = checkpoint.Checkpoints(workdir)
  try:
    state = restore_state(ckpt, family, tx, image_shape(config, spatial_ndim), config.seed,
                          mesh, bool(config.train.ema_rate))
  finally:
    ckpt.close()
  variables = {"params": eval_params(state), **state.model_state}
  return Restored(family, variables, int(state.step), bool(int(state.stopped)),
                  ckpt.directory)


def restore_variables(config: ml_collections.ConfigDict, workdir: str, spatial_ndim: int,
                      mesh):
  """(family, variables, step) of a workdir's latest checkpoint, replicated on `mesh`.

  The variables hold the EMA parameters when the run kept an EMA (score models).
  """
  r = restore_for_eval(config, workdir, spatial_ndim, mesh)
  return r.family, r.variables, r.step
