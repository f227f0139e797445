"""A grid's tables and figures: DIR/grid.csv, the robustness plots and DIR/grid.html.

grid.csv has one row per member and score: group, member, every axis value, the score,
its kind (sample or pixel), AUROC and AUPRC (empty when a member diverged or its data
has one class only). Rows are sorted by group (g000, g001, ...: the plan's order),
member, kind (sample, then pixel) and score (KINDS' own in their order, then the
derived ones by name), so a resumed grid that read some groups back writes the same
file. Each figure shows, for one axis, the AUROC of every score against the axis values
(Zimmerer et al.'s Figures 1 and 2): when the grid has a seed axis, the AUROCs of each
seed are first averaged over the other axes, and the line is the mean over seeds with
the band from the lowest to the highest seed; without one, the band spans every member
with that value. Figures use `matplotlib.figure.Figure` (Agg),
never pyplot; every file is written atomically.
"""

import csv
import html
import io
import os

import matplotlib
from matplotlib.figure import Figure
import numpy as np

from jaxad import files
from jaxad.grid.axes import short
from jaxad.scores import pixel, sample

FIGURES = "figures"
KINDS = {"sample": sample.SAMPLE_SCORES, "pixel": pixel.PIXEL_MAPS}  # listed first


def score_names(results: dict, kind: str) -> list[str]:
  """The scores of `kind` any member has: KINDS' own, then the derived ones (complexity,
  likelihood ratio) sorted by name (a group read back from its JSON lists its scores
  sorted, a group scored now in scoring order: neither may decide the order)."""
  names = list(KINDS[kind])
  return names + sorted({n for m in _members(results) for n in m.get(kind, {})} -
                        set(names))


def rows(results: dict) -> list[dict]:
  """One dict per member and score (the CSV rows), in group name, member, kind, score
  order (module docstring)."""
  out, names = [], {kind: score_names(results, kind) for kind in KINDS}
  for g in sorted(results["groups"], key=lambda g: (len(g["name"]), g["name"])):
    for m in sorted(g["members"], key=lambda m: m["member"]):
      for kind in KINDS:
        for name in names[kind]:
          r = m.get(kind, {}).get(name)
          if r is None:
            continue
          out.append({"group": g["name"], "member": m["member"],
                      **{a: short(m["values"][a]) for a in results["axes"]},
                      "score": name, "kind": kind, "auroc": r["auroc"], "auprc": r["auprc"]})
  return out


def write_csv(path: str, results: dict) -> int:
  """Writes grid.csv; returns the number of rows."""
  table = rows(results)
  header = ["group", "member", *results["axes"], "score", "kind", "auroc", "auprc"]
  buf = io.StringIO()
  writer = csv.DictWriter(buf, header, lineterminator="\n")
  writer.writeheader()
  for r in table:
    writer.writerow({k: ("" if v is None else f"{v:.6f}" if isinstance(v, float) else v)
                     for k, v in r.items()})
  files.write_text(path, buf.getvalue())
  return len(table)


def _members(results: dict) -> list[dict]:
  return [m for g in results["groups"] for m in g["members"]]


def axis_summary(results: dict, axis: str, kind: str, name: str) -> list[dict]:
  """Per value of `axis`: mean, min and max AUROC of score `name` (see module doc)."""
  members = _members(results)
  spread = "seed" if "seed" in results["axes"] and axis != "seed" else None
  out = []
  for value in results["axes"][axis]:
    chosen = [m for m in members if m["values"][axis] == value]
    by = {}
    for m in chosen:
      auroc = m.get(kind, {}).get(name, {}).get("auroc")
      key = m["values"][spread] if spread else len(by)
      by.setdefault(key, []).append(np.nan if auroc is None else auroc)
    points = np.array([np.nanmean(v) if np.isfinite(v).any() else np.nan
                       for v in by.values()])
    points = points[np.isfinite(points)]
    out.append({"value": value, "n": int(len(points)),
                "mean": float(points.mean()) if len(points) else None,
                "min": float(points.min()) if len(points) else None,
                "max": float(points.max()) if len(points) else None})
  return out


def _panel(ax, results, axis, kind) -> bool:
  """Draws every score of `kind` against `axis`; False if no member has one."""
  drawn = False
  positions = np.arange(len(results["axes"][axis]))
  colours = matplotlib.colormaps["tab20"]
  for i, name in enumerate(score_names(results, kind)):
    summary = axis_summary(results, axis, kind, name)
    mean = np.array([np.nan if s["mean"] is None else s["mean"] for s in summary])
    if not np.isfinite(mean).any():
      continue
    lo = np.array([np.nan if s["min"] is None else s["min"] for s in summary])
    hi = np.array([np.nan if s["max"] is None else s["max"] for s in summary])
    ax.plot(positions, mean, marker="o", color=colours(i % 20), lw=1.8, label=name)
    ax.fill_between(positions, lo, hi, color=colours(i % 20), alpha=0.15, lw=0)
    drawn = True
  ax.axhline(0.5, ls=":", color="0.5", lw=1)
  ax.set_xticks(positions, [short(v) for v in results["axes"][axis]])
  ax.set(xlabel=axis, ylabel="AUROC", ylim=(0, 1.02),
         title=f"{'sample-wise scores' if kind == 'sample' else 'pixel-wise maps'}")
  ax.grid(alpha=0.3)
  if drawn:
    ax.legend(fontsize=8, loc="lower left")
  return drawn


def write_figures(workdir: str, results: dict) -> list[tuple[str, str]]:
  """One PNG per axis (seed included only when it is the sole axis): (link, caption)."""
  kinds = [k for k in KINDS if any(k in m for m in _members(results))]
  chosen = [a for a in results["axes"] if a != "seed"] or list(results["axes"])
  out = []
  for axis in chosen:
    if not kinds:
      break
    fig = Figure(figsize=(5.6 * len(kinds), 4.4))
    for i, kind in enumerate(kinds):
      _panel(fig.add_subplot(1, len(kinds), i + 1), results, axis, kind)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.13, top=0.9, wspace=0.2)
    link = f"{FIGURES}/auroc_vs_{axis}.png"
    with files.atomic_path(os.path.join(workdir, link)) as tmp:
      fig.savefig(tmp, format="png", dpi=100)
    band = ("mean over seeds, band from the lowest to the highest seed (each seed "
            "averaged over the other axes)" if "seed" in results["axes"] and axis != "seed"
            else "mean over members, band from min to max")
    out.append((link, f"AUROC against {axis}: {band}."))
  return out


def write_html(path: str, results: dict, figures: list[tuple[str, str]]) -> None:
  """A small offline page: the axes, the figures and the mean AUROC per group."""
  e = html.escape
  parts = ["<!doctype html><meta charset='utf-8'><title>jaxad grid</title>",
           "<style>body{font-family:sans-serif;max-width:1200px;margin:1em auto}"
           "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
           "table{border-collapse:collapse}img{max-width:100%}</style>",
           "<h1>jaxad hyperparameter grid</h1><p>Axes: " +
           "; ".join(f"<b>{e(a)}</b> {e(', '.join(short(v) for v in vals))}"
                     for a, vals in results["axes"].items()) + "</p>"]
  for link, caption in figures:
    parts.append(f"<figure><img src='{e(link)}'><figcaption>{e(caption)}</figcaption>"
                 "</figure>")
  names = [(k, n) for k in KINDS for n in score_names(results, k)]
  parts.append("<h2>Mean AUROC per group</h2><table><tr><th>group</th><th>values</th>"
               "<th>members</th>" + "".join(f"<th>{e(n)}</th>" for _, n in names) + "</tr>")
  for g in results["groups"]:
    cells = []
    for kind, name in names:
      v = [m.get(kind, {}).get(name, {}).get("auroc") for m in g["members"]]
      v = [x for x in v if x is not None]
      cells.append(f"{np.mean(v):.3f}" if v else "-")
    values = ", ".join(f"{k}={short(v)}" for k, v in g["values"].items()) or "-"
    parts.append(f"<tr><td>{e(g['name'])}</td><td>{e(values)}</td>"
                 f"<td>{len(g['members'])}</td>" +
                 "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
  parts.append("</table><p>Every number: <a href='grid.csv'>grid.csv</a>, "
               "<a href='grid.json'>grid.json</a>.</p>")
  files.write_text(path, "\n".join(parts) + "\n")
