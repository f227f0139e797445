"""One grid run: plan the groups, train and score each (resuming), write the results."""

import json
import logging
import os
import shutil
import time

import jax
import ml_collections
import numpy as np

from jaxad import config as config_lib
from jaxad import background, files, parallel
from jaxad.grid import axes as grid_axes
from jaxad.grid import data as grid_data
from jaxad.grid import evaluate as grid_eval
from jaxad.grid import report as grid_report
from jaxad.grid import train as grid_train
from jaxad.errors import CheckpointError

log = logging.getLogger("jaxad")
HEADLINE = ("vae", "vae_kl", "vae_rec", "combi")  # the table printed at the end


def _normalised(obj):
  return json.loads(json.dumps(obj, sort_keys=True))


def _check_plan(workdir: str, config, groups) -> None:
  """Refuses a workdir that holds another grid; saves the plan for the next run."""
  base = config_lib.to_dict(config)
  for key in ("figures", "keep_checkpoints"):  # presentation only
    base["grid"].pop(key, None)
  plan = _normalised({"config": base, **grid_axes.describe(groups)})
  path = os.path.join(workdir, "plan.json")
  if os.path.exists(path):
    saved = files.read_json(path)
    if saved != plan:
      diffs = config_lib.differences(saved, plan)[:5]
      raise CheckpointError(
          f"{workdir} holds another grid ({'; '.join(diffs)}): use a new --workdir, or "
          "the config this workdir was started with")
  files.write_json(path, plan)


def _member_line(group, m: dict) -> str:
  auroc = {k: m.get("sample", {}).get(k, m.get("pixel", {}).get(k, {})).get("auroc")
           for k in HEADLINE}
  shown = " ".join(f"{k}={v:.3f}" for k, v in auroc.items() if v is not None)
  state = "diverged" if m["diverged"] else "stopped early" if m["stopped_early"] else "done"
  return (f"{group.name} member {m['member']} [{grid_axes.label(m['values'])}]: "
          f"{m['steps']} steps ({m['epochs']:.3g} epochs, {state}) AUROC {shown}")


def _run_group(group, workdir, mesh, cache, stop_at_step, progress) -> dict | None:
  """Trains and scores one group; its record, or None if it was interrupted."""
  directory = os.path.join(workdir, "groups", group.name)
  t0 = time.perf_counter()
  data = grid_data.load_data(group, cache)
  t1 = time.perf_counter()
  state, summary = grid_train.train_group(group, directory, mesh, data=data,
                                          stop_at_step=stop_at_step, progress=progress)
  jax.block_until_ready(state)
  if not summary["finished"]:
    return None
  bg = bg_summary = None
  if group.config.background.enabled:  # the likelihood ratio's models, vmapped too
    bg_group = grid_train.background_group(group)
    bg_data = grid_data.load_data(bg_group, cache, with_test=False)
    bg_state, bg_summary = grid_train.train_group(
        bg_group, os.path.join(directory, background.SUBDIR), mesh, data=bg_data,
        progress=progress)
    bg = (bg_group, bg_state)
  t2b = time.perf_counter()
  scored = grid_eval.evaluate_group(group, state, data, mesh, progress=progress,
                                    background_model=bg)
  t3 = time.perf_counter()
  members = [{**s, **r, "values": grid_axes.jsonable({**group.values, **m.values})}
             for m, s, r in zip(group.members, summary["members"], scored)]
  if bg_summary is not None:
    for m, b in zip(members, bg_summary["members"]):
      m["background"] = {k: v for k, v in b.items() if k != "member"}
  record = {"name": group.name, "values": grid_axes.jsonable(group.values),
            "members": members, "data_s": t1 - t0, "train_s": t2b - t1, "eval_s": t3 - t2b,
            "trained_images": int(sum(m["steps"] for m in members) * group.config.train.batch_size)}
  files.write_json(os.path.join(workdir, "groups", f"{group.name}.json"), record)
  if not group.config.get("grid", {}).get("keep_checkpoints", False):
    shutil.rmtree(directory, ignore_errors=True)  # only its checkpoints live there
  for m in members:
    log.info("%s", _member_line(group, m))
  return record


def run_grid(config: ml_collections.ConfigDict, workdir: str, *,
             stop_at: tuple[int, int] | None = None, devices=None,
             progress: bool | None = None) -> dict:
  """Trains, scores and reports the grid; returns the results grid.json holds.

  `stop_at=(group index, step)` interrupts that group after that step as if the job
  were killed (for resume tests); the results then have complete=False and no tables.
  `devices` (default: all) restricts the mesh.
  """
  groups = grid_axes.plan(config)
  os.makedirs(workdir, exist_ok=True)
  files.log_to_file(workdir, "grid.log")
  _check_plan(workdir, config, groups)
  mesh = parallel.make_mesh(devices)
  progress = bool(config.train.progress_bar) if progress is None else progress
  axes = grid_axes.axes(config)
  results = {"config": config_lib.to_dict(config),
             "axes": grid_axes.jsonable(axes),
             "member_axes": [a for a in axes if grid_axes.is_member_axis(a)],
             "group_axes": [a for a in axes if not grid_axes.is_member_axis(a)],
             "devices": int(mesh.devices.size), "groups": [], "complete": False}
  log.info("grid: %d groups, %d members, axes %s", len(groups),
           sum(len(g.members) for g in groups), grid_axes.label(axes))
  cache, t0 = {}, time.perf_counter()
  for group in groups:
    path = os.path.join(workdir, "groups", f"{group.name}.json")
    if os.path.exists(path):
      log.info("%s [%s]: finished earlier, read from %s", group.name,
               grid_axes.label(group.values), path)
      results["groups"].append({**files.read_json(path), "trained_now": False})
      continue
    log.info("%s [%s]: %d members", group.name, grid_axes.label(group.values),
             len(group.members))
    stop = stop_at[1] if stop_at is not None and stop_at[0] == group.index else None
    record = _run_group(group, workdir, mesh, cache, stop, progress)
    if record is None:
      log.info("%s: interrupted; run again to resume", group.name)
      return results
    results["groups"].append({**record, "trained_now": True})
  results["complete"] = True
  results["total_s"] = time.perf_counter() - t0
  write_outputs(workdir, results)
  return results


def write_outputs(workdir: str, results: dict) -> None:
  """grid.json, grid.csv and (with config.grid.figures) the figures and grid.html."""
  results["num_rows"] = grid_report.write_csv(os.path.join(workdir, "grid.csv"), results)
  if results["config"].get("grid", {}).get("figures", True):
    figures = grid_report.write_figures(workdir, results)
    grid_report.write_html(os.path.join(workdir, "grid.html"), results, figures)
    results["figures"] = [link for link, _ in figures]
  files.write_json(os.path.join(workdir, "grid.json"), results)


def headline_table(results: dict) -> str:
  """Mean AUROC per group of the headline scores, as plain text."""
  lines = [f"{'group':<6} {'members':>7}  " + " ".join(f"{k:>8}" for k in HEADLINE) +
           "  values"]
  for g in results["groups"]:
    cells = []
    for k in HEADLINE:
      v = [m.get("sample", {}).get(k, m.get("pixel", {}).get(k, {})).get("auroc")
           for m in g["members"]]
      v = [x for x in v if x is not None]
      cells.append(f"{np.mean(v):8.3f}" if v else f"{'-':>8}")
    lines.append(f"{g['name']:<6} {len(g['members']):>7}  " + " ".join(cells) + "  " +
                 grid_axes.label(g["values"]))
  return "\n".join(lines)
