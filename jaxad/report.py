"""A self-contained HTML report of one evaluation: metric tables and PNG figures.

`write_report` writes out_dir/figures/*.png first, then out_dir/report.html, every file
through `files.atomic_path`, so a reader never sees a half-written report. The HTML
uses relative links and inline CSS only: it opens offline, without JavaScript.

Figures are drawn on `matplotlib.figure.Figure` objects with the Agg canvas, so no
pyplot state is created or changed (safe inside training jobs and tests). Numbers in
the figures come from `jaxad.metrics`; the tables render the given metrics dict as is.
"""

import html
import json
import math
import os
import re

from matplotlib.figure import Figure
import numpy as np

from jaxad import files
from jaxad import metrics as metrics_lib
from jaxad.errors import DataError

DPI = 100
FIGURES = "figures"
NORMAL_COLOR = "0.45"
ALL_COLOR = "black"
CLIP_PERCENT = 0.5  # density plots: values beyond these percentiles go to the edge bins.
MAX_LIST = 10  # lists longer than this are summarised in tables.
LONG_TEXT = 40  # text columns longer than this are listed under their table.

_CSS = """
body{font-family:system-ui,Helvetica,Arial,sans-serif;margin:1.5em auto;max-width:1280px;
  padding:0 1em;color:#222}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.4em 0 1.4em;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right;white-space:nowrap}
th{background:#f2f2f2}th:first-child,td:first-child{text-align:left}
caption{caption-side:top;text-align:left;font-weight:600;padding:.3em 0}
.scroll{overflow-x:auto}.note{color:#555;font-size:.9em}
.figs{display:flex;flex-wrap:wrap;gap:1.2em;align-items:flex-start}
figure{margin:0;max-width:100%}figure img{max-width:100%;height:auto;border:1px solid #ddd}
figcaption{font-size:.85em;color:#555;max-width:560px}
pre{background:#f6f6f6;padding:.6em;overflow-x:auto;font-size:.85em}
"""


def write_report(out_dir: str, *, title: str, metrics: dict, scores: dict[str, np.ndarray],
                 class_names: np.ndarray, anomalous: np.ndarray,
                 examples: dict | None = None) -> str:
  """Writes out_dir/report.html and its PNG figures beside it (out_dir/figures/*.png).

  `metrics` is the content of metrics.json; `scores` holds one score per image (higher =
  more anomalous), `class_names` each image's class and `anomalous` its 0/1 label.
  Each anomalous class is compared with the normal images only (as in
  `metrics.per_class_table`), 'all' with every image. Returns the HTML path.
  """
  class_names, anomalous, scores = _check_inputs(class_names, anomalous, scores)
  groups = _class_groups(class_names, anomalous)
  prepared = None if examples is None else _prepare_examples(examples)
  stems = _file_stems(scores)
  figures, notes = {"roc": [], "density": [], "examples": []}, []
  for name, values in scores.items():
    if groups["normal"].any() and anomalous.any():
      figures["roc"].append(_roc_figure(out_dir, stems[name], name, values, groups))
    else:
      notes.append(f"No ROC curve for {name}: it needs both normal and anomalous images.")
    figures["density"].append(_density_figure(out_dir, stems[name], name, values, groups))
  if prepared is not None:
    figures["examples"] = _example_figures(out_dir, prepared)
  page = _page(title, metrics, figures, notes, _summary(groups, class_names))
  path = os.path.join(out_dir, "report.html")
  _write_html(path, page)
  return path


# ----------------------------------------------------------------------------- inputs


def _check_inputs(class_names, anomalous, scores):
  """(class names as str, anomalous as bool, {name: float64 (N,)}) or a DataError."""
  class_names = np.asarray(class_names).astype(str).reshape(-1)
  anomalous = np.asarray(anomalous).reshape(-1)
  if len(anomalous) != len(class_names):
    raise DataError(f"anomalous has {len(anomalous)} labels but class_names has "
                    f"{len(class_names)}: pass one of each per image, in the same order")
  if anomalous.dtype != bool:
    if anomalous.dtype.kind not in "iuf" or not np.isin(anomalous, (0, 1)).all():
      raise DataError("anomalous must be bool or 0/1 (1 = anomalous) for every image")
    anomalous = anomalous.astype(bool)
  checked = {}
  for name, values in scores.items():
    values = np.asarray(values)
    if values.dtype.kind not in "biuf" or values.size != len(class_names):
      raise DataError(f"scores[{name!r}] must hold {len(class_names)} numbers (one per "
                      f"image), got dtype {values.dtype} and shape {values.shape}")
    values = values.astype(np.float64).reshape(-1)
    if not np.isfinite(values).all():
      raise DataError(f"scores[{name!r}] has NaN or infinite values: fix the score "
                      "upstream before writing the report")
    checked[name] = values
  return class_names, anomalous, checked


def _class_groups(class_names: np.ndarray, anomalous: np.ndarray) -> dict:
  """{'normal': mask, 'normal_names': str, 'classes': {anomalous class: mask}} (sorted)."""
  normal = ~anomalous
  return {"normal": normal,
          "normal_names": ", ".join(np.unique(class_names[normal]).tolist()),
          "classes": {c: anomalous & (class_names == c)
                      for c in np.unique(class_names[anomalous]).tolist()}}


def _file_stems(names) -> dict[str, str]:
  """A distinct file-name stem of only [a-z0-9_] for every name."""
  stems, used = {}, set()
  for name in names:
    base = re.sub(r"[^a-z0-9_]+", "_", str(name).lower()).strip("_") or "score"
    stem, i = base, 2
    while stem in used:
      stem, i = f"{base}_{i}", i + 1
    used.add(stem)
    stems[name] = stem
  return stems


def _text(s) -> str:
  """Plain text for matplotlib: a '$' would otherwise start mathtext."""
  return str(s).replace("$", r"\$")


def _save(fig: Figure, out_dir: str, name: str) -> str:
  """Writes `fig` atomically to out_dir/figures/name; returns the relative link."""
  with files.atomic_path(os.path.join(out_dir, FIGURES, name)) as tmp:
    fig.savefig(tmp, format="png", dpi=DPI)  # the temp name has no .png suffix
  return f"{FIGURES}/{name}"


def _write_html(path: str, page: str) -> None:
  """Writes the page atomically, as UTF-8 whatever the locale."""
  with files.atomic_path(path) as tmp:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(page)


# ------------------------------------------------------------------- score figures


def _class_color(i: int) -> str:
  return f"C{i % 10}"


def roc_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(FPR, TPR) at every distinct threshold from (0, 0) to (1, 1); ties step diagonally."""
  labels, scores = np.asarray(labels, bool), np.asarray(scores, np.float64)
  order = np.argsort(-scores, kind="stable")
  s, y = scores[order], labels[order]
  last = np.r_[s[1:] != s[:-1], True]  # the last image of each tie group
  tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
  return np.r_[0.0, fp / fp[-1]], np.r_[0.0, tp / tp[-1]]


def _roc_figure(out_dir: str, stem: str, name: str, values: np.ndarray,
                groups: dict) -> tuple[str, str]:
  """ROC of each anomalous class vs the normal images, and of 'all'; AUROC in the legend."""
  fig = Figure(figsize=(5.2, 5.2))  # fixed margins: constrained layout doubles the cost
  ax = fig.add_axes((0.14, 0.1, 0.82, 0.82))
  normal = groups["normal"]
  curves = [(c, mask, _class_color(i), 1.5) for i, (c, mask) in
            enumerate(groups["classes"].items())]
  curves.append(("all", ~normal, ALL_COLOR, 2.2))
  for label, mask, color, width in curves:
    keep = normal | mask
    y, s = mask[keep], values[keep]
    fpr, tpr = roc_points(y, s)
    auc = metrics_lib.auroc(y, s)
    ax.plot(fpr, tpr, color=color, lw=width,
            label=f"{_text(label)} (n={int(y.sum())}): AUROC {auc:.3f}")
  ax.plot([0, 1], [0, 1], ls=":", color="0.5", lw=1, label="chance: AUROC 0.500")
  ax.set(xlim=(0, 1), ylim=(0, 1.01), aspect="equal",
         xlabel=f"false positive rate (normal images, n={int(normal.sum())})",
         ylabel="true positive rate (anomalous images)",
         title=f"ROC: {_text(name)}")
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right", fontsize=8)
  caption = (f"ROC curves of the score {name}: each anomalous class against the normal "
             f"images ({groups['normal_names']}), and all anomalous images ('all').")
  return _save(fig, out_dir, f"roc_{stem}.png"), caption


def _bin_edges(values: np.ndarray) -> np.ndarray:
  """Shared histogram bins over the central (100 − 2·CLIP_PERCENT)% of all values."""
  lo, hi = np.percentile(values, [CLIP_PERCENT, 100 - CLIP_PERCENT])
  if not hi > lo:
    lo, hi = values.min(), values.max()
  num_bins = int(np.clip(math.sqrt(len(values)), 10, 50))
  return np.histogram_bin_edges(values, bins=num_bins, range=(lo, hi))


def _density_figure(out_dir: str, stem: str, name: str, values: np.ndarray,
                    groups: dict) -> tuple[str, str]:
  """Histogram densities of the score: normal images vs each anomalous class."""
  fig = Figure(figsize=(6.4, 4.2))
  ax = fig.add_axes((0.1, 0.12, 0.87, 0.8))
  edges = _bin_edges(values)
  clipped = np.clip(values, edges[0], edges[-1])
  normal = groups["normal"]
  if normal.any():
    ax.hist(clipped[normal], bins=edges, density=True, histtype="stepfilled",
            color=NORMAL_COLOR, alpha=0.35, edgecolor=NORMAL_COLOR, lw=1.2,
            label=f"normal: {_text(groups['normal_names'])} (n={int(normal.sum())})")
  for i, (c, mask) in enumerate(groups["classes"].items()):
    ax.hist(clipped[mask], bins=edges, density=True, histtype="step",
            color=_class_color(i), lw=1.8, label=f"{_text(c)} (n={int(mask.sum())})")
  ax.set(xlabel=f"{_text(name)} (higher = more anomalous)", ylabel="density",
         title=f"Score distribution: {_text(name)}")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  caption = (f"Histogram densities of the score {name} per class. Values beyond the "
             f"{CLIP_PERCENT}th and {100 - CLIP_PERCENT}th percentiles of all images are "
             "counted in the edge bins.")
  return _save(fig, out_dir, f"density_{stem}.png"), caption


# ----------------------------------------------------------------- example figures


def _image_slices(images) -> np.ndarray:
  """(K, H, W, C) in [0, 1] from images in [-1, 1]; volumes (K, D, H, W, C) give D // 2."""
  x = np.asarray(images, np.float32)
  if x.ndim == 5:
    x = x[:, x.shape[1] // 2]
  if x.ndim != 4:
    raise DataError(f"examples images must be (K, H, W, C) or (K, D, H, W, C), got shape "
                    f"{x.shape}: add a channel axis to grayscale images")
  return np.clip((x + 1.0) / 2.0, 0.0, 1.0)


def _map_slices(maps, what: str, image_shape: tuple) -> np.ndarray:
  """(K, H, W) from maps shaped like the images without channels; volumes give D // 2."""
  x = np.asarray(maps, np.float32)
  if x.ndim == len(image_shape) and x.shape[-1] == 1:
    x = x[..., 0]  # a trailing channel axis of 1
  if x.shape != tuple(image_shape[:-1]):
    raise DataError(f"{what} has shape {x.shape} but the example images have shape "
                    f"{tuple(image_shape)}: pass one map per image without a channel axis")
  return x[:, x.shape[1] // 2] if x.ndim == 4 else x


def _show(ax, image: np.ndarray, gray: bool = False) -> None:
  """An (H, W, C) image in [0, 1]: RGB as RGB unless `gray`; other channel counts as gray.

  Gray RGB is the channel mean (under heat maps colours would compete); images with
  another channel count (e.g. MRI modalities) show their first channel.
  """
  if image.shape[-1] == 3 and not gray:
    ax.imshow(image, interpolation="nearest")
    return
  plane = image.mean(axis=-1) if image.shape[-1] == 3 else image[..., 0]
  ax.imshow(plane, cmap="gray", vmin=0, vmax=1, interpolation="nearest")


def _grid(num_rows: int, column_titles: list[str], ids: list[str], title: str):
  """A Figure of (rows, cols) image axes: column titles on top, ids on the left.

  Margins are fixed in inches (room for the title, the ids and a colour bar under the
  bottom row); constrained layout would take seconds on a grid of this many axes.
  """
  num_cols, cell, left, top, bottom = len(column_titles), 1.6, 0.35, 0.7, 0.55
  width, height = num_cols * cell + left + 0.1, num_rows * cell + top + bottom
  fig = Figure(figsize=(width, height))
  axes = fig.subplots(num_rows, num_cols, squeeze=False, gridspec_kw=dict(
      left=left / width, right=1 - 0.1 / width, top=1 - top / height,
      bottom=bottom / height, wspace=0.04, hspace=0.04))
  for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
  for j, name in enumerate(column_titles):
    axes[0, j].set_title(_text(name), fontsize=9)
  for i, example_id in enumerate(ids):
    axes[i, 0].set_ylabel(_text(example_id), fontsize=8)
  fig.suptitle(title, y=1 - 0.12 / height, va="top")
  return fig, axes


def _colorbar(fig: Figure, ax, mappable) -> None:
  """A horizontal colour bar just under `ax` (the bottom cell of a column)."""
  cax = ax.inset_axes((0.08, -0.16, 0.84, 0.07))
  fig.colorbar(mappable, cax=cax, orientation="horizontal")
  cax.tick_params(labelsize=7)


def _prepare_examples(examples: dict) -> dict:
  """Checked 2-D slices of the examples, before any figure is drawn (fail fast)."""
  raw = np.asarray(examples["images"])
  images = _image_slices(raw)
  ids = [str(i) for i in examples.get("ids", range(len(images)))]
  if len(ids) != len(images):
    raise DataError(f"examples has {len(ids)} ids for {len(images)} images: pass one each")
  recon = examples.get("reconstructions")
  if recon is not None:
    recon = np.asarray(recon)
    if recon.shape != raw.shape:
      raise DataError(f"examples reconstructions have shape {recon.shape} but images "
                      f"have {raw.shape}: pass one reconstruction per image")
    recon = _image_slices(recon)
  masks = examples.get("masks")
  if masks is not None:
    masks = _map_slices(masks, "examples masks", raw.shape) > 0.5
  maps = {name: _map_slices(m, f"examples maps[{name!r}]", raw.shape)
          for name, m in (examples.get("maps") or {}).items()}
  return {"images": images, "ids": ids, "recon": recon, "maps": maps, "masks": masks,
          "where": " Volumes show their middle slice along the depth axis." if raw.ndim == 5
          else ""}


def _example_figures(out_dir: str, ex: dict) -> list[tuple[str, str]]:
  """The reconstruction grid and the anomaly-map grid, for the parts the examples hold."""
  out = []
  if ex["recon"] is not None:
    out.append(_reconstruction_figure(out_dir, ex["images"], ex["recon"], ex["ids"],
                                      ex["where"]))
  if ex["maps"] or ex["masks"] is not None:
    out.append(_maps_figure(out_dir, ex["images"], ex["maps"], ex["masks"], ex["ids"],
                            ex["where"]))
  return out


def _reconstruction_figure(out_dir, images, recon, ids, where) -> tuple[str, str]:
  """Rows of input, reconstruction and |input − reconstruction| (channel mean)."""
  fig, axes = _grid(len(images), ["input", "reconstruction", "|input − reconstruction|"],
                    ids, "Inputs and reconstructions")
  residual = np.abs(images - recon).mean(axis=-1)
  top = max(float(residual.max()), 1e-8)
  for i in range(len(images)):
    _show(axes[i, 0], images[i])
    _show(axes[i, 1], recon[i])
    shown = axes[i, 2].imshow(residual[i], cmap="magma", vmin=0, vmax=top,
                              interpolation="nearest")
  _colorbar(fig, axes[-1, 2], shown)
  caption = ("Example inputs, their reconstructions and the absolute residual (mean over "
             f"channels, one colour scale for all rows).{where}")
  return _save(fig, out_dir, "examples_reconstructions.png"), caption


def _maps_figure(out_dir, images, maps, masks, ids, where) -> tuple[str, str]:
  """Rows of input, each anomaly map over the input, and the lesion outline last."""
  titles = ["input", *maps, *(["ground truth"] if masks is not None else [])]
  fig, axes = _grid(len(images), titles, ids, "Anomaly maps")
  for i in range(len(images)):
    _show(axes[i, 0], images[i])
  for j, (name, values) in enumerate(maps.items(), start=1):
    lo, hi = np.percentile(values, [CLIP_PERCENT, 100 - CLIP_PERCENT])
    hi = hi if hi > lo else lo + 1e-8
    for i in range(len(images)):
      _show(axes[i, j], images[i], gray=True)
      shown = axes[i, j].imshow(values[i], cmap="jet", vmin=lo, vmax=hi, alpha=0.5,
                                interpolation="nearest")
    _colorbar(fig, axes[-1, j], shown)
  if masks is not None:
    for i in range(len(images)):
      ax = axes[i, -1]
      _show(ax, images[i])
      if masks[i].any():
        for color, width in (("white", 2.6), ("red", 1.3)):  # visible on any background
          ax.contour(masks[i].astype(np.float32), levels=[0.5], colors=color,
                     linewidths=width)
      else:
        ax.text(0.5, 0.06, "no lesion", transform=ax.transAxes, ha="center", fontsize=8,
                color="white", bbox=dict(facecolor="black", alpha=0.6, pad=1.5, lw=0))
  caption = ("Example inputs, each anomaly map overlaid as a heat map (one colour scale "
             f"per map, its {CLIP_PERCENT}th to {100 - CLIP_PERCENT}th percentile over "
             "these examples)" + (" and the ground-truth lesion outline (red on white)"
                                  if masks is not None else "") + f".{where}")
  return _save(fig, out_dir, "examples_maps.png"), caption


# ---------------------------------------------------------------------------- HTML


def format_value(value) -> str:
  """Numbers to 3 decimals, integers as is, None as '—'; short lists inline."""
  if value is None:
    return "—"
  if isinstance(value, (bool, np.bool_, str)):
    return str(value)
  if isinstance(value, (int, np.integer)):
    return str(int(value))
  if isinstance(value, (float, np.floating)):
    return "NaN" if math.isnan(value) else f"{float(value):.3f}"
  if isinstance(value, (list, tuple)):
    if len(value) <= MAX_LIST and all(not isinstance(v, (dict, list, tuple)) for v in value):
      return ", ".join(format_value(v) for v in value)
    return f"({len(value)} values)"
  return str(value)


def _cell(value, bold: bool = False) -> str:
  text = html.escape(format_value(value))
  return f"<td><b>{text}</b></td>" if bold else f"<td>{text}</td>"


def _table(caption: str, header: list[str], rows: list[tuple[str, list]],
           best: bool = False) -> str:
  """An HTML table; with `best`, the highest number of each column is bold."""
  tops = [None] * (len(header) - 1)
  if best:
    tops = [max((r[j] for _, r in rows if _is_number(r[j])), default=None)
            for j in range(len(tops))]
  lines = [f"<caption>{html.escape(caption)}</caption>"] if caption else []
  lines.append("<tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr>")
  for name, row in rows:
    cells = [_cell(v, bold=v is not None and v == tops[j]) for j, v in enumerate(row)]
    lines.append(f"<tr><th>{html.escape(str(name))}</th>{''.join(cells)}</tr>")
  return "<div class=\"scroll\"><table>\n" + "\n".join(lines) + "\n</table></div>"


def _is_number(v) -> bool:
  return (isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
          and not math.isnan(v))


def _sample_tables(sample: dict) -> str:
  """Lu & Xu's Table 2: rows = scores, columns = 'all' then each anomalous class."""
  columns = list(dict.fromkeys(["all", *(c for row in sample.values() for c in row)]))
  counts = {c: next((row[c].get("n_anomalous") for row in sample.values()
                     if isinstance(row.get(c), dict)), None) for c in columns}
  header = ["score"] + [html.escape(str(c)) + (f"<br><small>n={counts[c]}</small>"
                                               if counts[c] is not None else "")
                        for c in columns]
  num_normal = next((row["all"].get("n_normal") for row in sample.values()
                     if isinstance(row.get("all"), dict)), None)
  normal = f" ({num_normal})" if num_normal is not None else ""
  out = []
  for key, label in (("auroc", "AUROC"), ("auprc", "AUPRC (average precision)")):
    rows = [(score, [(row.get(c) or {}).get(key) for c in columns])
            for score, row in sample.items()]
    out.append(_table(f"Image-level {label}: each anomalous class (n images) against the "
                      f"normal images{normal}, 'all' against every image; best per column "
                      "in bold.", header, rows, best=True))
  return "\n".join(out)


def _ranking_section(ranking: dict, sample: dict) -> str:
  """Every score in the order of the AUROC to trust (validation when it has anomalies),
  the best one starred."""
  split = "validation" if ranking["by"] == "validation AUROC" else "this split"
  rows = []
  for k in ranking["order"]:
    row = sample.get(k, {}).get("all", {})
    name = f"★ {k}" if k == ranking.get("best") else k
    rows.append((name, [ranking["auroc"].get(k), row.get("auroc"), row.get("auprc")]))
  caption = (f"Scores ordered by {ranking['by']}; ★ = the best. {ranking['note']}.")
  return ("<h2>Which score to trust</h2>" +
          _table(caption, ["score", f"AUROC ({split})", "AUROC (all)", "AUPRC (all)"], rows,
                 best=True))


THRESHOLD_COLUMNS = (("threshold", "threshold"), ("val_f1", "validation F1"),
                     ("sensitivity", "sensitivity"), ("specificity", "specificity"),
                     ("precision", "precision"), ("f1", "F1"), ("tp", "TP"), ("fp", "FP"),
                     ("tn", "TN"), ("fn", "FN"))


def _thresholds_section(section: dict) -> str:
  """Image-level thresholds: one row per (score, rule), chosen on validation and
  scored on this split; ★ marks the (score, rule) predict uses by default."""
  head = "<h2>Image-level thresholds</h2>"
  default = section.get("default") or {}
  rows, errors = [], []
  for score, rules in (section.get("scores") or {}).items():
    if "error" in rules:
      errors.append(rules["error"])
      continue
    for rule, row in rules.items():
      star = "★ " if (score, rule) == (default.get("score"), default.get("rule")) else ""
      rows.append((f"{star}{score} / {rule}", [row.get(k) for k, _ in THRESHOLD_COLUMNS]))
  notes = [section[k] for k in ("note",) if section.get(k)]
  if default:
    notes.insert(0, f"Chosen on the {section['chosen_on']}; reported on the "
                 f"{section['evaluated_on']}. An image is anomalous when its score is at "
                 f"or above the threshold. ★ = the default ({default['score']}, "
                 f"{default['rule']}): {default['why']}.")
  paragraphs = "".join(f"<p class=\"note\">{html.escape(n)}</p>" for n in notes + errors)
  if not rows:
    return head + paragraphs
  caption = ("best_f1: the highest F1 on validation; n_sigma: mean + N·std of the healthy "
             "validation scores; quantile: that quantile of them. —: undefined (0/0) or not "
             "the rule's.")
  return head + paragraphs + _table(caption, ["score / rule", *(h for _, h in
                                                                 THRESHOLD_COLUMNS)], rows)


def _flatten(value: dict, prefix: str = "") -> dict:
  """Nested dicts to {'a.b': leaf}; leaves are scalars or lists."""
  flat = {}
  for key, v in value.items():
    name = f"{prefix}{key}"
    if isinstance(v, dict):
      flat.update(_flatten(v, f"{name}."))
    else:
      flat[name] = v
  return flat


def _nested_table(caption: str, section: dict) -> str:
  """Rows = the section's keys, columns = every flattened field any row has.

  Columns of long text (e.g. how a threshold was chosen) would make the table unreadable:
  they are listed under it instead, once when every row says the same.
  """
  flat = {name: _flatten(row) for name, row in section.items()}
  columns = list(dict.fromkeys(c for row in flat.values() for c in row))
  texts = [c for c in columns if _is_long_text([row.get(c) for row in flat.values()])]
  columns = [c for c in columns if c not in texts]
  rows = [(name, [row.get(c) for c in columns]) for name, row in flat.items()]
  table = _table(caption, ["name", *map(html.escape, columns)], rows) if columns else ""
  return table + _text_notes(flat, texts)


def _is_long_text(values: list) -> bool:
  present = [v for v in values if v is not None]
  return bool(present) and all(isinstance(v, str) for v in present) and any(
      len(v) > LONG_TEXT for v in present)


def _text_notes(flat: dict, columns: list[str]) -> str:
  """A list of `column: text` (or `row, column: text` where rows differ)."""
  items = []
  for c in columns:
    values = {name: row[c] for name, row in flat.items() if row.get(c) is not None}
    if len(set(values.values())) == 1:
      items.append(f"<li><b>{html.escape(c)}</b>: {html.escape(next(iter(values.values())))}"
                   "</li>")
    else:
      items += [f"<li><b>{html.escape(f'{name}, {c}')}</b>: {html.escape(v)}</li>"
                for name, v in values.items()]
  return f"<ul class=\"note\">{''.join(items)}</ul>" if items else ""


def _rounded(value):
  """A JSON-ready copy with floats rounded to 3 decimals."""
  if isinstance(value, dict):
    return {str(k): _rounded(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_rounded(v) for v in value]
  if isinstance(value, (float, np.floating)):
    return round(float(value), 3)
  if isinstance(value, np.integer):
    return int(value)
  return value


def _section(name: str, value) -> str:
  """A metrics section as a table when it is a dict of dicts, else pre-formatted JSON."""
  title = f"<h2>{html.escape(name.replace('_', ' ').capitalize())}</h2>"
  if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
    return title + _nested_table("", value)
  if isinstance(value, dict) and value and not any(
      isinstance(v, (dict, list, tuple)) for v in value.values()):
    return title + _table("", ["field", "value"], [(k, [v]) for k, v in value.items()])
  text = json.dumps(_rounded(value), indent=2, default=str, ensure_ascii=False)
  return title + f"<pre>{html.escape(text)}</pre>"


def _metric_sections(metrics: dict) -> list[str]:
  """Run fields, the sample tables, the pixel table, then every other section."""
  scalars = {k: v for k, v in metrics.items() if not isinstance(v, (dict, list, tuple))}
  out = []
  if scalars:
    out.append("<h2>Run</h2>" + _table("", ["field", "value"],
                                        [(k, [v]) for k, v in scalars.items()]))
  if isinstance(metrics.get("ranking"), dict) and isinstance(metrics.get("sample"), dict):
    out.append(_ranking_section(metrics["ranking"], metrics["sample"]))
  sample = metrics.get("sample")
  if isinstance(sample, dict) and sample and all(
      isinstance(r, dict) and all(isinstance(c, dict) for c in r.values())
      for r in sample.values()):
    out.append("<h2>Image-level detection</h2>" + _sample_tables(sample))
  elif sample is not None:
    out.append(_section("sample", sample))
  if isinstance(metrics.get("image_thresholds"), dict):
    out.append(_thresholds_section(metrics["image_thresholds"]))
  if isinstance(metrics.get("pixel"), dict) and metrics["pixel"]:
    pixel = metrics["pixel"]
    if all(isinstance(v, dict) for v in pixel.values()):
      out.append("<h2>Pixel-level segmentation</h2>" + _nested_table(
          "Pixel-level metrics per anomaly map (nested fields joined with '.')", pixel))
    else:
      out.append(_section("pixel", pixel))
  for name, value in metrics.items():
    if name not in ("sample", "pixel", "ranking", "image_thresholds") and name not in scalars:
      out.append(_section(name, value))
  return out


def _figure_block(heading: str, figures: list[tuple[str, str]]) -> str:
  items = [f"<figure><a href=\"{html.escape(src)}\"><img src=\"{html.escape(src)}\" "
           f"alt=\"{html.escape(caption)}\"></a><figcaption>{html.escape(caption)}"
           "</figcaption></figure>" for src, caption in figures]
  return f"<h2>{heading}</h2>\n<div class=\"figs\">\n" + "\n".join(items) + "\n</div>"


def _summary(groups: dict, class_names: np.ndarray) -> str:
  """'N images: n normal (names), n CNV, …'."""
  parts = [f"{int(groups['normal'].sum())} normal ({groups['normal_names'] or 'none'})"]
  parts += [f"{int(mask.sum())} {c}" for c, mask in groups["classes"].items()]
  return f"{len(class_names)} images: " + ", ".join(parts) + "."


def _page(title: str, metrics: dict, figures: dict, notes: list[str], summary: str) -> str:
  """The whole HTML document."""
  body = [f"<h1>{html.escape(title)}</h1>", f"<p class=\"note\">{html.escape(summary)}</p>"]
  body += _metric_sections(metrics or {})
  for heading, key in (("ROC curves", "roc"), ("Score distributions", "density"),
                       ("Examples", "examples")):
    if figures[key]:
      body.append(_figure_block(heading, figures[key]))
  body += [f"<p class=\"note\">{html.escape(n)}</p>" for n in notes]
  return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
          f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
          + "\n".join(body) + "\n</body>\n</html>\n")
