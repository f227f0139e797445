"""Benchmarks jaxad's models on the PyTorch reference's cases: `python -m jaxad.bench`.

    python -m jaxad.bench                       # every case, the reference's full protocol
    python -m jaxad.bench --quick               # fewer repeats (same shapes), a few minutes
    python -m jaxad.bench --case=conv64 --case=mlp28/train_step,score_elbo
    python -m jaxad.bench --list                # the case ids
    python -m jaxad.bench --torch_json=peer_torch_results.json,peer_torch_gan.json
    python -m jaxad.bench --quick --case=grid   # vmapped grid of 8 members vs 8 runs

Grid cases (only when named: `grid`, `grid/mlp28`, ...): one jitted vmapped step of 8
members (jaxad.grid_train) against 8 separately jitted single-model steps, images/s per
member; and grid/runs8, configs/grid_digits.py's first group trained by the grid
against the same 8 configs trained one after another by the trainer, end to end.

Each case does the work of the same-named case of /work/shared/bench/peer_torch.py on a
fixed float32 batch of B = 32 images (uniform in [-1, 1]), with its random draws made
inside the jitted function:

  train_step      train mode: encode, 1 sample, decode, mean_b(train_rec + beta·KL),
                  gradients w.r.t. the parameters, Adam(1e-4) update, new batch stats
  score_elbo      eval: encode, 1 sample, decode; per-image rec, KL, rec + KL
  score_iwae_L15  eval: encode once, one decoder call on 15·B latents, the six
                  vae/iwae scores of `jaxad.scores.sample_scores` (the reference's
                  score_iwae_L15_batched)
  pixel_grads     eval: `jaxad.scores.pixel_maps` (rec error, ELBO/KL/rec input
                  gradients, combi): one forward, two reverse passes to x (KL, rec;
                  the ELBO gradient is their sum) and a decode of mu for rec_error,
                  about 3E + 3D where the reference's three reverse passes do 4E + 3D

and for score64 (the 64×64×3 score U-Net, `jaxad.models.unet.score_unet_64`, continuous
VP-SDE β 0.1..20):

  train_step      t ~ U(1e-5, 1), x_t = a(t)x + σ(t)ε, σ²-weighted DSM loss (mean over
                  elements of (ε_θ(x_t, 999t) − ε)²), gradients, Adam(1e-4) update
  score_map       eval: one forward at t = 1e-3 on the clean batch, score = −ε_θ/σ(t),
                  map = mean over channels of |score| (SANO's map before smoothing)

and for gan (configs/mnist_gan.py's DCGAN, 28×28, latent 100, widths 64/128; the cases
of /work/shared/bench/peer_torch_gan.py, whose ids are dcgan28/...):

  train_step      batch 64: one discriminator update on real + G(z) and one generator
                  update on fresh z (jaxad.families.gan's train_update), Adam(2e-4, β1 0.5)
  latent_search   batch 32: 100 SGD-momentum steps of AnoGAN's search on z, every image
                  at once; the gan scores and the residual map

Reported per case: compile time (first call, compilation included), the median seconds
per call (timing as the reference: interleaved rounds of warm-up and repeats of
back-to-back calls, each call waited on with `jax.block_until_ready`), images/s, FLOPs
per image from XLA's cost analysis of the compiled function (it counts elementwise ops
too, but no conv taps that fall on padding; the reference counts every tap of matmuls
and convolutions only, so its conv counts are higher), achieved GFLOP/s and its
fraction of the peak measured at start (best median rate of jitted float32 square
`jnp.dot`s). Results go to --out (JSON, written atomically) and a markdown table.
"""

from collections.abc import Callable, Sequence
import dataclasses
import datetime as dt
import functools
import logging
import math
import os
import platform
import statistics
import sys
import time

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxad import compile_options, families, files
from jaxad.families import score as score_family
from jaxad.families import vae as vae_family
from jaxad.models import unet as unet_models
from jaxad.models import vae as vae_models
from jaxad.objectives import likelihood as likelihood_lib
from jaxad.objectives import sde as sde_lib
from jaxad.objectives import vae as vae_objectives
from jaxad.scores import pixel as pixel_scores
from jaxad.scores import sample as sample_scores

BATCH = 32
IWAE_L = 15
LR = 1e-4
PEAK_SIZES = (1024, 2048)  # square float32 matmuls behind the peak rate
VAE_CASES = ("train_step", "score_elbo", f"score_iwae_L{IWAE_L}", "pixel_grads")
SCORE_CASES = ("train_step", "score_map")
GAN_STEPS = 100  # latent-search steps per image (the thesis's MNIST protocol)
MODEL_CASES = {"conv128": VAE_CASES, "conv64": VAE_CASES, "mlp28": VAE_CASES,
               "score64": SCORE_CASES, "gan": ("train_step", "latent_search")}
MODELS = tuple(MODEL_CASES)
CASES = tuple(dict.fromkeys(c for cases in MODEL_CASES.values() for c in cases))
CASE_IDS = tuple(f"{m}/{c}" for m, cases in MODEL_CASES.items() for c in cases)
# The reference's case for each of ours (for --torch_json): peer_torch.py's ids, and
# peer_torch_gan.py's for the MNIST DCGAN.
TORCH_CASE = {f"score_iwae_L{IWAE_L}": f"score_iwae_L{IWAE_L}_batched"}
TORCH_MODEL = {"gan": "dcgan28"}
# Cases whose batch is not BATCH: the DCGAN reference trains on batches of 64.
CASE_BATCH = {"gan/train_step": 64}
GAN_LR, GAN_B1 = 2e-4, 0.5  # configs/mnist_gan.py's Adam, as the reference
# MFLOP per image of the reference (matmul/conv only), from its README results table.
REFERENCE_MFLOP = {
    "conv128/train_step": 1717.8, "conv128/score_elbo": 576.8,
    "conv128/score_iwae_L15": 4579.9, "conv128/pixel_grads": 2021.2,
    "conv64/train_step": 122.2, "conv64/score_elbo": 40.9,
    "conv64/score_iwae_L15": 312.5, "conv64/pixel_grads": 144.2,
    "mlp28/train_step": 7.1, "mlp28/score_elbo": 2.6,
    "mlp28/score_iwae_L15": 20.5, "mlp28/pixel_grads": 9.0,
    "score64/train_step": 35338.7, "score64/score_map": 11784.3,
}
DESCRIPTIONS = {
    "train_step": "train mode; 1 reparameterised sample; loss=mean_b(train_rec+beta*KL); "
                  "grads w.r.t. params; Adam(lr=1e-4) update; batch stats updated",
    "score_elbo": "eval; encode, 1 sample, decode; per-image rec, KL, rec+KL",
    f"score_iwae_L{IWAE_L}": f"eval; encode once; one decode of {IWAE_L}*B latents; "
                             "vae, vae_kl, vae_rec, iwae, iwae_kl, iwae_rec",
    "pixel_grads": "eval; jaxad.scores.pixel_maps: one forward, KL and rec pullbacks to x, "
                   "decode(mu) for rec_error; rec_error, elbo/kl/rec grad maps, combi",
    "score64/train_step": "t~U(1e-5,1), x_t=a(t)x+s(t)eps, loss=mean((net(x_t,999t)-eps)^2) "
                          "(DSM, lambda=s^2); grads w.r.t. params; Adam(lr=1e-4) update",
    "score64/score_map": "eval; one forward at t=1e-3 on the clean batch; score=-net/s(t); "
                         "map=mean_c|score|",
    "gan/train_step": "batch 64; one discriminator update (real + G(z) with fresh z, "
                      "BatchNorm in train mode) and one generator update (fresh z, "
                      "non-saturating), Adam(2e-4, b1=0.5) each: jaxad.families.gan's "
                      "train_update",
    "gan/latent_search": f"eval; AnoGAN latent search, {GAN_STEPS} SGD-momentum steps on z "
                         "for every image of the batch at once (MNIST DCGAN 28x28, latent "
                         "100); gan, gan_residual, gan_feature and the residual map",
}
FLOPS_NOTE = ("XLA cost analysis of the compiled function: every op, elementwise included, "
              "conv taps on padding excluded; the reference counts 2*MAC of every conv/mm "
              "tap only")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A benchmarked VAE: its constructor, input shape (H, W, C) and likelihood."""

  build: Callable[[], nn.Module]
  image_shape: tuple[int, ...]
  likelihood: likelihood_lib.Likelihood


# The reference's continuous VP-SDE for score64 (beta 0.1..20, t_eps 1e-5, label 999·t).
SCORE64_SDE = sde_lib.VPSDE(beta_min=0.1, beta_max=20.0, num_scales=1000, t_eps=1e-5)
SCORE64_MAP_T = 1e-3

SPECS = {
    "conv128": ModelSpec(vae_models.conv_vae_128, (128, 128, 3),
                         likelihood_lib.Likelihood("gaussian", 0.01)),
    "conv64": ModelSpec(vae_models.conv_vae_64, (64, 64, 1),
                        likelihood_lib.Likelihood("gaussian", 1.0)),
    "mlp28": ModelSpec(vae_models.mlp_vae_28, (28, 28, 1),
                       likelihood_lib.Likelihood("bernoulli", 1.0)),
    "score64": ModelSpec(unet_models.score_unet_64, (64, 64, 3), None),
    "gan": ModelSpec(lambda: _mnist_gan(), (28, 28, 1), None),
}


def _mnist_gan():
  """configs/mnist_gan.py's DCGAN (widths 64, 128; latent 100) as a GAN family object."""
  from jaxad.families import gan as gan_family  # pylint: disable=import-outside-toplevel
  from jaxad.models import gan as gan_models  # pylint: disable=import-outside-toplevel
  widths = (64, 128)
  return gan_family.GAN(generator=gan_models.Generator((28, 28, 1), 100, widths),
                        discriminator=gan_models.Discriminator((28, 28, 1), widths),
                        latent_steps=GAN_STEPS, latent_lr=1e-3)


@dataclasses.dataclass(frozen=True)
class Timing:
  """The reference's protocol: `rounds` interleaved rounds over all cases.

  Per round and case: `warmup` untimed calls, then repeats of `inner` back-to-back
  calls; `inner` is fixed in round 1 so a repeat lasts >= min_repeat_s, and a round
  has clamp(budget_s / rounds / repeat time, min, max) repeats (min/max_repeats split
  over the rounds).
  """

  rounds: int = 3
  warmup: int = 1
  min_repeats: int = 6
  max_repeats: int = 15
  budget_s: float = 30.0
  min_repeat_s: float = 0.25
  peak_repeats: int = 7
  peak_min_s: float = 0.5


FULL = Timing()
QUICK = Timing(rounds=1, warmup=1, min_repeats=3, max_repeats=5, budget_s=4.0,
               min_repeat_s=0.1, peak_repeats=3, peak_min_s=0.2)


# --------------------------------------------------------------------------
# Case selection
# --------------------------------------------------------------------------
def _matches(selector: str, case_id: str) -> bool:
  model, case = case_id.split("/")
  return selector in (model, case_id) or case.startswith(selector) or \
      case_id.startswith(selector)


def select_cases(selectors: Sequence[str]) -> list[str]:
  """The case ids picked by the selectors, in table order.

  A selector is a model (`conv64`), a case or case prefix (`train_step`, `score_iwae`),
  or `model/case`; items may be comma lists. No selectors picks every case. An
  unknown selector raises ValueError naming the valid ones.
  """
  sel = [s.strip() for item in selectors for s in item.split(",") if s.strip()]
  unknown = [s for s in sel if not any(_matches(s, c) for c in CASE_IDS)]
  if unknown:
    raise ValueError(
        f"unknown --case {unknown}; choose models {list(MODELS)}, cases {list(CASES)} "
        f"or model/case ids {list(CASE_IDS)} (comma lists and case prefixes work)")
  return [c for c in CASE_IDS if not sel or any(_matches(s, c) for s in sel)]


# --------------------------------------------------------------------------
# Cases: each is a jitted function and its arguments
# --------------------------------------------------------------------------
class Runner:
  """Calls a jitted case; with `carry`, its first output replaces the first argument."""

  def __init__(self, fn: Callable, args: tuple, carry: bool = False):
    self.fn, self.args, self.carry = fn, args, carry

  def __call__(self):
    out = self.fn(*self.args)
    if self.carry:
      self.args = (out[0], *self.args[1:])
    return jax.block_until_ready(out)

  def compiled(self):
    """The compiled executable (from jit's cache once the runner has been called)."""
    return self.fn.lower(*self.args).compile()


@dataclasses.dataclass(frozen=True)
class Setup:
  """A model with initialised variables and its fixed input batch."""

  model: nn.Module
  variables: dict
  x: jax.Array
  likelihood: likelihood_lib.Likelihood | None


def make_setup(name: str, seed: int = 0, batch: int = BATCH) -> Setup:
  """The model `name`, its variables (jitted init) and a uniform [-1, 1] batch."""
  spec = SPECS[name]
  model = spec.build()
  x = np.random.default_rng(seed).uniform(-1, 1, (batch, *spec.image_shape))
  x = jnp.asarray(x, jnp.float32)
  if name == "gan":  # a family object: init(rng, shape)
    variables = jax.jit(model.init, static_argnums=1)(jax.random.key(seed), spec.image_shape)
    return Setup(model, variables, x, None)
  init = jax.jit(functools.partial(model.init, train=False))
  extra = () if spec.likelihood else (jnp.zeros((1,), jnp.float32),)  # the time label
  variables = flax.core.unfreeze(init(jax.random.key(seed), x[:1], *extra))
  return Setup(model, variables, x, spec.likelihood)


def _train_runner(s: Setup, key: jax.Array) -> Runner:
  """train_step: one step of the trainer's update with the family's loss and Adam: the
  VAE's or score64's σ²-weighted DSM through `families.gradient_update` with Adam(LR),
  or the GAN family's own `train_update` (one D and one G update) with Adam(2e-4, 0.5)."""
  if isinstance(s.model, nn.Module):
    family = (vae_family.VAE(s.model, s.likelihood) if s.likelihood is not None
              else score_family.ScoreModel(s.model, SCORE64_SDE))
    tx = optax.adam(LR)
    update = functools.partial(families.gradient_update, family)
    opt_state = tx.init(s.variables["params"])
  else:  # the GAN family object
    tx = optax.adam(GAN_LR, b1=GAN_B1)
    update = s.model.train_update
    opt_state = s.model.init_opt_state(tx, s.variables["params"])
  params = s.variables["params"]
  model_state = {k: v for k, v in s.variables.items() if k != "params"}
  # Copies: the step donates its state, and the eval cases share s.variables.
  state = jax.tree.map(jnp.copy, (params, model_state, opt_state, jnp.zeros((), jnp.int32)))

  def step(state, x, key):
    params, model_state, opt_state, count = state
    params, model_state, opt_state, metrics = update(
        tx, params, model_state, opt_state, x, jax.random.fold_in(key, count))
    return (params, model_state, opt_state, count + 1), metrics["loss"]  # jit drops the rest

  return Runner(compile_options.jit(step, donate_argnums=0), (state, s.x, key), carry=True)


def _score_map(model, variables, x):
  """score64/score_map: the SANO map before smoothing, mean_c |s_θ(x, t = 1e-3)|."""
  apply = lambda x_t, label: model.apply(variables, x_t, label, train=False)
  t = jnp.full((x.shape[0],), SCORE64_MAP_T, jnp.float32)
  score = sde_lib.make_score_fn(SCORE64_SDE, apply)(x, t)
  return jnp.mean(jnp.abs(score), axis=-1)


def _score_elbo(model, likelihood, variables, x, key):
  terms, _ = vae_objectives.vae_terms(model, variables, x, key, likelihood, train=False)
  return terms.rec, terms.kl, terms.neg_elbo


def _score_iwae(model, likelihood, variables, x, key):
  return sample_scores.sample_scores(model, variables, x, key, likelihood, IWAE_L)


def _pixel_grads(model, likelihood, variables, x, key):
  return pixel_scores.pixel_maps(model, variables, x, key, likelihood)


EVAL_CASES = {"score_elbo": _score_elbo, f"score_iwae_L{IWAE_L}": _score_iwae,
              "pixel_grads": _pixel_grads}


def make_runner(case: str, s: Setup, seed: int = 0) -> Runner:
  """The runner of `case` (a name in CASES) for the model and batch of `s`."""
  key = jax.random.key(seed + 1)
  # Every case compiles as jaxad's binaries do (jaxad.compile_options).
  if case == "latent_search":
    fn = compile_options.jit(lambda v, x, k: s.model.score(v, x, k, with_maps=True))
    return Runner(fn, (s.variables, s.x, key))
  if case == "train_step":
    return _train_runner(s, key)
  if case == "score_map":
    return Runner(compile_options.jit(functools.partial(_score_map, s.model)),
                  (s.variables, s.x))
  fn = compile_options.jit(functools.partial(EVAL_CASES[case], s.model, s.likelihood))
  return Runner(fn, (s.variables, s.x, key))


def xla_flops(compiled) -> float:
  """'flops' of XLA's cost analysis (a dict, or a list of dicts in some versions)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get("flops", 0.0))


# --------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------
def _run_timed(fn: Callable, inner: int) -> float:
  """Seconds per call over `inner` back-to-back calls."""
  t0 = time.perf_counter()
  for _ in range(inner):
    fn()
  return (time.perf_counter() - t0) / inner


class CaseTimer:
  """Collects per-call times of one case over interleaved rounds (see Timing)."""

  def __init__(self, fn: Callable, timing: Timing):
    self.fn, self.timing = fn, timing
    self.min_rep = max(1, math.ceil(timing.min_repeats / timing.rounds))
    self.max_rep = max(self.min_rep, math.ceil(timing.max_repeats / timing.rounds))
    self.inner, self.estimate = None, None
    self.per_call, self.round_medians = [], []

  def _calibrate(self, last: float | None) -> None:
    if last is None:
      last = _run_timed(self.fn, 1)
    self.estimate = max(last, 1e-9)
    self.inner = max(1, math.ceil(self.timing.min_repeat_s / self.estimate))

  def run_round(self) -> None:
    last = None
    for _ in range(self.timing.warmup):
      last = _run_timed(self.fn, 1)
    if self.inner is None:
      self._calibrate(last)
    budget = self.timing.budget_s / self.timing.rounds
    n = int(min(self.max_rep, max(self.min_rep, budget // (self.estimate * self.inner))))
    times = [_run_timed(self.fn, self.inner) for _ in range(n)]
    self.per_call += times
    self.round_medians.append(statistics.median(times))

  def summary(self) -> dict:
    pc = self.per_call
    q25, q75 = np.percentile(pc, [25, 75])
    return dict(sec_per_call_median=statistics.median(pc), sec_per_call_min=min(pc),
                sec_per_call_max=max(pc), sec_per_call_iqr=[float(q25), float(q75)],
                sec_per_call_round_medians=self.round_medians, repeats=len(pc),
                calls_per_repeat=self.inner, rounds=self.timing.rounds,
                untimed_calls=1 + self.timing.rounds * self.timing.warmup)


def _rate(fn: Callable, flops: float, repeats: int, min_s: float) -> dict:
  """GFLOP/s of fn: median/min/max over repeats of >= min_s of back-to-back calls."""
  inner = max(1, math.ceil(min_s / max(_run_timed(fn, 1), 1e-9)))
  rates = [flops / _run_timed(fn, inner) / 1e9 for _ in range(repeats)]
  return dict(median=statistics.median(rates), min=min(rates), max=max(rates))


def measure_peak(sizes: Sequence[int] = PEAK_SIZES, repeats: int = 7,
                 min_s: float = 0.5) -> dict:
  """Float32 square matmul rates through XLA (jitted jnp.dot), keyed xla_sgemm_<n>."""
  dot = jax.jit(jnp.dot)
  out = {}
  for n in sizes:
    a, b = (jax.random.normal(k, (n, n), jnp.float32)
            for k in jax.random.split(jax.random.key(n)))
    jax.block_until_ready(dot(a, b))  # compile
    out[f"xla_sgemm_{n}"] = _rate(lambda: jax.block_until_ready(dot(a, b)), 2.0 * n**3,
                                  repeats, min_s)
  return out


# --------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------
@dataclasses.dataclass
class Prepared:
  """A compiled case: its runner, timer and what the first call measured."""

  runner: Runner
  timer: CaseTimer
  compile_s: float
  flops_per_call: float


def prepare(case_id: str, setup: Setup, timing: Timing, seed: int = 0) -> Prepared:
  """Builds a case, times its first call (compilation included), counts its FLOPs."""
  runner = make_runner(case_id.split("/")[1], setup, seed)
  t0 = time.perf_counter()
  runner()
  compile_s = time.perf_counter() - t0
  flops = xla_flops(runner.compiled())
  return Prepared(runner, CaseTimer(runner, timing), compile_s, flops)


def case_record(case_id: str, p: Prepared, peak_gflops: float, batch: int) -> dict:
  """Every number the JSON promises for one timed case."""
  r = p.timer.summary()
  sec = r["sec_per_call_median"]
  ref_mflop = REFERENCE_MFLOP.get(case_id)
  r.update(
      batch=batch,
      description=DESCRIPTIONS.get(case_id, DESCRIPTIONS.get(case_id.split("/")[1])),
      compile_s=p.compile_s, images_per_s=batch / sec, flops_per_call=p.flops_per_call,
      flops_per_image=p.flops_per_call / batch, gflops=p.flops_per_call / sec / 1e9,
      reference_mflop_per_image=ref_mflop)
  r["fraction_of_peak"] = r["gflops"] / peak_gflops
  if ref_mflop is not None:  # the reference's (matmul/conv only) count at jaxad's speed
    r["gflops_reference_count"] = ref_mflop * 1e6 * batch / sec / 1e9
  return r


def _log(msg: str, verbose: bool) -> None:
  if verbose:
    print(msg, flush=True)


def case_batch(case_id: str, batch: int = BATCH) -> int:
  """The batch a case runs on: `batch`, except where the reference's case differs."""
  return CASE_BATCH.get(case_id, batch) if batch == BATCH else batch


def _prepare_all(case_ids, timing, seed, batch, verbose) -> dict[str, Prepared]:
  setups, prepared = {}, {}
  for cid in case_ids:
    model, n = cid.split("/")[0], case_batch(cid, batch)
    if (model, n) not in setups:
      setups[model, n] = make_setup(model, seed, n)
    prepared[cid] = prepare(cid, setups[model, n], timing, seed)
    p = prepared[cid]
    _log(f"{cid:24s} first call {p.compile_s:7.2f} s  "
         f"{p.flops_per_call / n / 1e6:9.1f} MFLOP/image (XLA)", verbose)
  return prepared


def _time_all(prepared: dict[str, Prepared], timing: Timing, verbose: bool) -> None:
  for rnd in range(timing.rounds):
    for cid, p in prepared.items():
      p.timer.run_round()
      _log(f"round {rnd + 1}/{timing.rounds} {cid:24s} "
           f"{1e3 * p.timer.round_medians[-1]:9.2f} ms/call", verbose)


def _meta(timing: Timing, batch: int) -> dict:
  return dict(
      jax=jax.__version__, jaxlib=_jaxlib_version(),
      flax=flax.__version__, optax=optax.__version__, numpy=np.__version__,
      python=platform.python_version(), backend=jax.default_backend(),
      device_kind=jax.devices()[0].device_kind, device_count=jax.device_count(),
      cpu=_cpu_name(), cores=os.cpu_count(), batch=batch, iwae_L=IWAE_L, lr=LR,
      timing=dataclasses.asdict(timing), flops_note=FLOPS_NOTE,
      xla_flags=os.environ.get("XLA_FLAGS", ""),
      compile_options=compile_options.options(),
      date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))


def benchmark(case_ids: Sequence[str], timing: Timing = FULL, *, seed: int = 0,
              batch: int = BATCH, peak_sizes: Sequence[int] = PEAK_SIZES,
              torch_results: dict | None = None, verbose: bool = False) -> dict:
  """Runs the cases; returns the results dict that --out holds (see the module doc)."""
  t_start = time.time()
  peak = measure_peak(peak_sizes, timing.peak_repeats, timing.peak_min_s)
  peak_key = max(peak, key=lambda k: peak[k]["median"])
  peak_gflops = peak[peak_key]["median"]
  for k, v in peak.items():
    _log(f"peak {k}: median {v['median']:.1f} GFLOP/s (min {v['min']:.1f}, "
         f"max {v['max']:.1f})", verbose)
  prepared = _prepare_all(case_ids, timing, seed, batch, verbose)
  _time_all(prepared, timing, verbose)
  cases = {cid: case_record(cid, p, peak_gflops, case_batch(cid, batch))
           for cid, p in prepared.items()}
  results = dict(meta=_meta(timing, batch), peak=peak, peak_gflops=peak_gflops,
                 peak_note=f"best median of the matmul rates at start: {peak_key}",
                 cases=cases)
  results["peak_at_end"] = measure_peak(peak_sizes[-1:], timing.peak_repeats,
                                        timing.peak_min_s)
  if torch_results is not None:
    add_torch(results, torch_results)
  results["meta"]["wall_s"] = round(time.time() - t_start, 1)
  return results


def torch_case_id(case_id: str) -> str:
  """The reference's id for one of ours (score_iwae_L15 → ..._batched, gan → dcgan28)."""
  model, case = case_id.split("/")
  return f"{TORCH_MODEL.get(model, model)}/{TORCH_CASE.get(case, case)}"


def load_torch_results(paths: Sequence[str]) -> dict:
  """The reference results of every file, in peer_torch.py's layout.

  peer_torch.py writes {"meta", "peak_gflops_reference", "cases": {id: {...}}};
  peer_torch_gan.py writes {id: images/s}. Later files add their cases to earlier ones.
  """
  merged = {"cases": {}}
  for path in paths:
    data = files.read_json(path)
    if not isinstance(data, dict):
      raise ValueError(f"--torch_json {path}: expected a JSON object of reference results")
    if "cases" in data:
      merged.update({k: v for k, v in data.items() if k != "cases"})
      merged["cases"].update(data["cases"])
      continue
    bad = [k for k, v in data.items() if "/" not in k or not isinstance(v, (int, float))]
    if bad:
      raise ValueError(f"--torch_json {path}: neither peer_torch.py's layout (a 'cases' "
                       f"key) nor peer_torch_gan.py's ({{case id: images/s}}); bad keys {bad}")
    merged["cases"].update({k: {"images_per_s": float(v)} for k, v in data.items()})
  return merged


def add_torch(results: dict, torch_results: dict) -> None:
  """Adds the reference's images/s, FLOP count and the jaxad/torch ratio per case."""
  theirs = torch_results.get("cases", {})
  for cid, r in results["cases"].items():
    t = theirs.get(torch_case_id(cid))
    if t is None:
      continue
    r["torch_case"] = torch_case_id(cid)
    r["torch_images_per_s"] = t["images_per_s"]
    r["jax_over_torch"] = r["images_per_s"] / t["images_per_s"]
    if "flops_per_image" in t:
      r["reference_mflop_per_image"] = t["flops_per_image"] / 1e6
  meta = torch_results.get("meta", {})
  results["torch"] = dict(torch=meta.get("torch"), date=meta.get("date"),
                          quick=meta.get("quick"),
                          peak_gflops_reference=torch_results.get("peak_gflops_reference"))


def markdown_table(results: dict) -> str:
  """One row per case: speed, compile time, FLOPs, rates (and torch's, if added)."""
  with_torch = any("torch_images_per_s" in r for r in results["cases"].values())
  head = ["case", "images/s", "compile s", "MFLOP/image (XLA)", "ref MFLOP/image",
          "GFLOP/s", "fraction of peak"]
  if with_torch:
    head += ["torch images/s", "jaxad/torch"]
  rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for cid, r in results["cases"].items():
    ref = r.get("reference_mflop_per_image")
    cells = [cid, f"{r['images_per_s']:.1f}", f"{r['compile_s']:.2f}",
             f"{r['flops_per_image'] / 1e6:.1f}", "-" if ref is None else f"{ref:.1f}",
             f"{r['gflops']:.1f}", f"{r['fraction_of_peak']:.2f}"]
    if with_torch:
      t = r.get("torch_images_per_s")
      cells += ["-", "-"] if t is None else [f"{t:.1f}", f"{r['jax_over_torch']:.2f}"]
    rows.append("| " + " | ".join(cells) + " |")
  return "\n".join(rows)


def _jaxlib_version() -> str | None:
  try:
    import jaxlib  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  return getattr(jaxlib, "__version__", None)


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


# --------------------------------------------------------------------------
# Grid cases: K members in one vmapped step against K single-model steps
# --------------------------------------------------------------------------
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
               "step of jaxad.grid_train (per-member batch gathered by index, Adam, "
               "masking of stopped members)",
    "sequential": f"{GRID_K} separately jitted single-model steps (the trainer's step), "
                  "called one after another",
}


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


class SequentialRunner:
  """K single-model runners called one after another (one call = K steps)."""

  def __init__(self, runners: list[Runner]):
    self.runners = runners

  def __call__(self):
    return [r() for r in self.runners]


def _grid_runner(model_name: str, vmapped: bool, seed: int = 0):
  """(runner, a function counting its FLOPs per call) of one grid step case."""
  from jaxad import grid_train, parallel, trainer  # pylint: disable=import-outside-toplevel
  model, shape = GRID_MODELS[model_name]()
  tx = optax.inject_hyperparams(optax.adam)(learning_rate=LR)
  images = jnp.asarray(np.random.default_rng(seed).uniform(
      -1, 1, (GRID_K * BATCH, *shape)), jnp.float32)
  seeds = list(range(seed, seed + GRID_K))
  if vmapped:
    layout = grid_train.Layout.make(parallel.make_mesh(), GRID_K, BATCH)
    state = grid_train.init_state(model, tx, shape, seeds, [LR] * GRID_K, layout)
    step = grid_train.make_train_step(model, "gaussian", tx, layout)
    idx = layout.put(jnp.arange(GRID_K * BATCH, dtype=jnp.int32).reshape(GRID_K, BATCH),
                     layout.batch)
    betas = layout.put(jnp.full((GRID_K,), 2.0, jnp.float32))
    runner = Runner(step, (state, layout.put(images, layout.replicated), idx, betas,
                           layout.put(jnp.asarray(seeds, jnp.int32)),
                           layout.put(jnp.ones((GRID_K,), bool))), carry=True)
    return runner, lambda: xla_flops(runner.compiled())
  likelihood = likelihood_lib.Likelihood("gaussian", 2.0)
  runners = []
  for k, member_seed in enumerate(seeds):
    variables = model.init(trainer.purpose_key(member_seed, trainer.INIT),
                           jnp.zeros((1, *shape)), train=False)
    setup = Setup(model, flax.core.unfreeze(variables), images[k * BATCH:(k + 1) * BATCH],
                  likelihood)
    runners.append(_train_runner(setup, trainer.purpose_key(member_seed, trainer.TRAIN)))
  return SequentialRunner(runners), lambda: GRID_K * xla_flops(runners[0].compiled())


def grid_step_record(case_id: str, timing: Timing, peak_gflops: float, seed: int = 0,
                     verbose: bool = False) -> dict:
  """Times one grid step case; images/s counts every member's images (K·B per call)."""
  model_name, kind = case_id.split("/")[1].rsplit("_", 1)
  vmapped = kind.startswith("vmapped")
  runner, count_flops = _grid_runner(model_name, vmapped, seed)
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
  _log(f"{case_id:28s} {r['images_per_s_per_member']:9.1f} images/s per member "
       f"(compile {compile_s:.2f} s)", verbose)
  return r


def grid_runs_record(steps: int, verbose: bool = False) -> dict:
  """End to end: configs/grid_digits.py's first group (8 members, `steps` steps each)
  trained by the grid against the same 8 configs trained by `trainer` one after another,
  compilation and data included; images/s per member = every member's images / wall / K."""
  import shutil  # pylint: disable=import-outside-toplevel
  import tempfile  # pylint: disable=import-outside-toplevel

  from jaxad import grid_axes, grid_train, parallel, trainer  # pylint: disable=import-outside-toplevel
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config = grid_axes.load_experiment(os.path.join(root, "configs", "grid_digits.py"))
  config.train.num_steps = steps
  config.train.progress_bar = False
  config.train.checkpoint_every_steps = steps
  group = grid_axes.plan(config)[0]
  assert len(group.members) == GRID_K, len(group.members)
  images = GRID_K * steps * config.train.batch_size
  scratch = tempfile.mkdtemp(prefix="jaxad_bench_grid_")
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
    runs_s = time.perf_counter() - t0
  finally:
    quiet.setLevel(level)
    shutil.rmtree(scratch, ignore_errors=True)
  r = dict(members=GRID_K, steps=steps, batch_per_member=config.train.batch_size,
           description="configs/grid_digits.py group g000 (conv VAE 16x16, 8 members): "
                       "grid_train.train_group vs 8 trainer.train_and_evaluate runs, "
                       "one device, compilation and data pipeline included",
           grid_s=grid_s, sequential_runs_s=runs_s,
           grid_images_per_s_per_member=images / grid_s / GRID_K,
           sequential_images_per_s_per_member=images / runs_s / GRID_K,
           speedup=runs_s / grid_s)
  _log(f"grid/runs{GRID_K}: grid {grid_s:.1f} s, {GRID_K} runs {runs_s:.1f} s "
       f"(x{r['speedup']:.1f})", verbose)
  return r


def run_grid_cases(case_ids: Sequence[str], timing: Timing, peak_gflops: float,
                   verbose: bool = False) -> dict:
  """Every selected grid case: step records and, with grid/runs8, the end-to-end one."""
  out = {}
  for cid in case_ids:
    if cid.startswith("grid/runs"):
      out[cid] = grid_runs_record(60 if timing == QUICK else 240, verbose)
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


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------
def run(selectors: Sequence[str], timing: Timing = FULL, *, out: str = "bench.json",
        torch_json: Sequence[str] = (), peak_sizes: Sequence[int] = PEAK_SIZES,
        verbose: bool = True) -> dict | None:
  """The program: benchmarks the selected cases, writes `out`, prints the table.

  Returns the results written (None when nothing is selected).
  """
  grid_cases, selectors = select_grid_cases(selectors)
  chosen = select_cases(selectors) if selectors or not grid_cases else []
  torch_results = load_torch_results(torch_json) if torch_json else None
  _log(f"# jaxad.bench: jax {jax.__version__} on {jax.devices()[0].device_kind}, "
       f"{len(chosen) + len(grid_cases)} cases, "
       f"{'quick' if timing == QUICK else 'full'} timing", verbose)
  if not chosen and not grid_cases:
    return None
  results = benchmark(chosen, timing, torch_results=torch_results, peak_sizes=peak_sizes,
                      verbose=verbose)
  if grid_cases:
    t0 = time.time()
    results["grid"] = run_grid_cases(grid_cases, timing, results["peak_gflops"], verbose)
    results["meta"]["wall_s"] = round(results["meta"]["wall_s"] + time.time() - t0, 1)
    _log("\n" + grid_table(results["grid"]), verbose)
  results["meta"]["quick"] = timing == QUICK
  files.write_json(out, results)
  if results["cases"]:
    _log("\n" + markdown_table(results) + "\n", verbose)
  _log(f"# peak {results['peak_gflops']:.1f} GFLOP/s ({results['peak_note']}); "
       f"wrote {out} in {results['meta']['wall_s']} s", verbose)
  return results


def main(argv):
  from absl import app
  from absl import logging as absl_logging

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  absl_logging.set_verbosity(absl_logging.WARNING)  # jax's backend-probing chatter
  if FLAGS.list:
    print("\n".join(CASE_IDS))
    print("\n".join(f"# {cid} (--case=grid)" for cid in GRID_CASE_IDS))
    return
  try:
    select_cases(select_grid_cases(FLAGS.case)[1])
  except ValueError as e:
    sys.exit(f"error: {e}")
  run(FLAGS.case, QUICK if FLAGS.quick else FULL, out=FLAGS.out, torch_json=FLAGS.torch_json)


def _define_flags():
  from absl import flags

  flags.DEFINE_multi_string(
      "case", [], "Model, case (prefix ok) or model/case; comma lists; repeatable. "
      "Default: every case.")
  flags.DEFINE_bool("quick", False, "Fewer warm-up calls and repeats (same shapes).")
  flags.DEFINE_bool("list", False, "Print the case ids and exit.")
  flags.DEFINE_string("out", "bench.json", "Results JSON (written atomically).")
  flags.DEFINE_list("torch_json", [],
                    "Results JSON files of ../shared/bench/peer_torch.py and "
                    "peer_torch_gan.py (comma list): adds their images/s and the ratio.")
  return flags.FLAGS


if __name__ == "__main__":
  from absl import app

  # Flags are defined only when run as a program, so importing the library is free of
  # absl flag registrations (jaxad.train and jaxad.evaluate define their own).
  FLAGS = _define_flags()
  app.run(main)
