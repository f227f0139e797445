"""Benchmarks jaxad's VAEs on the PyTorch reference's cases: `python -m jaxad.bench`.

    python -m jaxad.bench                       # every case, the reference's full protocol
    python -m jaxad.bench --quick               # fewer repeats (same shapes), a few minutes
    python -m jaxad.bench --case=conv64 --case=mlp28/train_step,score_elbo
    python -m jaxad.bench --list                # the case ids
    python -m jaxad.bench --torch_json=peer_torch_results.json   # add torch's images/s

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

from jaxad import files
from jaxad.models import vae as vae_models
from jaxad.objectives import likelihood as likelihood_lib
from jaxad.objectives import vae as vae_objectives
from jaxad.scores import pixel as pixel_scores
from jaxad.scores import sample as sample_scores

BATCH = 32
IWAE_L = 15
LR = 1e-4
PEAK_SIZES = (1024, 2048)  # square float32 matmuls behind the peak rate
MODELS = ("conv128", "conv64", "mlp28")
CASES = ("train_step", "score_elbo", f"score_iwae_L{IWAE_L}", "pixel_grads")
CASE_IDS = tuple(f"{m}/{c}" for m in MODELS for c in CASES)
# Cases of the reference that come with later issues; selecting them prints a note.
NOT_YET = {"score64/train_step": "score-model U-Net", "score64/score_map": "score-model U-Net",
           "gan/latent_search": "GAN latent search"}
# The reference's case for each of ours (for --torch_json).
TORCH_CASE = {f"score_iwae_L{IWAE_L}": f"score_iwae_L{IWAE_L}_batched"}
# MFLOP per image of the reference (matmul/conv only), from its README results table.
REFERENCE_MFLOP = {
    "conv128/train_step": 1717.8, "conv128/score_elbo": 576.8,
    "conv128/score_iwae_L15": 4579.9, "conv128/pixel_grads": 2021.2,
    "conv64/train_step": 122.2, "conv64/score_elbo": 40.9,
    "conv64/score_iwae_L15": 312.5, "conv64/pixel_grads": 144.2,
    "mlp28/train_step": 7.1, "mlp28/score_elbo": 2.6,
    "mlp28/score_iwae_L15": 20.5, "mlp28/pixel_grads": 9.0,
}
DESCRIPTIONS = {
    "train_step": "train mode; 1 reparameterised sample; loss=mean_b(train_rec+beta*KL); "
                  "grads w.r.t. params; Adam(lr=1e-4) update; batch stats updated",
    "score_elbo": "eval; encode, 1 sample, decode; per-image rec, KL, rec+KL",
    f"score_iwae_L{IWAE_L}": f"eval; encode once; one decode of {IWAE_L}*B latents; "
                             "vae, vae_kl, vae_rec, iwae, iwae_kl, iwae_rec",
    "pixel_grads": "eval; jaxad.scores.pixel_maps: one forward, KL and rec pullbacks to x, "
                   "decode(mu) for rec_error; rec_error, elbo/kl/rec grad maps, combi",
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


SPECS = {
    "conv128": ModelSpec(vae_models.conv_vae_128, (128, 128, 3),
                         likelihood_lib.Likelihood("gaussian", 0.01)),
    "conv64": ModelSpec(vae_models.conv_vae_64, (64, 64, 1),
                        likelihood_lib.Likelihood("gaussian", 1.0)),
    "mlp28": ModelSpec(vae_models.mlp_vae_28, (28, 28, 1),
                       likelihood_lib.Likelihood("bernoulli", 1.0)),
}


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


def select_cases(selectors: Sequence[str]) -> tuple[list[str], list[str]]:
  """(available, not yet available) case ids picked by the selectors, in table order.

  A selector is a model (`conv64`), a case or case prefix (`train_step`, `score_iwae`),
  or `model/case`; items may be comma lists. No selectors picks every case. An
  unknown selector raises ValueError naming the valid ones.
  """
  sel = [s.strip() for item in selectors for s in item.split(",") if s.strip()]
  known = CASE_IDS + tuple(NOT_YET)
  unknown = [s for s in sel if not any(_matches(s, c) for c in known)]
  if unknown:
    raise ValueError(
        f"unknown --case {unknown}; choose models {list(MODELS)}, cases {list(CASES)} "
        f"or model/case ids {list(CASE_IDS)} (comma lists and case prefixes work)")
  chosen = [c for c in known if not sel or any(_matches(s, c) for s in sel)]
  return [c for c in chosen if c in CASE_IDS], [c for c in chosen if c in NOT_YET]


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
  likelihood: likelihood_lib.Likelihood


def make_setup(name: str, seed: int = 0, batch: int = BATCH) -> Setup:
  """The model `name`, its variables (jitted init) and a uniform [-1, 1] batch."""
  spec = SPECS[name]
  model = spec.build()
  x = np.random.default_rng(seed).uniform(-1, 1, (batch, *spec.image_shape))
  x = jnp.asarray(x, jnp.float32)
  init = jax.jit(functools.partial(model.init, train=False))
  variables = flax.core.unfreeze(init(jax.random.key(seed), x[:1]))
  return Setup(model, variables, x, spec.likelihood)


def _train_runner(s: Setup, key: jax.Array) -> Runner:
  tx = optax.adam(LR)
  params = s.variables["params"]
  model_state = {k: v for k, v in s.variables.items() if k != "params"}
  # Copies: the step donates its state, and the eval cases share s.variables.
  state = jax.tree.map(jnp.copy, (params, model_state, tx.init(params),
                                  jnp.zeros((), jnp.int32)))

  def step(state, x, key):
    params, model_state, opt_state, count = state
    rng = jax.random.fold_in(key, count)

    def loss_fn(params):
      terms, updates = vae_objectives.vae_terms(
          s.model, {"params": params, **model_state}, x, rng, s.likelihood, train=True)
      return vae_objectives.training_loss(terms, s.likelihood), updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    param_updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, param_updates)
    return (params, {**model_state, **updates}, opt_state, count + 1), loss

  return Runner(jax.jit(step, donate_argnums=0), (state, s.x, key), carry=True)


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
  if case == "train_step":
    return _train_runner(s, key)
  fn = jax.jit(functools.partial(EVAL_CASES[case], s.model, s.likelihood))
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
  return Prepared(runner, CaseTimer(runner, timing), compile_s, xla_flops(runner.compiled()))


def case_record(case_id: str, p: Prepared, peak_gflops: float, batch: int) -> dict:
  """Every number the JSON promises for one timed case."""
  r = p.timer.summary()
  sec = r["sec_per_call_median"]
  ref_mflop = REFERENCE_MFLOP.get(case_id)
  r.update(
      batch=batch, description=DESCRIPTIONS[case_id.split("/")[1]],
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


def _prepare_all(case_ids, timing, seed, batch, verbose) -> dict[str, Prepared]:
  setups, prepared = {}, {}
  for cid in case_ids:
    model = cid.split("/")[0]
    if model not in setups:
      setups[model] = make_setup(model, seed, batch)
    prepared[cid] = prepare(cid, setups[model], timing, seed)
    p = prepared[cid]
    _log(f"{cid:24s} first call {p.compile_s:7.2f} s  "
         f"{p.flops_per_call / batch / 1e6:9.1f} MFLOP/image (XLA)", verbose)
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
  cases = {cid: case_record(cid, p, peak_gflops, batch) for cid, p in prepared.items()}
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
  """The reference's id for one of ours (score_iwae_L15 → ..._batched)."""
  model, case = case_id.split("/")
  return f"{model}/{TORCH_CASE.get(case, case)}"


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


def not_yet_lines(case_ids: Sequence[str]) -> list[str]:
  """One line per selected case that comes with a later issue."""
  return [f"{cid}: not available yet ({NOT_YET[cid]} comes with a later issue)"
          for cid in case_ids]


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
# Command line
# --------------------------------------------------------------------------
def run(selectors: Sequence[str], timing: Timing = FULL, *, out: str = "bench.json",
        torch_json: str | None = None, peak_sizes: Sequence[int] = PEAK_SIZES,
        verbose: bool = True) -> dict | None:
  """The program: benchmarks the selected cases, writes `out`, prints the table.

  Returns the results written (None when no selected case is available yet).
  """
  chosen, later = select_cases(selectors)
  torch_results = files.read_json(torch_json) if torch_json else None
  _log(f"# jaxad.bench: jax {jax.__version__} on {jax.devices()[0].device_kind}, "
       f"{len(chosen)} cases, {'quick' if timing == QUICK else 'full'} timing", verbose)
  for line in not_yet_lines(later):
    print(line, flush=True)
  if not chosen:
    return None
  results = benchmark(chosen, timing, torch_results=torch_results, peak_sizes=peak_sizes,
                      verbose=verbose)
  results["meta"]["quick"] = timing == QUICK
  results["not_available_yet"] = later
  files.write_json(out, results)
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
    print("\n".join("# " + line for line in not_yet_lines(list(NOT_YET))))
    return
  try:
    select_cases(FLAGS.case)
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
  flags.DEFINE_string("torch_json", None,
                      "Results JSON of /work/shared/bench/peer_torch.py: adds its images/s.")
  return flags.FLAGS


if __name__ == "__main__":
  from absl import app

  # Flags are defined only when run as a program, so importing the library is free of
  # absl flag registrations (jaxad.train and jaxad.evaluate define their own).
  FLAGS = _define_flags()
  app.run(main)
