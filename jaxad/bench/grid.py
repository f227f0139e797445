"""The grid cases: K members in one vmapped step against K single-model steps.

Run only when named (`--case=grid`, `grid/mlp28`, ...). grid/<model>_vmapped8 times one
jitted vmapped step of 8 members (jaxad.grid.train) and grid/<model>_sequential8 8
separately jitted single-model steps, images/s per member; grid/runs8 trains the first
group of a grid config (--grid_config; by default `digits_grid_config()`, the config of
configs/grid_digits.py) with the grid, against the same 8 configs trained one after
another by the trainer, end to end.
"""

from collections.abc import Sequence
import logging
import os
import shutil
import tempfile
import time

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxad import defaults, keys
from jaxad.bench.cases import BATCH, LR, Setup, train_runner
from jaxad.bench.timing import QUICK, CaseTimer, Runner, Timing, log, xla_flops
from jaxad.errors import ConfigError
from jaxad.models import vae as vae_models
from jaxad.objectives import likelihood as likelihood_lib

GRID_K = 8
GRID_MODELS = {  # the FashionMNIST grid's MLP (Gaussian decoder) and the digits grid's conv VAE
    "mlp28": lambda: (vae_models.MLPVAE(image_shape=(28, 28, 1), latent_dim=20), (28, 28, 1)),
    "conv16": lambda: (vae_models.ConvVAE(image_shape=(16, 16, 1), latent_dim=16,
                                          widths=(16, 32), norm="batch",
                                          encoder_activation="leaky_relu",
                                          decoder_activation="relu"), (16, 16, 1)),
}
GRID_CASE_IDS = tuple(f"grid/{m}_{kind}{GRID_K}" for m in GRID_MODELS
                      for kind in ("vmapped", "sequential")) + (f"grid/runs{GRID_K}",)
GRID_DESCRIPTIONS = {
    "vmapped": f"{GRID_K} members (seeds 0..{GRID_K - 1}, beta=2) in one jitted vmapped "
               "step of jaxad.grid.train (per-member batch gathered by index, Adam, "
               "masking of stopped members)",
    "sequential": f"{GRID_K} separately jitted single-model steps (the trainer's step), "
                  "called one after another",
}
# grid/runs8's description, after the group's: the built-in config's, or the file's.
RUNS_DESCRIPTION = (": jaxad.grid.train.train_group vs 8 trainer.train_and_evaluate runs, "
                    "one device, compilation and data pipeline included")
DIGITS_GROUP = "configs/grid_digits.py group g000 (conv VAE 16x16, 8 members)"


def select_grid_cases(selectors: Sequence[str]) -> tuple[list[str], list[str]]:
  """(grid case ids, the other selectors): `grid` picks every grid case, `grid/mlp28`
  a prefix. Grid cases run only when selected by name."""
  sel = [s.strip() for item in selectors for s in item.split(",") if s.strip()]
  is_grid = lambda s: s == "grid" or s.startswith("grid/")
  chosen = [c for c in GRID_CASE_IDS if any(s == "grid" or (is_grid(s) and c.startswith(s))
                                            for s in sel)]
  unknown = [s for s in sel if is_grid(s) and not any(c.startswith(s) for c in GRID_CASE_IDS)
             and s != "grid"]
  if unknown:
    raise ValueError(f"unknown --case {unknown}; grid cases are {list(GRID_CASE_IDS)}")
  return chosen, [s for s in sel if not is_grid(s)]


# --------------------------------------------------------------------------
# Step cases: one vmapped step of K members against K single-model steps
# --------------------------------------------------------------------------
class SequentialRunner:
  """K single-model runners called one after another (one call = K steps)."""

  def __init__(self, runners: list[Runner]):
    self.runners = runners

  def __call__(self):
    return [r() for r in self.runners]


def _vmapped_runner(model, shape, images, seeds):
  """(runner, FLOP counter) of one step of the grid's vmapped trainer on K members."""
  from jaxad import parallel  # pylint: disable=import-outside-toplevel
  from jaxad.grid import train as grid_train  # pylint: disable=import-outside-toplevel
  tx = optax.inject_hyperparams(optax.adam)(learning_rate=LR)
  layout = grid_train.Layout.make(parallel.make_mesh(), GRID_K, BATCH)
  state = grid_train.init_state(model, "gaussian", tx, shape, seeds, [LR] * GRID_K, layout)
  step = grid_train.make_train_step(model, "gaussian", tx, layout)
  idx = layout.put(jnp.arange(GRID_K * BATCH, dtype=jnp.int32).reshape(GRID_K, BATCH),
                   layout.batch)
  betas = layout.put(jnp.full((GRID_K,), 2.0, jnp.float32))
  runner = Runner(step, (state, layout.put(images, layout.replicated), idx, betas,
                         layout.put(jnp.asarray(seeds, jnp.int32)),
                         layout.put(jnp.ones((GRID_K,), bool))), carry=True)
  return runner, lambda: xla_flops(runner.compiled())


def grid_runner(model_name: str, vmapped: bool, seed: int = 0):
  """(runner, a function counting its FLOPs per call) of one grid step case."""
  model, shape = GRID_MODELS[model_name]()
  images = jnp.asarray(np.random.default_rng(seed).uniform(
      -1, 1, (GRID_K * BATCH, *shape)), jnp.float32)
  seeds = list(range(seed, seed + GRID_K))
  if vmapped:
    return _vmapped_runner(model, shape, images, seeds)
  likelihood = likelihood_lib.Likelihood("gaussian", 2.0)
  runners = []
  for k, member_seed in enumerate(seeds):
    variables = model.init(keys.purpose_key(member_seed, keys.INIT),
                           jnp.zeros((1, *shape)), train=False)
    setup = Setup(model, flax.core.unfreeze(variables), images[k * BATCH:(k + 1) * BATCH],
                  likelihood)
    runners.append(train_runner(setup, keys.purpose_key(member_seed, keys.TRAIN)))
  return SequentialRunner(runners), lambda: GRID_K * xla_flops(runners[0].compiled())


def grid_step_record(case_id: str, timing: Timing, peak_gflops: float, seed: int = 0,
                     verbose: bool = False) -> dict:
  """Times one grid step case; images/s counts every member's images (K·B per call)."""
  model_name, kind = case_id.split("/")[1].rsplit("_", 1)
  vmapped = kind.startswith("vmapped")
  runner, count_flops = grid_runner(model_name, vmapped, seed)
  t0 = time.perf_counter()
  runner()
  compile_s = time.perf_counter() - t0
  flops = count_flops()
  timer = CaseTimer(runner, timing)
  for _ in range(timing.rounds):
    timer.run_round()
  r = timer.summary()
  sec, images = r["sec_per_call_median"], GRID_K * BATCH
  r.update(members=GRID_K, batch_per_member=BATCH, compile_s=compile_s,
           description=GRID_DESCRIPTIONS["vmapped" if vmapped else "sequential"],
           images_per_s=images / sec, images_per_s_per_member=BATCH / sec,
           flops_per_call=flops, gflops=flops / sec / 1e9,
           fraction_of_peak=flops / sec / 1e9 / peak_gflops)
  log(f"{case_id:28s} {r['images_per_s_per_member']:9.1f} images/s per member "
      f"(compile {compile_s:.2f} s)", verbose)
  return r


# --------------------------------------------------------------------------
# grid/runs8: a grid config's first group, trained by the grid and by the trainer
# --------------------------------------------------------------------------
def digits_grid_config() -> ml_collections.ConfigDict:
  """configs/grid_digits.py's config, built here: configs/digits_vae.py's conv VAE on
  16×16 digits with synthetic lesions; members c × left-out class × seed (8), groups
  by latent size (4, 16)."""
  from jaxad.grid import axes as grid_axes  # pylint: disable=import-outside-toplevel
  c = grid_axes.with_grid(defaults.get_config())
  c.data.source = "digits"  # configs/digits_vae.py
  c.data.anomalous_classes = (9,)
  c.data.channels = 1
  c.model.name = "conv_vae"
  c.model.latent_dim = 16
  c.model.norm = "batch"
  c.model.beta = 0.05
  c.train.checkpoint_every_steps = 300
  c.data.image_size = 16  # configs/grid_digits.py
  c.data.synthetic_lesions.enabled = True
  c.model.widths = (16, 32)
  c.train.batch_size = 32
  c.train.num_epochs = 8
  c.train.learning_rate = 2e-3
  c.train.log_every_steps = 60
  c.eval.num_samples = 8
  c.eval.bootstrap = 0
  c.grid.axes = ml_collections.ConfigDict({
      "c": (0.025, 0.25), "left_out_class": (1, 7), "seed": (0, 1), "latent_dim": (4, 16)})
  return c


def _first_group(grid_config: str, steps: int):
  """The first group of the grid config file (or of `digits_grid_config()` for ""),
  each member trained for `steps` steps."""
  from jaxad.grid import axes as grid_axes  # pylint: disable=import-outside-toplevel
  config = grid_axes.load_experiment(grid_config) if grid_config else digits_grid_config()
  config.train.num_steps = steps
  config.train.progress_bar = False
  config.train.checkpoint_every_steps = steps
  group = grid_axes.plan(config)[0]
  if len(group.members) != GRID_K:
    raise ConfigError(f"--grid_config {grid_config or '(built in)'}: grid/runs{GRID_K} "
                      f"needs a first group of {GRID_K} members, not {len(group.members)}")
  return group


def _train_both(group, scratch: str) -> tuple[float, float]:
  """(seconds of the grid training the group, of the trainer running each member)."""
  from jaxad import parallel, trainer  # pylint: disable=import-outside-toplevel
  from jaxad.grid import train as grid_train  # pylint: disable=import-outside-toplevel
  mesh = parallel.make_mesh(jax.devices()[:1])
  quiet = logging.getLogger("jaxad")
  level = quiet.level
  quiet.setLevel(logging.WARNING)  # the trainer's and the grid's progress lines
  try:
    t0 = time.perf_counter()
    grid_train.train_group(group, os.path.join(scratch, "grid"), mesh, progress=False)
    grid_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for m in group.members:
      trainer.train_and_evaluate(m.config, os.path.join(scratch, f"run{m.index}"),
                                 devices=jax.devices()[:1])
    return grid_s, time.perf_counter() - t0
  finally:
    quiet.setLevel(level)


def grid_runs_record(steps: int, verbose: bool = False, grid_config: str = "") -> dict:
  """End to end: the grid config's first group (8 members, `steps` steps each) trained
  by the grid against the same 8 configs trained by `trainer` one after another,
  compilation and data included; images/s per member = every member's images / wall / K."""
  group = _first_group(grid_config, steps)
  batch = group.config.train.batch_size
  images = GRID_K * steps * batch
  scratch = tempfile.mkdtemp(prefix="jaxad_bench_grid_")
  try:
    grid_s, runs_s = _train_both(group, scratch)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  source = f"{grid_config} group {group.name} ({GRID_K} members)" if grid_config \
      else DIGITS_GROUP
  r = dict(members=GRID_K, steps=steps, batch_per_member=batch,
           description=source + RUNS_DESCRIPTION,
           grid_s=grid_s, sequential_runs_s=runs_s,
           grid_images_per_s_per_member=images / grid_s / GRID_K,
           sequential_images_per_s_per_member=images / runs_s / GRID_K,
           speedup=runs_s / grid_s)
  log(f"grid/runs{GRID_K}: grid {grid_s:.1f} s, {GRID_K} runs {runs_s:.1f} s "
      f"(x{r['speedup']:.1f})", verbose)
  return r


def run_grid_cases(case_ids: Sequence[str], timing: Timing, peak_gflops: float,
                   verbose: bool = False, grid_config: str = "") -> dict:
  """Every selected grid case: step records and, with grid/runs8, the end-to-end one."""
  out = {}
  for cid in case_ids:
    if cid.startswith("grid/runs"):
      out[cid] = grid_runs_record(60 if timing == QUICK else 240, verbose, grid_config)
    else:
      out[cid] = grid_step_record(cid, timing, peak_gflops, verbose=verbose)
  for m in GRID_MODELS:
    v, s = out.get(f"grid/{m}_vmapped{GRID_K}"), out.get(f"grid/{m}_sequential{GRID_K}")
    if v and s:
      v["speedup_over_sequential"] = v["images_per_s"] / s["images_per_s"]
  return out


def grid_table(grid: dict) -> str:
  """One row per grid case: images/s per member (and the speed-up where paired)."""
  rows = ["| grid case | images/s per member | compile s | speed-up |", "|---|---|---|---|"]
  for cid, r in grid.items():
    if "grid_s" in r:
      rows.append(f"| {cid} (grid) | {r['grid_images_per_s_per_member']:.1f} | incl. | "
                  f"{r['speedup']:.2f} |")
      rows.append(f"| {cid} (8 trainer runs) | "
                  f"{r['sequential_images_per_s_per_member']:.1f} | incl. | 1 |")
      continue
    up = r.get("speedup_over_sequential")
    rows.append(f"| {cid} | {r['images_per_s_per_member']:.1f} | {r['compile_s']:.2f} | "
                f"{'-' if up is None else f'{up:.2f}'} |")
  return "\n".join(rows)
