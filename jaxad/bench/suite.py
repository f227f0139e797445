"""The benchmark program: compiles the selected cases, times them, writes the results.

`run` is what `python -m jaxad.bench` calls; `benchmark` times the model cases
(jaxad.bench.cases) in interleaved rounds and returns the dict that --out holds,
jaxad.bench.grid adds the grid cases under "grid" and jaxad.bench.e2e the end-to-end
cases under "e2e". meta.load_avg and meta.load_avg_end are the machine's 1/5/15-minute
load averages at the start and the end (other processes share the CPU).
"""

from collections.abc import Sequence
import dataclasses
import datetime as dt
import os
import platform
import time

import flax
import jax
import numpy as np
import optax

from jaxad import compile_options, files
from jaxad.bench import cases, e2e, grid, reference
from jaxad.bench.timing import (FULL, PEAK_SIZES, QUICK, CaseTimer, Runner, Timing, log,
                                measure_peak, xla_flops)

FLOPS_NOTE = ("XLA cost analysis of the compiled function: every op, elementwise included, "
              "conv taps on padding excluded; the reference counts 2*MAC of every conv/mm "
              "tap only")


@dataclasses.dataclass
class Prepared:
  """A compiled case: its runner, timer and what the first call measured."""

  runner: Runner
  timer: CaseTimer
  compile_s: float
  flops_per_call: float


def prepare(case_id: str, setup: cases.Setup, timing: Timing, seed: int = 0) -> Prepared:
  """Builds a case, times its first call (compilation included), counts its FLOPs."""
  runner = cases.make_runner(case_id.split("/")[1], setup, seed)
  t0 = time.perf_counter()
  runner()
  compile_s = time.perf_counter() - t0
  flops = xla_flops(runner.compiled())
  return Prepared(runner, CaseTimer(runner, timing), compile_s, flops)


def case_record(case_id: str, p: Prepared, peak_gflops: float, batch: int) -> dict:
  """Every number the JSON promises for one timed case."""
  r = p.timer.summary()
  sec = r["sec_per_call_median"]
  ref_mflop = reference.REFERENCE_MFLOP.get(case_id)
  r.update(
      batch=batch,
      description=cases.DESCRIPTIONS.get(case_id,
                                         cases.DESCRIPTIONS.get(case_id.split("/")[1])),
      compile_s=p.compile_s, images_per_s=batch / sec, flops_per_call=p.flops_per_call,
      flops_per_image=p.flops_per_call / batch, gflops=p.flops_per_call / sec / 1e9,
      reference_mflop_per_image=ref_mflop)
  r["fraction_of_peak"] = r["gflops"] / peak_gflops
  if ref_mflop is not None:  # the reference's (matmul/conv only) count at jaxad's speed
    r["gflops_reference_count"] = ref_mflop * 1e6 * batch / sec / 1e9
  return r


def _prepare_all(case_ids, timing, seed, batch, verbose) -> dict[str, Prepared]:
  setups, prepared = {}, {}
  for cid in case_ids:
    model, n = cid.split("/")[0], cases.case_batch(cid, batch)
    if (model, n) not in setups:
      setups[model, n] = cases.make_setup(model, seed, n)
    prepared[cid] = prepare(cid, setups[model, n], timing, seed)
    p = prepared[cid]
    log(f"{cid:24s} first call {p.compile_s:7.2f} s  "
        f"{p.flops_per_call / n / 1e6:9.1f} MFLOP/image (XLA)", verbose)
  return prepared


def _time_all(prepared: dict[str, Prepared], timing: Timing, verbose: bool) -> None:
  for rnd in range(timing.rounds):
    for cid, p in prepared.items():
      p.timer.run_round()
      log(f"round {rnd + 1}/{timing.rounds} {cid:24s} "
          f"{1e3 * p.timer.round_medians[-1]:9.2f} ms/call", verbose)


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


def _load_avg() -> list[float] | None:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


def _meta(timing: Timing, batch: int) -> dict:
  return dict(
      jax=jax.__version__, jaxlib=_jaxlib_version(),
      flax=flax.__version__, optax=optax.__version__, numpy=np.__version__,
      python=platform.python_version(), backend=jax.default_backend(),
      device_kind=jax.devices()[0].device_kind, device_count=jax.device_count(),
      cpu=_cpu_name(), cores=os.cpu_count(), batch=batch, iwae_L=cases.IWAE_L,
      lr=cases.LR, timing=dataclasses.asdict(timing), flops_note=FLOPS_NOTE,
      xla_flags=os.environ.get("XLA_FLAGS", ""),
      compile_options=compile_options.options(),
      date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))


def benchmark(case_ids: Sequence[str], timing: Timing = FULL, *, seed: int = 0,
              batch: int = cases.BATCH, peak_sizes: Sequence[int] = PEAK_SIZES,
              torch_results: dict | None = None, verbose: bool = False) -> dict:
  """Runs the cases; returns the results dict that --out holds (see jaxad.bench)."""
  t_start, load = time.time(), _load_avg()
  peak = measure_peak(peak_sizes, timing.peak_repeats, timing.peak_min_s)
  peak_key = max(peak, key=lambda k: peak[k]["median"])
  peak_gflops = peak[peak_key]["median"]
  for k, v in peak.items():
    log(f"peak {k}: median {v['median']:.1f} GFLOP/s (min {v['min']:.1f}, "
        f"max {v['max']:.1f})", verbose)
  prepared = _prepare_all(case_ids, timing, seed, batch, verbose)
  _time_all(prepared, timing, verbose)
  records = {cid: case_record(cid, p, peak_gflops, cases.case_batch(cid, batch))
             for cid, p in prepared.items()}
  results = dict(meta=dict(_meta(timing, batch), load_avg=load), peak=peak,
                 peak_gflops=peak_gflops,
                 peak_note=f"best median of the matmul rates at start: {peak_key}",
                 cases=records)
  results["peak_at_end"] = measure_peak(peak_sizes[-1:], timing.peak_repeats,
                                        timing.peak_min_s)
  if torch_results is not None:
    reference.add_torch(results, torch_results)
  results["meta"]["wall_s"] = round(time.time() - t_start, 1)
  return results


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


def run(selectors: Sequence[str], timing: Timing = FULL, *, out: str = "bench.json",
        torch_json: Sequence[str] = (), peak_sizes: Sequence[int] = PEAK_SIZES,
        grid_config: str = "", e2e_sizes: dict | None = None,
        verbose: bool = True) -> dict | None:
  """The program: benchmarks the selected cases, writes `out`, prints the table.

  `grid_config` is the grid config file of grid/runs8 ("" = jaxad.bench.grid's
  built-in copy of configs/grid_digits.py); `e2e_sizes` replaces the e2e cases' sizes
  (jaxad.bench.e2e.FULL_SIZES / QUICK_SIZES). Returns the results written (None when
  nothing is selected).
  """
  grid_cases, selectors = grid.select_grid_cases(selectors)
  e2e_cases, selectors = e2e.select_e2e_cases(selectors)
  named = grid_cases or e2e_cases
  chosen = cases.select_cases(selectors) if selectors or not named else []
  torch_results = reference.load_torch_results(torch_json) if torch_json else None
  log(f"# jaxad.bench: jax {jax.__version__} on {jax.devices()[0].device_kind}, "
      f"{len(chosen) + len(grid_cases) + len(e2e_cases)} cases, "
      f"{'quick' if timing == QUICK else 'full'} timing, load average "
      f"{_load_avg()}", verbose)
  if not chosen and not named:
    return None
  results = benchmark(chosen, timing, torch_results=torch_results, peak_sizes=peak_sizes,
                      verbose=verbose)
  if grid_cases:
    t0 = time.time()
    results["grid"] = grid.run_grid_cases(grid_cases, timing, results["peak_gflops"],
                                          verbose, grid_config=grid_config)
    results["meta"]["wall_s"] = round(results["meta"]["wall_s"] + time.time() - t0, 1)
    log("\n" + grid.grid_table(results["grid"]), verbose)
  if e2e_cases:
    t0 = time.time()
    results["e2e"] = e2e.run_e2e_cases(e2e_cases, timing, results["peak_gflops"], verbose,
                                       sizes=e2e_sizes)
    results["meta"]["wall_s"] = round(results["meta"]["wall_s"] + time.time() - t0, 1)
  results["meta"]["quick"] = timing == QUICK
  results["meta"]["load_avg_end"] = _load_avg()
  files.write_json(out, results)
  if results["cases"]:
    log("\n" + markdown_table(results) + "\n", verbose)
  if e2e_cases:
    log("\n" + e2e.e2e_table(results["e2e"]) + "\n", verbose)
  log(f"# peak {results['peak_gflops']:.1f} GFLOP/s ({results['peak_note']}); load average "
      f"{results['meta']['load_avg']} at the start, {results['meta']['load_avg_end']} at "
      f"the end; wrote {out} in {results['meta']['wall_s']} s", verbose)
  return results
