"""Screens new images with a trained model: `python -m jaxad.predict --workdir=W
--input=FOLDER` (or `--scorer=EXPORT_DIR`, or `--input=FILE.npz`).

The input (a folder of images or of NIfTI volumes, searched recursively, or an .npz
with an `images` array) goes through jaxad's own pipeline with the model's
preprocessing (W/config.json, or scorer.json's "config"), batch by batch; each image is
scored by the Scorer (`jaxad.scorer.from_workdir`, or `jaxad.export.load`) exactly as
the eval binary scores an image at that position, and its outputs are written as it
goes, so memory stays flat however many images the input holds (a batch, the top-K
thumbnails of the summary, and the ids). Outputs go to a new folder, never over an
earlier run's: W/predict/<input name>, then <name>-2, -3, ... (./predict/... with
--scorer), or --out=DIR, which must not exist. A failed run removes its own folder.

  predictions.csv        id, index, every score, score_name, score (the chosen one),
                         threshold, pred_label (1 when score >= threshold, n/a without
                         a threshold), overlay (its file)
  overlays/<map>/<id>.png  the map as a heat map over the image, outlined at the map's
                         N-sigma threshold when the eval binary computed one
                         (`jaxad.overlays`); a volume's most anomalous slice
  maps/<map>/<id>.nii.gz volumes only: the whole map, on the input volume's grid
  summary.html           the --top_k most anomalous images, counts, the threshold and
                         where it came from
  run.json               what ran: input, model, threshold provenance, counts, images/s

Thresholds come from the scorer's `thresholds` (W/eval/thresholds.json, written by the
eval binary): its "default" score and rule unless --score, --rule or --threshold say
otherwise. Without thresholds the scores are still written, pred_label is n/a, and a
warning says how to get them. `--complexity` adds the complexity-corrected scores
(`jaxad.scores.complexity`, host coders) from the family's likelihood scores.
"""

import collections
import csv
import dataclasses
import heapq
import logging
import math
import os
import re
import shutil
import sys
import time
from typing import Any

import ml_collections
import numpy as np

from jaxad import eval_folders, files, overlays
from jaxad.errors import ConfigError, DataError

log = logging.getLogger("jaxad")
RULES = ("best_f1", "n_sigma", "quantile")  # thresholds.json's rules, in preference order
MAP_CHOICES = ("none", "default", "all")
TOP_K = 24
CSV_FILE, SUMMARY_FILE, RUN_FILE = "predictions.csv", "summary.html", "run.json"
NOT_AVAILABLE = "n/a"
_EXTS = (".nii.gz", ".nii", ".png", ".jpg", ".jpeg", ".tif", ".tiff")


@dataclasses.dataclass(frozen=True)
class Threshold:
  """The image-level threshold of one score, and where it came from."""
  score: str
  value: float | None  # None: no threshold, pred_label is n/a
  rule: str | None  # best_f1, n_sigma, quantile, or "manual" (--threshold)
  source: str  # a sentence: where the value came from
  chosen_on: str | None = None  # thresholds.json's "chosen_on"

  def describe(self) -> dict:
    return dataclasses.asdict(self)

  def label(self, score: float) -> int | str:
    """1 when score >= the threshold, else 0; n/a without a threshold."""
    return NOT_AVAILABLE if self.value is None else int(score >= self.value)


def choose_threshold(thresholds: dict, score_names, *, score: str | None = None,
                     rule: str | None = None, value: float | None = None) -> Threshold:
  """The threshold of `score` (default: thresholds' default score, else the first
  score): `value` when given, else thresholds.json's `rule` (default: its default
  rule, else the first of RULES it has for that score)."""
  default = thresholds.get("default") or {}
  score = score or default.get("score") or score_names[0]
  if score not in score_names:
    raise ConfigError(f"--score={score!r} is not a score of this model; use one of "
                      f"{list(score_names)}")
  if value is not None:
    if rule is not None:
      raise ConfigError("--threshold and --rule both given: pass one (--rule picks a "
                        "threshold of eval/thresholds.json, --threshold sets it)")
    return Threshold(score, float(value), "manual", "--threshold")
  if not thresholds:
    if rule is not None:
      raise ConfigError(f"--rule={rule} but the model has no thresholds: evaluate a "
                        "labelled split first (python -m jaxad.evaluate --workdir=W), or "
                        "pass --threshold=VALUE")
    return Threshold(score, None, None, "none: no eval/thresholds.json")
  have = (thresholds.get("scores") or {}).get(score) or {}
  if rule is None:
    preferred = [default.get("rule")] if score == default.get("score") else []
    rule = next((r for r in preferred + list(RULES) if r in have), None)
  entry = have.get(rule) if rule else None
  if not entry or entry.get("threshold") is None:
    raise ConfigError(f"eval/thresholds.json has no {rule or 'usable'} threshold for "
                      f"{score} (it has: {sorted(have) or 'none'}): pick another --rule "
                      "or --score, or pass --threshold=VALUE")
  step = thresholds.get("step")
  return Threshold(score, float(entry["threshold"]), rule,
                   f"eval/thresholds.json ({rule} at checkpoint step {step})",
                   thresholds.get("chosen_on"))


def default_map(score: str, map_names) -> str | None:
  """The map that goes with `score`: kl_grad for KL scores, rec_normalized for AE-U's
  vae_rec_normalized, else rec_error, else the family's first map (sano, gan_residual)."""
  if not map_names:
    return None
  if "_kl" in score and "kl_grad" in map_names:
    return "kl_grad"
  if score.endswith("_normalized") and "rec_normalized" in map_names:  # AE-U
    return "rec_normalized"
  return "rec_error" if "rec_error" in map_names else map_names[0]


def maps_to_write(choice: str, score: str, map_names) -> tuple[str, ...]:
  """The maps --maps=none|default|all writes (the default score's map first)."""
  if choice not in MAP_CHOICES:
    raise ConfigError(f"--maps={choice!r}: use one of {list(MAP_CHOICES)}")
  first = default_map(score, map_names)
  if choice == "none" or first is None:
    return ()
  return (first,) if choice == "default" else (first,) + tuple(
      m for m in map_names if m != first)


def map_thresholds(thresholds: dict, names) -> dict[str, float]:
  """The N-sigma pixel threshold of each map that has one (thresholds.json "maps")."""
  out = {}
  for name in names:
    t = (((thresholds.get("maps") or {}).get(name) or {}).get("n_sigma") or {})
    if t.get("threshold") is not None:
      out[name] = float(t["threshold"])
  return out


def output_stems(ids) -> list[str]:
  """A file stem per image id: the id (a relative path) without its image extension,
  unsafe characters replaced; an id whose stem repeats gets `__<position>`."""
  stems = []
  for image_id in ids:
    s = str(image_id).replace("\\", "/")
    ext = next((e for e in _EXTS if s.lower().endswith(e)), "")
    s = s[:len(s) - len(ext)]
    stems.append("/".join(re.sub(r"[^A-Za-z0-9._-]+", "_", p).strip(".") or "_"
                          for p in s.split("/")))
  counts = collections.Counter(stems)
  return [s if counts[s] == 1 else f"{s}__{i}" for i, s in enumerate(stems)]


def load_model(workdir: str | None, scorer_dir: str | None, with_maps: bool):
  """(Scorer, its config, what it is) of a workdir or an export folder."""
  if bool(workdir) == bool(scorer_dir):
    raise ConfigError("pass one of --workdir (a trained workdir) or --scorer (a folder "
                      "python -m jaxad.export wrote)")
  from jaxad import config as config_lib
  if workdir:
    from jaxad import scorer as scorer_lib
    config = config_lib.load_workdir_config(workdir)
    return (scorer_lib.from_workdir(workdir, with_maps=with_maps, config=config), config,
            {"workdir": os.path.abspath(workdir)})
  from jaxad import export
  scorer = export.load(scorer_dir)  # a refusal is export.LoadError, a CheckpointError
  if not scorer.meta.get("config"):
    raise ConfigError(f"{scorer_dir}/scorer.json has no 'config': export the workdir "
                      "again with this jaxad, or predict with --workdir")
  return scorer, config_lib.from_dict(scorer.meta["config"]), {
      "scorer": os.path.abspath(scorer_dir)}


class Complexity:
  """Serrà et al.'s complexity-corrected scores of a batch, on host coders."""

  def __init__(self, config, image_shape, family_name: str):
    from jaxad import families
    from jaxad.scores import complexity, complexity_cache
    self.family = families.build(config, image_shape)
    if not getattr(self.family, "likelihood_scores", ()):
      raise ConfigError(f"--complexity needs likelihood scores, and this {family_name} "
                        "model has none (the vae family has them; the score family with "
                        "eval.prob_flow.enabled): drop --complexity")
    self.bit_depth = int(config.data.bit_depth)
    self.num_dims = int(math.prod(image_shape))
    self.names = complexity.score_names(self.family.likelihood_scores)
    self.pool = complexity.ComplexityPool(  # the eval binary's cache: coded once
        self.bit_depth,
        cache_dir=complexity_cache.resolve_dir(config.eval.complexity_cache))

  def submit(self, images: np.ndarray):
    return self.pool.submit(images)

  def scores(self, scores: dict, coded) -> dict:
    """The corrected scores and code lengths of a batch (`coded`: `submit`'s future),
    by the eval binary's own rule (`scoring.likelihood_derived`)."""
    from jaxad import scoring
    derived = scoring.likelihood_derived(
        self.family, {k: np.asarray(v, np.float64) for k, v in scores.items()},
        self.num_dims, self.bit_depth, lengths=coded.result())
    return {k: derived[k] for k in self.names}

  def close(self) -> None:
    self.pool.close(wait=False)


@dataclasses.dataclass
class _Job:
  """Everything one prediction run needs, checked before its folder is made."""
  input_path: str
  scorer: Any
  config: ml_collections.ConfigDict
  model: dict
  split: Any
  threshold: Threshold
  maps: tuple[str, ...]
  map_thresholds: dict
  complexity: Complexity | None
  batch_size: int
  top_k: int
  stems: list[str]
  thresholds_note: str | None

  @property
  def source(self):
    return self.split.source

  @property
  def score_names(self) -> tuple[str, ...]:
    return tuple(self.scorer.score_names) + (self.complexity.names if self.complexity
                                             else ())


def _input(path: str | None, scorer, config):
  """The unlabelled input through the model's preprocessing, every file checked."""
  from jaxad.data import pipeline, sources
  if not os.path.exists(path):
    raise DataError(f"--input={path} does not exist")
  source = sources.unlabeled_source(path, len(scorer.image_shape) - 1)
  shape = pipeline.output_shape(config.data, source.spatial_ndim)
  if tuple(shape) != tuple(scorer.image_shape):
    raise DataError(f"{path} gives {source.spatial_ndim}-D images of shape {shape} after "
                    f"preprocessing, but the model takes {tuple(scorer.image_shape)}: "
                    "give --input images of the kind the model was trained on")
  pipeline.check_files(source, config.data)
  return pipeline.Split(source, np.array([0]))


def _choose(scorer, extra: Complexity | None, score, rule, threshold) -> Threshold:
  """`choose_threshold` over the scorer's scores and, with --complexity, the corrected
  ones (a complexity score without it is refused, saying so)."""
  names = tuple(scorer.score_names) + (extra.names if extra else ())
  if extra is None and score and ("_complexity" in score or score.endswith("_bpd")
                                   and score not in scorer.score_names):
    raise ConfigError(f"--score={score} is a complexity score: add --complexity")
  return choose_threshold(scorer.thresholds, names, score=score, rule=rule,
                          value=threshold)


def prepare(input_path, *, workdir=None, scorer_dir=None, score=None, rule=None,
            threshold=None, maps="default", batch_size=0, top_k=TOP_K,
            complexity=False) -> _Job:
  """Loads the model and the input and picks the threshold and maps (no file written)."""
  if maps not in MAP_CHOICES:
    raise ConfigError(f"--maps={maps!r}: use one of {list(MAP_CHOICES)}")
  if top_k < 0 or batch_size < 0:
    raise ConfigError(f"--top_k={top_k} and --batch_size={batch_size} must be >= 0 "
                      "(--batch_size=0: the config's eval.batch_size)")
  if rule is not None and rule not in RULES:
    raise ConfigError(f"--rule={rule!r}: use one of {list(RULES)}")
  if not input_path:
    raise ConfigError("--input is required: a folder of images or NIfTI volumes, or an "
                      ".npz with an 'images' array")
  scorer, config, model = load_model(workdir, scorer_dir, maps != "none")
  split = _input(input_path, scorer, config)
  extra = Complexity(config, scorer.image_shape, scorer.meta.get("family", "")) \
      if complexity else None
  try:
    chosen = _choose(scorer, extra, score, rule, threshold)
  except BaseException:
    if extra is not None:
      extra.close()
    raise
  written = maps_to_write(maps, chosen.score, scorer.map_names)
  if maps != "none" and not scorer.map_names:
    log.warning("warning: this scorer computes no pixel maps (exported without them): "
                "no overlays are written")
  return _Job(input_path, scorer, config, {**model, "step": scorer.meta.get("step"),
                                           "family": scorer.meta.get("family")},
              split, chosen, written, map_thresholds(scorer.thresholds, written), extra,
              int(batch_size or config.eval.batch_size), int(top_k),
              output_stems(split.source.ids), scorer.meta.get("thresholds_note"))


def claim_output(input_path: str, out: str | None, parent: str) -> str:
  """A new folder for this run: `out` (refused when it exists), else
  parent/<input name>, then <name>-2, -3, ... (`eval_folders.claim_folder`)."""
  if out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    try:
      os.mkdir(out)
    except FileExistsError:
      raise ConfigError(f"--out={out} already exists: predict never writes over earlier "
                        "results; pass a new folder, or leave --out out for a new "
                        f"{parent}/<input name>-N") from None
    return out
  name = eval_folders.input_name(input_path)
  number = eval_folders.claim_folder(parent, name)
  return os.path.join(parent, name if number == 1 else f"{name}-{number}")


class _TopK:
  """The k highest-scoring images (score, then the earlier image, first) with their
  thumbnails: the only per-image pictures kept in memory."""

  def __init__(self, k: int):
    self.k, self.heap = k, []

  def wants(self, score: float, index: int) -> bool:
    if len(self.heap) < self.k:
      return self.k > 0
    return (score, -index) > self.heap[0][:2]

  def add(self, score: float, index: int, row: dict) -> None:
    item = (score, -index, row)
    if len(self.heap) < self.k:
      heapq.heappush(self.heap, item)
    else:
      heapq.heapreplace(self.heap, item)

  def rows(self) -> list[dict]:
    """The kept rows, most anomalous first, with their rank."""
    ordered = sorted(self.heap, key=lambda t: (-t[0], -t[1]))
    return [{**row, "rank": r + 1} for r, (_, _, row) in enumerate(ordered)]


class _Outputs:
  """Writes each image's overlays (and a volume's NIfTI maps) as it is scored."""

  def __init__(self, job: _Job, out_dir: str):
    self.job, self.out_dir = job, out_dir
    self.volumes = len(job.scorer.image_shape) == 4
    self.nifti_input = self.volumes and os.path.isdir(job.input_path)

  def overlay_file(self, name: str, i: int) -> str:
    return os.path.join("overlays", name, self.job.stems[i] + ".png")

  def _affine(self, i: int, map_shape) -> np.ndarray | None:
    """A NIfTI input's affine, resized to the map's grid; None (identity) for npz."""
    if not self.nifti_input:
      return None
    affine, shape = overlays.nifti_geometry(
        os.path.join(self.job.input_path, str(self.job.source.ids[i])))
    return overlays.resized_affine(affine, shape, tuple(reversed(map_shape)))

  def write(self, i: int, image: np.ndarray, maps: dict) -> tuple[Any, int | None]:
    """Writes image i's files; returns (the first map's overlay or None, the slice it
    shows for a volume)."""
    first, shown = None, None
    for name, heat in maps.items():
      threshold = self.job.map_thresholds.get(name)
      if self.volumes:
        z = overlays.hottest_slice(heat)
        picture = overlays.overlay(image[z], heat[z], threshold=threshold)
        overlays.write_nifti(os.path.join(self.out_dir, "maps", name,
                                          self.job.stems[i] + ".nii.gz"),
                             heat, self._affine(i, heat.shape))
      else:
        z, picture = None, overlays.overlay(image, heat, threshold=threshold)
      overlays.write_png(os.path.join(self.out_dir, self.overlay_file(name, i)), picture)
      if first is None:
        first, shown = picture, z
    return first, shown

  def summary_row(self, i, image, value, label, picture, z) -> dict:
    """What the summary shows of image i (thumbnails: the only pictures kept)."""
    if self.volumes:
      z = len(image) // 2 if z is None else z
      image = image[z]
    row = {"id": str(self.job.source.ids[i]), "score": value, "pred_label": label,
           "image": overlays.thumbnail(overlays.image_rgb(image))}
    if picture is not None:
      row.update(overlay=overlays.thumbnail(picture),
                 link=self.overlay_file(self.job.maps[0], i),
                 note=f"slice {z} of {self.job.scorer.image_shape[0]}" if self.volumes
                 else "")
    return row


def _check_finite(job: _Job, index, scores: dict, maps: dict) -> None:
  """Raises FloatingPointError naming the images whose scores or maps are not finite."""
  bad = {k: ~np.isfinite(v) for k, v in scores.items()}
  bad.update({f"{k} map": ~np.isfinite(v.reshape(len(v), -1)).all(axis=1)
              for k, v in maps.items()})
  rows = np.flatnonzero(np.any(np.stack(list(bad.values())), axis=0))
  if not len(rows):
    return
  names = sorted(k for k, v in bad.items() if v.any())
  ids = ", ".join(str(job.source.ids[index[r]]) for r in rows[:5])
  raise FloatingPointError(
      f"the model (step {job.model.get('step')}) gives non-finite {', '.join(names)} for "
      f"{len(rows)} image(s) of a batch ({ids}); this run's folder was removed: check "
      "those inputs (blank or corrupt images?), or use a model that converged")


def _score_batch(job: _Job, batch: dict) -> tuple:
  """(images, index, scores, maps) of the batch's real images (padding dropped); the
  whole padded batch is scored, so every batch has one shape (one compile)."""
  valid = np.flatnonzero(batch["valid"] > 0)
  images, index = batch["image"], batch["index"].astype(np.int64)
  coded = job.complexity.submit(images[valid]) if job.complexity else None
  scores, maps = job.scorer(images, index)
  scores = {k: np.asarray(v)[valid] for k, v in scores.items()}
  if coded is not None:
    scores.update(job.complexity.scores(scores, coded))
  maps = {k: np.asarray(maps[k])[valid] for k in job.maps}
  _check_finite(job, index[valid], scores, maps)
  return images[valid], index[valid], scores, maps


def _header(job: _Job) -> list[str]:
  return ["id", "index", *job.score_names, "score_name", "score", "threshold",
          "pred_label", "overlay"]


def _stream(job: _Job, out_dir: str, rows, progress: bool) -> tuple[collections.Counter,
                                                                     _TopK]:
  """Scores every batch, writing each image's row and files as it goes."""
  from jaxad.data import pipeline
  from tqdm.auto import tqdm
  writer, top, counts = _Outputs(job, out_dir), _TopK(job.top_k), collections.Counter()
  t = job.threshold
  bar = tqdm(total=len(job.source), unit="img", desc="predict", file=sys.stderr,
             disable=not progress, mininterval=1.0, dynamic_ncols=True)
  for batch in pipeline.eval_batches(job.split, job.config.data,
                                     global_batch=job.batch_size, process_index=0,
                                     process_count=1):
    images, index, scores, maps = _score_batch(job, batch)
    for j, i in enumerate(index.tolist()):
      value = float(scores[t.score][j])
      label = t.label(value)
      picture, z = writer.write(i, images[j], {k: v[j] for k, v in maps.items()})
      rows.writerow([str(job.source.ids[i]), i]
                    + [f"{scores[k][j]:.9g}" for k in job.score_names]
                    + [t.score, f"{value:.9g}", "" if t.value is None else f"{t.value:.9g}",
                       label, writer.overlay_file(job.maps[0], i) if job.maps else ""])
      counts["images"] += 1
      counts["anomalous"] += label == 1
      if top.wants(value, i):
        top.add(value, i, writer.summary_row(i, images[j], value, label, picture, z))
    bar.update(len(index))
  bar.close()
  return counts, top


def _facts(job: _Job, result: dict) -> list[str]:
  """The summary page's list: counts, the threshold and its provenance, the model."""
  t, n = job.threshold, result["num_images"]
  if t.value is None:
    verdict = (f"no image-level threshold, so no image is labelled: "
               f"{job.thresholds_note or t.source}")
  else:
    verdict = (f"{result['num_predicted_anomalous']} predicted anomalous: {t.score} >= "
               f"{t.value:.6g} ({t.rule}; from {t.source}"
               + (f"; chosen on {t.chosen_on}" if t.chosen_on else "") + ")")
  model = ", ".join(f"{k} {v}" for k, v in job.model.items())
  facts = [f"{n} images from {os.path.abspath(job.input_path)}", verdict,
           f"model: {model}"]
  for name in job.maps:
    where = job.map_thresholds.get(name)
    facts.append(f"{name} overlays: " + (
        f"colour scale [0, 2 × {where:.4g}], outlined at its N-sigma threshold {where:.4g}"
        if where is not None else "colour scale [0, each image's maximum], no threshold"))
  facts.append(f"{result['images_per_second']:.3g} images/s over "
               f"{result['seconds']:.1f} s (reading, scoring, writing; the first batch "
               "compiles)")
  return facts


def _run(job: _Job, out_dir: str, progress: bool) -> dict:
  """The scoring pass, then summary.html and run.json; returns run.json's content."""
  started = time.perf_counter()
  with files.atomic_path(os.path.join(out_dir, CSV_FILE)) as tmp, \
      open(tmp, "w", newline="") as f:
    rows = csv.writer(f)
    rows.writerow(_header(job))
    counts, top = _stream(job, out_dir, rows, progress)
  seconds = time.perf_counter() - started
  t = job.threshold
  result = {
      "input": os.path.abspath(job.input_path), "folder": os.path.abspath(out_dir),
      "num_images": counts["images"],
      "num_predicted_anomalous": None if t.value is None else counts["anomalous"],
      "model": job.model, "threshold": t.describe(), "thresholds_note": job.thresholds_note,
      "scores": list(job.score_names), "maps": list(job.maps),
      "map_thresholds": job.map_thresholds, "complexity": job.complexity is not None,
      "batch_size": job.batch_size, "top_k": job.top_k, "seconds": seconds,
      "images_per_second": counts["images"] / max(seconds, 1e-9),
      "preprocessing": {k: v for k, v in job.scorer.meta.get("preprocessing", {}).items()},
      "files": {"predictions": CSV_FILE, "summary": SUMMARY_FILE,
                "overlays": "overlays/<map>/<id>.png" if job.maps else None,
                "nifti_maps": "maps/<map>/<id>.nii.gz"
                if job.maps and len(job.scorer.image_shape) == 4 else None}}
  overlays.write_summary(os.path.join(out_dir, SUMMARY_FILE),
                         title=f"jaxad predict: {os.path.basename(out_dir)}",
                         facts=_facts(job, result), score_name=t.score, rows=top.rows(),
                         map_name=job.maps[0] if job.maps else None)
  files.write_json(os.path.join(out_dir, RUN_FILE), result)
  return result


def _refuse_existing(out: str | None) -> None:
  if out and os.path.exists(out):
    raise ConfigError(f"--out={out} already exists: predict never writes over earlier "
                      "results; pass a new folder, or leave --out out for a new numbered "
                      "folder beside the model")


def predict(input_path: str, *, workdir: str | None = None, scorer_dir: str | None = None,
            out: str | None = None, score: str | None = None, rule: str | None = None,
            threshold: float | None = None, maps: str = "default", batch_size: int = 0,
            top_k: int = TOP_K, complexity: bool = False, progress: bool = True) -> dict:
  """Scores every image of `input_path` with the model of `workdir` (or the export
  folder `scorer_dir`) into a new folder (module docstring); returns run.json's content.

  score / rule / threshold override thresholds.json's default; maps: none, default
  (the chosen score's map) or all; batch_size 0: the config's eval.batch_size.
  """
  _refuse_existing(out)
  job = prepare(input_path, workdir=workdir, scorer_dir=scorer_dir, score=score,
                rule=rule, threshold=threshold, maps=maps, batch_size=batch_size,
                top_k=top_k, complexity=complexity)
  if job.threshold.value is None:
    log.warning("warning: no image-level threshold, so pred_label is %s (predictions.csv "
                "still has every score): %s; or pass --threshold=VALUE", NOT_AVAILABLE,
                job.thresholds_note or "the model has none: evaluate a labelled split "
                "(python -m jaxad.evaluate --workdir=W --split=val) to write "
                "W/eval/thresholds.json")
  parent = os.path.join(workdir, "predict") if workdir else "predict"
  try:
    out_dir = claim_output(input_path, out, parent)
    try:
      return _run(job, out_dir, progress)
    except BaseException:
      shutil.rmtree(out_dir, ignore_errors=True)  # this run's own new folder
      raise
  finally:
    if job.complexity is not None:
      job.complexity.close()


def summary_line(result: dict) -> str:
  """What the binary prints: counts, the threshold and where it came from, the folder."""
  t, n = result["threshold"], result["num_images"]
  if t["value"] is None:
    head = (f"{n} images scored; no threshold, so pred_label is {NOT_AVAILABLE} "
            f"({t['score']} and every other score are in {CSV_FILE})")
  else:
    head = (f"{n} images, {result['num_predicted_anomalous']} predicted anomalous at "
            f"{t['score']} >= {t['value']:.6g} ({t['rule']}, "
            + (f"chosen on {t['chosen_on']}" if t["chosen_on"] else t["source"]) + ")")
  return f"{head}\nresults in {result['folder']}"


def define_flags() -> None:
  """The binary's flags (defined only when it runs, so importing this module as a
  library adds no flag)."""
  from absl import flags
  flags.DEFINE_string("workdir", None, "A trained workdir (python -m jaxad.train).")
  flags.DEFINE_string("scorer", None, "Or: a folder python -m jaxad.export wrote.")
  flags.DEFINE_string("input", None, "A folder of images or NIfTI volumes (searched "
                      "recursively), or an .npz with an 'images' array.")
  flags.DEFINE_string("out", None, "A new folder for the results (refused if it exists). "
                      "Default: W/predict/<input name>[-N] (./predict/... with --scorer).")
  flags.DEFINE_string("score", None, "The score that labels images (default: "
                      "eval/thresholds.json's default, else the family's first score).")
  flags.DEFINE_float("threshold", None, "Label images with score >= this value "
                     "(instead of eval/thresholds.json's).")
  flags.DEFINE_enum("rule", None, list(RULES), "Which threshold of eval/thresholds.json: "
                    "best_f1 (validation anomalies), n_sigma or quantile (healthy "
                    "validation scores). Default: thresholds.json's default rule.")
  flags.DEFINE_enum("maps", "default", list(MAP_CHOICES), "Overlays to write: none, "
                    "default (the map of the chosen score, e.g. rec_error), or all. Any "
                    "map makes the VAE compute its gradient maps too (a backward pass "
                    "per image); --maps=none is the fastest.")
  flags.DEFINE_integer("batch_size", 0, "Images per batch (0: the config's "
                       "eval.batch_size).")
  flags.DEFINE_integer("top_k", TOP_K, "The most anomalous images summary.html shows.")
  flags.DEFINE_boolean("complexity", False, "Add the complexity-corrected scores "
                       "(*_complexity, Serrà et al.): lossless coders on the host, slow.")


def main(argv) -> None:
  """The binary: flags → `predict` → the summary line on stdout."""
  from absl import flags
  from jaxad import cli
  cli.check_no_args(argv)
  f = flags.FLAGS
  with cli.session():
    result = predict(f.input, workdir=f.workdir, scorer_dir=f.scorer, out=f.out,
                     score=f.score, rule=f.rule, threshold=f.threshold, maps=f.maps,
                     batch_size=f.batch_size, top_k=f.top_k, complexity=f.complexity)
  print(summary_line(result))


if __name__ == "__main__":
  from jaxad import cli as _cli
  define_flags()
  _cli.run(main)
