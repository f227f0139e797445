"""How jaxad.bench times a case: the reference's protocol, peak matmul rate, XLA FLOPs.

Shared by the model cases, the grid cases and the conv profile, so every number of
the benchmark is measured alike: interleaved rounds of warm-up and repeats of
back-to-back calls, each call waited on with `jax.block_until_ready`.
"""

from collections.abc import Callable, Sequence
import dataclasses
import math
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

PEAK_SIZES = (1024, 2048)  # square float32 matmuls behind the peak rate


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


def log(msg: str, verbose: bool) -> None:
  """A progress line on stdout, when `verbose`."""
  if verbose:
    print(msg, flush=True)


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


def xla_flops(compiled) -> float:
  """'flops' of XLA's cost analysis (a dict, or a list of dicts in some versions)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get("flops", 0.0))


def run_timed(fn: Callable, inner: int) -> float:
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
      last = run_timed(self.fn, 1)
    self.estimate = max(last, 1e-9)
    self.inner = max(1, math.ceil(self.timing.min_repeat_s / self.estimate))

  def run_round(self) -> None:
    last = None
    for _ in range(self.timing.warmup):
      last = run_timed(self.fn, 1)
    if self.inner is None:
      self._calibrate(last)
    budget = self.timing.budget_s / self.timing.rounds
    n = int(min(self.max_rep, max(self.min_rep, budget // (self.estimate * self.inner))))
    times = [run_timed(self.fn, self.inner) for _ in range(n)]
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


def rate(fn: Callable, flops: float, repeats: int, min_s: float) -> dict:
  """GFLOP/s of fn: median/min/max over repeats of >= min_s of back-to-back calls."""
  inner = max(1, math.ceil(min_s / max(run_timed(fn, 1), 1e-9)))
  rates = [flops / run_timed(fn, inner) / 1e9 for _ in range(repeats)]
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
    out[f"xla_sgemm_{n}"] = rate(lambda: jax.block_until_ready(dot(a, b)), 2.0 * n**3,
                                 repeats, min_s)
  return out
