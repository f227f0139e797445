"""Evaluation: a workdir's latest checkpoint → every score → scores files, metrics, report.

`evaluate(workdir, split)` is the eval binary's orchestration: it restores the model,
runs the one scoring pass (`jaxad.scoring`) over the split, and collects what it
yields: sample scores, streaming pixel curves (AUROC/AUPRC and Dice/IoU over
histograms, so memory stays flat), maps written to disk batch by batch, the report's
examples. Every file is written atomically; in a multi-process run every process holds
the same results and process 0 writes the files.

Files, so that no run overwrites another's:

  WORKDIR/eval/<split>/scores.csv, scores.npz, maps.npz (eval.save_maps)
  WORKDIR/eval/<split>/report.html, figures/*.png     one report per split
  WORKDIR/eval/metrics.json                           one entry per split, updated under
                                                      a lock (the others are kept)
  WORKDIR/eval/thresholds.json                        image thresholds chosen on the
                                                      validation split (every labelled
                                                      evaluation rewrites it; read by
                                                      export and predict)
  WORKDIR/eval/input/<name>/                          one folder per --input run: its
      scores.csv, scores.npz, maps.npz, metrics.json  scores, maps and metrics; <name>
                                                      is the input's base name, then
                                                      <name>-2, <name>-3, ... (a new
                                                      folder each run, never reused)

Image thresholds (`image_thresholds`): the validation split's sample scores come from
the same pass as `--split=val`'s; on them every score gets a best-F1 threshold (when
validation has anomalies), mean + eval.n_sigma·std and the eval.threshold_quantile of
its healthy images, and metrics.json reports each on the evaluated split. Pixel maps
add MVTec AD's AUPRO (streamed: per-region weights in the PixelCurve's bins) and, at
each pixel threshold, the mean and median per-image Dice from the whole split's
per-image histograms (kept for every evaluation with maps).

Nothing is written until every score and map is known to be finite (a non-finite one
is a FloatingPointError naming the images, the scores and the checkpoint), so a failed
run leaves the previous files as they were. Maps are collected in a `.maps.*` scratch
folder beside maps.npz; scratch left by a killed run (its process gone) is removed when
the next evaluation of that folder starts (`eval_folders`).
"""

import dataclasses
import os
import shutil
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxad import config as config_lib
from jaxad import eval_folders, files, keys, metrics, parallel, scoring
from jaxad import state as state_lib
from jaxad.data import lesions as lesions_lib
from jaxad.data import pipeline, sources
from jaxad.errors import ConfigError, DataError

def calibration_images(n: int, groups, fraction: float, seed: int) -> tuple[np.ndarray, str]:
  """(is_calibration, what it is) for n scored images: the part Dice thresholds are
  chosen on. Whole patients where `groups` (one id per image) is given, so no patient
  is on both sides; none for fewer than 5 images or a single patient."""
  grouped = groups is not None
  if n < 5 or (grouped and len(np.unique(groups)) < 2):
    return np.zeros(n, bool), "none: fewer than 5 images or a single patient"
  chosen, _ = metrics.calibration_split(n, fraction, seed, groups)
  is_calib = np.zeros(n, bool)
  is_calib[chosen] = True
  unit = "patients (data.group_column)" if grouped else "images"
  return is_calib, (f"calibration split: a random {fraction:g} of the {unit} "
                    f"({len(chosen)} images); Dice/IoU on the rest")


def _pixel_metrics(curves: dict, stats: dict, config, healthy_source: str,
                   calibration: str, is_calib: np.ndarray) -> dict:
  """metrics.json's `pixel` entry: per map AUROC, AUPRC, AUPRO and the thresholds."""
  out = {}
  for name, (whole, calib, report) in curves.items():
    out[name] = {"auroc": whole.auroc(), "auprc": whole.auprc(), "aupro": whole.aupro(),
                 "aupro_max_fpr": metrics.AUPRO_MAX_FPR,
                 "lesion_regions": whole.num_regions, "clipped_pixels": whole.num_clipped,
                 "thresholds": _pixel_thresholds(whole, calib, report, stats.get(name),
                                                 config, healthy_source, calibration,
                                                 is_calib)}
  return out


def _pixel_thresholds(whole, calib, report, stats, config, healthy_source, calibration,
                      is_calib) -> dict:
  """Pooled Dice/IoU and per-image Dice at the calibrated, PR and N-sigma thresholds."""
  images = whole.image_histograms()  # one per scored image, in scoring order
  thresholds = {}
  try:
    t, _ = calib.best_f1_threshold()
    thresholds["calibrated"] = {
        **overlap_at(report, t), "dice_per_image": _dice_per_image(images, t, ~is_calib),
        "chosen_on": calibration}
  except DataError as e:  # e.g. no lesion pixel in the calibration images
    thresholds["calibrated"] = {"error": f"{e} (calibration images: {calibration})"}
  t, _ = whole.best_f1_threshold()
  thresholds["pr_operating_point"] = {
      **overlap_at(whole, t), "dice_per_image": _dice_per_image(images, t),
      "chosen_on": "the evaluated split itself (best F1 on its PR curve)"}
  if stats is not None:
    t = stats["mean"] + config.eval.n_sigma * stats["std"]
    thresholds["n_sigma"] = {
        **overlap_at(whole, t), "dice_per_image": _dice_per_image(images, t),
        "n_sigma": config.eval.n_sigma, "chosen_on": f"healthy {healthy_source} images only"}
  return thresholds


def _dice_per_image(images: metrics.ImageHistograms, threshold: float,
                    report_part: np.ndarray | None = None) -> dict:
  """Mean and median per-image Dice at `threshold` over the images with lesion pixels
  (of the report part only, when given), saying which images those are."""
  out = metrics.per_image_dice(images, threshold, report_part)
  part = " outside the calibration part" if report_part is not None else ""
  out["images"] = (f"each image with lesion pixels{part} counts once, with its own Dice "
                   "(the pooled dice counts every pixel once)")
  return out


def overlap_at(curve: metrics.PixelCurve, threshold: float) -> dict:
  """Dice and IoU at `threshold`; an infinite one gets a `threshold_note`, because
  metrics.json writes it as null (JSON has no infinity)."""
  out = curve.overlap_at(threshold)
  if threshold == -np.inf:
    out["threshold_note"] = ("-inf, written as null (JSON has no infinity): every pixel "
                             "counts as anomalous, the best F1 when the map does not rank "
                             "lesion pixels above the others")
  elif threshold == np.inf:
    out["threshold_note"] = ("inf, written as null (JSON has no infinity): no pixel "
                             "counts as anomalous")
  return out


def _pixel_bootstrap(curve, pixel_result, groups, config) -> dict:
  """Pixel AUROC/AUPRC intervals, and Dice/IoU at the N-σ (else PR) threshold.

  The resamples are binned exactly as the point estimate (the whole-split curve's own
  per-image histograms), so each 'estimate' equals the reported point.
  """
  t = pixel_result["thresholds"]
  chosen = "n_sigma" if "n_sigma" in t else "pr_operating_point"
  out = metrics.pixel_bootstrap(
      curve.image_histograms(), threshold=t[chosen]["threshold"],
      num_resamples=config.eval.bootstrap, seed=config.seed, groups=groups)
  out["threshold"] = chosen
  out["bins"] = curve.num_bins  # the point estimate's bins: the same statistic
  return out


def _sample_metrics(scores, anomalous, class_of, normal_classes, groups, config) -> dict:
  names = sorted(set(class_of))
  out = {"sample": metrics.per_class_table(names, class_of, scores, normal_classes)}
  if config.eval.bootstrap:
    out["bootstrap"] = {
        k: metrics.bootstrap(metrics.auroc, anomalous, v, num_resamples=config.eval.bootstrap,
                             seed=config.seed, groups=groups, stratify=anomalous)
        for k, v in scores.items()}
  out["logistic_regression"] = {k: _logreg(v, anomalous, config.seed)
                                 for k, v in scores.items()}
  return out


def _logreg(values, anomalous, seed) -> dict:
  """The logistic-regression AUROC, or {"error"} when a class has too few images."""
  try:
    return metrics.logistic_regression_auroc(values, anomalous, seed=seed)
  except DataError as err:
    return {"error": str(err)}


def _write_scores(out_dir, ids, index, class_of, anomalous, scores) -> None:
  names = sorted(scores)
  lines = ["id,index,class,anomalous," + ",".join(names)]
  for i in range(len(ids)):
    row = [str(ids[i]).replace(",", "_"), str(index[i]), str(class_of[i]), str(anomalous[i])]
    lines.append(",".join(row + [f"{scores[k][i]:.9g}" for k in names]))
  files.write_text(os.path.join(out_dir, "scores.csv"), "\n".join(lines) + "\n")
  with files.atomic_path(os.path.join(out_dir, "scores.npz")) as tmp:
    with open(tmp, "wb") as f:
      np.savez(f, id=np.asarray(ids, str), index=index, class_name=np.asarray(class_of, str),
               anomalous=anomalous, **scores)


@dataclasses.dataclass
class _Job:
  """What one evaluation scores, with which model, and where its files go."""
  config: ml_collections.ConfigDict
  name: str  # the split's name, or "input"
  split: pipeline.Split
  family: Any
  variables: Any
  step: int
  checkpoint_dir: str  # the checkpoints folder the model came from
  bg: Any  # scoring.Background, or None
  spec: Any  # synthetic lesions, or None
  with_maps: bool
  save_maps: bool  # maps.npz is written (`maps_plan`)
  maps_note: str  # which maps are computed and saved, and why
  mesh: Any
  out_dir: str
  input_path: str | None

  @property
  def source(self):
    return self.split.source

  @property
  def shape(self):
    return state_lib.image_shape(self.config, self.source.spatial_ndim)


def _job(workdir, split, input_path, config, devices) -> _Job:
  """Loads the split (or the unlabelled input), restores the model and its background."""
  started = time.time()
  e = config.eval
  if not 0.0 < e.threshold_quantile < 1.0:  # checked before anything loads or compiles
    raise ConfigError(f"eval.threshold_quantile={e.threshold_quantile} must be strictly "
                      "between 0 and 1: set --config.eval.threshold_quantile=0.95 (about "
                      "5% of healthy validation images flagged)")
  mesh = parallel.make_mesh(devices)
  parallel.local_batch_size(e.batch_size, mesh, "eval.batch_size")
  if input_path:
    source = sources.unlabeled_source(  # a NIfTI-trained model reads volumes
        input_path, 3 if config.data.source == "nifti" else int(config.data.ndim))
    pipeline.check_files(source, config.data)
    data_split, name = pipeline.Split(source, np.array([0])), "input"
  else:
    data_split, name = pipeline.load_split(config.data, split), split
  ndim = data_split.source.spatial_ndim
  model = state_lib.restore_for_eval(config, workdir, ndim, mesh)
  bg = scoring.restore_background(config, workdir, ndim, mesh)
  lesion_cfg = config.data.synthetic_lesions
  spec = lesions_lib.spec_from_config(lesion_cfg, "data.synthetic_lesions") \
      if lesion_cfg.enabled and not input_path else None
  num_images = len(data_split.source) if spec is None else len(data_split.normal_indices)
  with_maps, save_maps, maps_note = maps_plan(
      e, num_images, state_lib.image_shape(config, ndim)[:-1], model.family.pixel_maps,
      for_metrics=data_split.source.has_masks or spec is not None, is_input=bool(input_path))
  if input_path:
    out_dir = eval_folders.input_dir(workdir, input_path)
  else:
    out_dir = os.path.join(workdir, "eval", name)
    os.makedirs(out_dir, exist_ok=True)
  if parallel.is_main_process():
    eval_folders.clean_scratch(out_dir, bool(input_path), started)
  return _Job(config, name, data_split, model.family, model.variables, model.step,
              model.directory, bg, spec, with_maps, save_maps, maps_note, mesh, out_dir,
              input_path)


def maps_plan(e, num_images: int, spatial: tuple[int, ...], map_names, *,
              for_metrics: bool, is_input: bool) -> tuple[bool, bool, str]:
  """(compute the pixel maps, write maps.npz, why): the defaults save maps when they are
  cheap. A labelled split computes them for its pixel metrics (masks or synthetic
  lesions), so saving costs only disk; an --input run computes them to save them
  (gradient maps cost a backward pass per image). Neither beyond eval.max_saved_maps_mb."""
  mib = num_images * int(np.prod(spatial)) * len(map_names) * 4 / 2**20
  size = f"{len(map_names)} maps of {num_images} images, {mib:.1f} MiB"
  if not e.pixel_maps or not map_names:
    return False, False, "no pixel maps (eval.pixel_maps is off, or the family has none)"
  if not for_metrics and not is_input:
    return False, False, ("not computed: the split has no masks and no synthetic lesions "
                          "(python -m jaxad.predict writes maps of any images)")
  if not e.save_maps:
    return for_metrics, False, "not saved: eval.save_maps is off"
  if mib > e.max_saved_maps_mb:
    return for_metrics, False, (
        f"not saved: {size} > eval.max_saved_maps_mb={e.max_saved_maps_mb} (raise it to "
        "save them; python -m jaxad.predict writes per-image maps of any size)")
  why = ("computed for the pixel metrics anyway" if for_metrics else
         "--input run (--config.eval.save_maps=False skips them)")
  return True, True, f"saved in maps.npz: {size}; {why}"


class _Collector:
  """Everything kept from the scored batches: rows, classes, sample scores, pixel
  curves (whole split, calibration part, report part), saved maps, report examples."""

  def __init__(self, job: _Job, stats: dict, positions: np.ndarray):
    e, source = job.config.eval, job.source
    self.job, self.stats, self.seen = job, stats, 0
    self.is_calib, self.calibration = calibration_images(
        len(positions), None if source.groups is None else source.groups[positions],
        e.calibration_fraction, job.config.seed)
    self.index, self.anomalous, self.class_of = [], [], []
    self.nonfinite_maps = {}  # map → row positions (scoring order) of non-finite maps
    self.sample = scoring.SampleScores(job.family, job.bg, scoring.make_coder(job.family,
                                                                              job.config))
    self.curves = {}  # per map: PixelCurves of the whole split, calibration, report
    self.examples = {"normal": [], "anomalous": []}
    self.map_file = None
    self.seconds = 0.0  # the scoring pass's wall time
    if job.save_maps and parallel.is_main_process():
      self.map_file = eval_folders.MapFile(
          os.path.join(job.out_dir, "maps.npz"), len(positions), job.shape[:-1],
          job.family.pixel_maps, with_mask=source.has_masks or job.spec is not None)

  def want_images(self) -> bool:
    half = self.job.config.eval.num_examples // 2
    return any(len(v) < half for v in self.examples.values())

  def add(self, scored: scoring.Scored) -> None:
    valid = scored.valid
    rows = np.arange(self.seen, self.seen + int(valid.sum()))
    self.seen += len(rows)
    self.index.append(scored.index[valid])
    self.anomalous.append(scored.anomalous[valid])
    self.sample.add(scored)
    names = np.asarray(self.job.source.class_names)[scored.label[valid]].astype(object)
    if self.job.spec is not None:
      names[scored.anomalous[valid] > 0] = "lesion"
    self.class_of.append(names)
    finite = self._check_maps(scored, rows)
    if scored.maps and scored.mask is not None and finite:
      self._update_curves(scored, rows)
    if self.map_file is not None:
      saved = {k: v[valid] for k, v in scored.maps.items()}
      if "mask" in self.map_file.arrays:
        saved["mask"] = scored.mask[valid][..., 0]
      self.map_file.write(rows, saved)
    if scored.images is not None:
      self._pick_examples(scored)

  def _check_maps(self, scored, rows) -> bool:
    """Records the images whose maps are not finite; whether all of this batch's are."""
    ok = True
    for k, v in scored.maps.items():
      v = v[scored.valid]
      good = np.isfinite(v.reshape(len(v), -1)).all(axis=1)
      if not good.all():
        self.nonfinite_maps.setdefault(k, []).extend(rows[~good].tolist())
        ok = False
    return ok

  def _update_curves(self, scored, rows) -> None:
    e, valid = self.job.config.eval, scored.valid
    for k, v in scored.maps.items():
      if k not in self.curves:
        value_range = scoring.pixel_range(self.stats.get(k, {}).get("max"))
        self.curves[k] = [metrics.PixelCurve(e.pixel_bins, value_range,
                                             keep_images=whole, regions=whole)
                          for whole in (True, False, False)]
      v, m, calib = v[valid], scored.mask[valid][..., 0], self.is_calib[rows]
      for curve, keep in zip(self.curves[k], (slice(None), calib, ~calib)):
        if len(v[keep]):
          curve.update(v[keep], m[keep])

  def _pick_examples(self, scored) -> None:
    half, picked = self.job.config.eval.num_examples // 2, []
    for j in np.flatnonzero(scored.valid):
      kind = "anomalous" if scored.anomalous[j] else "normal"
      if len(self.examples[kind]) < half:
        self.examples[kind].append({
            "id": str(self.job.source.ids[scored.index[j]]), "image": scored.images[j],
            "mask": None if scored.mask is None else scored.mask[j, ..., 0],
            "maps": {k: v[j] for k, v in scored.maps.items()}})
        picked.append((self.examples[kind][-1], j))
    if picked and not self.job.input_path:
      _add_reconstructions(picked, self.job.family, self.job.variables, scored.placed,
                           scored.placed_index, scored.key)


def _healthy_stats(job: _Job, score_fn) -> tuple[dict, str | None]:
  """The N-sigma threshold and histogram range of every map, from healthy images."""
  if not job.with_maps or job.input_path:
    return {}, None
  healthy, source = scoring.healthy_split(job.config)
  stats = scoring.healthy_map_stats(score_fn, job.variables, healthy, job.config,
                                    job.mesh, job.config.seed)
  bad = sorted(k for k, v in stats.items()
               if not all(np.isfinite(v[s]) for s in ("mean", "std", "max")))
  if bad:
    raise FloatingPointError(
        f"the checkpoint at step {job.step} in {job.checkpoint_dir} gives non-finite "
        f"{', '.join(bad)} maps on the healthy {source} images (the N-sigma thresholds), "
        f"so nothing was written: {_FINITE_FIX}")
  return stats, source


_FINITE_FIX = ("train a new --workdir with a lower --config.train.learning_rate (or "
               "--config.train.grad_clip), or evaluate a workdir whose model converged")


def check_finite(job: _Job, ids, scores: dict, nonfinite_maps: dict) -> None:
  """Raises FloatingPointError, naming the images, the scores and the checkpoint, when
  any sample score or map is NaN or infinite (before any result file is written)."""
  bad = {k: ~np.isfinite(v) for k, v in scores.items() if not np.all(np.isfinite(v))}
  for k, rows in nonfinite_maps.items():
    mask = np.zeros(len(ids), bool)
    mask[rows] = True
    bad[f"{k} map"] = mask
  if not bad:
    return
  images = np.flatnonzero(np.any(np.stack(list(bad.values())), axis=0))
  shown = ", ".join(str(ids[i]) for i in images[:5]) + (", ..." if len(images) > 5 else "")
  if all(k.endswith("_llr") for k in bad) and job.bg is not None:
    where = f"the background model's checkpoint at step {job.bg.step} in {job.bg.directory}"
  else:
    where = f"the checkpoint at step {job.step} in {job.checkpoint_dir}"
  raise FloatingPointError(
      f"{where} gives non-finite scores for {len(images)} of {len(ids)} images "
      f"({shown}): {', '.join(sorted(bad))}; no result file was written (the previous "
      f"ones are kept): {_FINITE_FIX}")


def _score(job: _Job, stats: dict) -> _Collector:
  """The scoring pass over the split (its normal images, lesioned, with a lesion spec)."""
  config = job.config
  positions = np.arange(len(job.source)) if job.spec is None else job.split.normal_indices
  collector = _Collector(job, stats, positions)
  batches = scoring.batches(job.split, config) if job.spec is None else \
      scoring.lesioned_batches(job.split, config, job.spec)
  from tqdm.auto import tqdm
  bar = tqdm(total=len(positions), unit="img", disable=jax.process_index() != 0,
             mininterval=1.0, desc=f"scoring {job.name}")
  started = time.perf_counter()
  for scored in scoring.score_split(
      scoring.make_score_fn(job.family, job.with_maps), job.variables, batches, job.mesh,
      keys.purpose_key(config.seed, keys.EVAL), bg=job.bg, coder=collector.sample.coder,
      want_images=collector.want_images):
    collector.add(scored)
    bar.update(int(scored.valid.sum()))
  bar.close()
  collector.seconds = time.perf_counter() - started
  return collector


def throughput(num_images: int, seconds: float, coder) -> dict:
  """The scoring pass's images/s, and the host coders' own (complexity code lengths,
  coded beside the device; `coder_wall_s` near `seconds` means they were the bottleneck,
  cache hits cost nothing)."""
  out = {"images": num_images, "seconds": seconds,
         "images_per_s": num_images / seconds if seconds > 0 else None}
  if coder is not None:
    stats = coder.stats()  # exact: SampleScores.result closed the pool
    out.update(coder_images=stats["images"],  # with the padding of the last batch
               coder_images_per_s=stats["images_per_s"], coder_cache_hits=stats["cached"],
               coder_coded=stats["coded"], coder_wall_s=stats["coder_wall_s"])
  return out


def _results(job: _Job, got: _Collector, stats, healthy_source, index, anomalous, class_of,
             scores) -> tuple[dict, dict | None]:
  """metrics.json's entry for the split (counts, sample and pixel metrics, ranking,
  image thresholds) and thresholds.json's content (None: no thresholds to write)."""
  config, source = job.config, job.source
  groups = None if source.groups is None else source.groups[index]
  result = {"split": job.name, "step": job.step, "num_images": int(len(index)),
            "num_anomalous": int(anomalous.sum()), "family": config.model.family,
            "num_samples": config.eval.num_samples,
            "synthetic_lesions": job.spec is not None,
            "folder": os.path.relpath(job.out_dir, os.path.dirname(job.checkpoint_dir))}
  if job.input_path:
    result["input"] = os.path.abspath(job.input_path)
  result["maps"] = job.maps_note
  result["throughput"] = throughput(int(len(index)), got.seconds, got.sample.coder)
  if job.bg is not None:
    result["background"] = job.bg.describe()
  if not job.input_path and 0 < anomalous.sum() < len(anomalous):
    normal_names = sorted(set(class_of[anomalous == 0]))
    result.update(_sample_metrics(scores, anomalous, class_of, normal_names, groups, config))
  val = _validation(job, scores, anomalous)
  if "sample" in result:
    result["ranking"] = score_ranking(
        result["sample"], None if val is None or job.name == "val" else val.auroc(),
        job.name)
  thresholds = None
  if not job.input_path:
    result["image_thresholds"], thresholds = image_thresholds(
        val, scores, anomalous, job.family, config, job.name)
    if thresholds is not None:
      thresholds = {"step": job.step, **thresholds, **_map_thresholds(stats, config)}
  if got.curves:
    result["pixel"] = _pixel_metrics(got.curves, stats, config, healthy_source,
                                     got.calibration, got.is_calib)
    for k, (whole, _, _) in got.curves.items():
      if not config.eval.bootstrap:
        break
      try:  # one histogram per scored image, in the order of `index`
        result["pixel"][k]["bootstrap"] = _pixel_bootstrap(
            whole, result["pixel"][k], groups, config)
      except DataError as err:  # e.g. too few lesion images to resample
        result["pixel"][k]["bootstrap"] = {"error": str(err)}
  if stats:
    result["healthy_map_stats"] = stats
  return result, thresholds


def _validation(job: _Job, scores: dict, anomalous: np.ndarray):
  """The validation split's scores (`scoring.ValidationScores`): this pass's own when
  the evaluated split is the (unlesioned) validation split, else one more pass; None
  for an --input run or without a validation split."""
  if job.input_path:
    return None
  if job.name == "val" and job.spec is None:
    return scoring.ValidationScores(scores, anomalous.astype(bool))
  return scoring.validation_scores(job.family, job.variables, job.config, job.mesh,
                                   job.source.spatial_ndim, job.bg)


NO_VALIDATION = ("no validation split (data.val_split, or data.val_fraction of the "
                 "training split): no image thresholds were chosen and thresholds.json "
                 "was not written; hold out a validation split to choose them without "
                 "peeking at the evaluated images")


def image_thresholds(val, scores: dict, anomalous: np.ndarray, family, config,
                     split: str) -> tuple[dict, dict | None]:
  """(metrics.json's `image_thresholds`, thresholds.json's chosen_on/default/scores).

  Every rule of every score is chosen on `val` (`metrics.image_thresholds`) and scored
  on the evaluated split (`metrics.binary_metrics`: sensitivity, specificity,
  precision, F1, confusion counts). None for the file without a validation split.
  """
  if val is None:
    return {"note": NO_VALIDATION}, None
  rules, section = {}, {}
  for k, v in val.scores.items():
    try:
      rules[k] = metrics.image_thresholds(val.anomalous, v, config.eval.n_sigma,
                                          config.eval.threshold_quantile)
    except DataError as err:  # non-finite validation scores of a diverged model
      section[k] = {"error": f"no threshold for {k}: {err}"}
      continue
    section[k] = {rule: {**chosen, **metrics.binary_metrics(anomalous, scores[k],
                                                            chosen["threshold"])}
                  for rule, chosen in rules[k].items()}
  if not rules:
    return {"note": "every validation score is non-finite: no image thresholds",
            "scores": section}, None
  chosen_on = val.describe()
  default = default_threshold(val, rules, family)
  out = {"chosen_on": chosen_on, "evaluated_on": f"{split} split: {len(anomalous)} images, "
         f"{int(anomalous.sum())} anomalous", "default": default, "scores": section}
  if split == "val":
    out["note"] = ("the thresholds were chosen on the validation split, the split reported "
                   "here: its sensitivity, specificity and F1 are optimistic (the test "
                   "split's are an honest estimate)")
  return out, {"chosen_on": chosen_on, "default": default, "scores": rules}


def default_threshold(val, rules: dict, family) -> dict:
  """The (score, rule) predict uses by default: the best validation AUROC with its best
  F1 threshold when validation has anomalies, else the family's first sample score at
  N sigma of the healthy validation scores.

  Only scores an exported scorer computes (the family's and the `*_llr` ones) can be the
  default: complexity-corrected scores need host coders (`predict --complexity`), so a
  better one is named in `why` instead.
  """
  auroc = val.auroc() or {}
  ranked = [k for k in rules if auroc.get(k) is not None and "best_f1" in rules[k]]
  in_scorer = [k for k in ranked if k in family.sample_scores or k.endswith("_llr")]
  if in_scorer:
    best = max(in_scorer, key=lambda k: auroc[k])  # the ranking's best: the first maximum
    overall = max(ranked, key=lambda k: auroc[k])
    why = "best validation AUROC; best F1 because validation has anomalies"
    if overall != best:
      why += (f" ({overall} ranks higher but needs the host's coders: "
              f"predict --complexity --score={overall})")
    return {"score": best, "rule": "best_f1", "why": why}
  first = next((k for k in family.sample_scores if k in rules), next(iter(rules)))
  return {"score": first, "rule": "n_sigma",
          "why": "the family's first sample score, N sigma of the healthy validation "
                 "scores: validation has no anomalous image to rank scores or fit F1 on"}


def _map_thresholds(stats: dict, config) -> dict:
  """thresholds.json's `maps`: each map's N-sigma pixel threshold (healthy maps)."""
  if not stats:
    return {}
  n = float(config.eval.n_sigma)
  return {"maps": {k: {"n_sigma": {"threshold": s["mean"] + n * s["std"], "n_sigma": n,
                                   "mean": s["mean"], "std": s["std"]}}
                   for k, s in stats.items()}}


def evaluate(workdir: str, *, split: str = "test", input_path: str | None = None,
             config: ml_collections.ConfigDict | None = None, devices=None) -> dict:
  """Scores a split (or the unlabelled images at `input_path`); returns the metrics.

  Writes `workdir/eval/<split>/scores.{csv,npz}` (and `maps.npz` with eval.save_maps),
  this split's entry of `workdir/eval/metrics.json`, `workdir/eval/thresholds.json`
  (when there is a validation split) and `workdir/eval/<split>/report.html`;
  an --input run writes its scores, maps and metrics.json into a new folder
  `workdir/eval/input/<name>[-N]` (module docstring). Nothing is written when a score
  or map is not finite.
  """
  config = config_lib.load_workdir_config(workdir) if config is None else config
  job = _job(workdir, split, input_path, config, devices)
  got = None
  try:
    stats, healthy_source = _healthy_stats(job, scoring.make_score_fn(job.family,
                                                                      job.with_maps))
    got = _score(job, stats)
    index = np.concatenate(got.index)
    anomalous = np.concatenate(got.anomalous).astype(np.int32)
    class_of = np.concatenate(got.class_of).astype(str)
    scores = got.sample.result(config, job.shape)
    ids = job.source.ids[index]
    check_finite(job, ids, scores, got.nonfinite_maps)
    result, thresholds = _results(job, got, stats, healthy_source, index, anomalous,
                                  class_of, scores)
    grid = None if input_path else _example_grid(got.examples)
  except BaseException:
    if got is not None and got.map_file is not None:
      got.map_file.discard()
    if input_path and parallel.is_main_process():
      shutil.rmtree(job.out_dir, ignore_errors=True)  # this run's own new folder
    raise
  if parallel.is_main_process():
    _write_scores(job.out_dir, ids, index, class_of, anomalous, scores)
  if got.map_file is not None:
    got.map_file.close({"index": index, "id": np.asarray(ids, str)})
  if parallel.is_main_process():
    if input_path:
      files.write_json(os.path.join(job.out_dir, "metrics.json"), result)
    else:
      files.update_json(os.path.join(workdir, "eval", "metrics.json"), job.name, result)
      if thresholds is not None:
        files.write_json(os.path.join(workdir, "eval", "thresholds.json"), thresholds)
      _write_report(job.out_dir, job.name, result, scores, class_of, anomalous, grid)
  return result


def score_ranking(sample: dict, val_auroc: dict | None, split: str) -> dict:
  """Every score ordered by the AUROC to trust: the validation split's when it has
  anomalies, else this split's own (then said, since picking the best score on the
  split it is reported on flatters it)."""
  if val_auroc is not None:
    by, values = "validation AUROC", val_auroc
    note = ("scores ranked on the validation split; the test numbers of the chosen score "
            "are an honest estimate")
  else:
    by = f"{split} AUROC"
    values = {k: row["all"]["auroc"] for k, row in sample.items()}
    note = (f"ranked on the {split} split itself: " + (
        "it is the validation split" if split == "val" else
        "the validation split has no anomalous image (or none exists), so the best "
        "score's AUROC is optimistic; label some validation anomalies to choose "
        "without peeking"))
  known = [k for k in sample if values.get(k) is not None]
  order = sorted(known, key=lambda k: -values[k]) + [k for k in sample if k not in known]
  return {"by": by, "note": note, "order": order, "best": order[0] if known else None,
          "auroc": {k: values.get(k) for k in order}}


def _add_reconstructions(picked, family, variables, images, index, rng) -> None:
  """Stores each picked example's reconstruction, from its whole batch and the keys its
  images were scored with (the GAN's latent search then ends where the scored one did).
  Runs on every process: it is a computation over the global mesh."""
  recon = scoring.make_reconstruct_fn(family)(variables, images, index, rng)
  if recon is None:
    return
  recon = parallel.allgather(recon)
  for example, j in picked:
    example["reconstruction"] = recon[j]


def _example_grid(examples) -> dict | None:
  """The report's example images, reconstructions, maps and masks."""
  chosen = examples["normal"] + examples["anomalous"]
  if not chosen:
    return None
  grid = {"ids": [x["id"] for x in chosen], "images": np.stack([x["image"] for x in chosen])}
  if "reconstruction" in chosen[0]:
    grid["reconstructions"] = np.stack([x["reconstruction"] for x in chosen])
  if chosen[0]["maps"]:
    grid["maps"] = {k: np.stack([x["maps"][k] for x in chosen]) for k in chosen[0]["maps"]}
  if chosen[0]["mask"] is not None:
    grid["masks"] = np.stack([x["mask"] for x in chosen])
  return grid


def _write_report(out_dir, name, result, scores, class_of, anomalous, grid) -> None:
  """out_dir/report.html and out_dir/figures/: one report per split."""
  from jaxad import report
  report.write_report(out_dir, title=f"jaxad evaluation: {name} split",
                      metrics=result, scores=scores, class_names=class_of,
                      anomalous=anomalous, examples=grid)


def headline_table(result: dict) -> str:
  """The numbers people look for first, as a plain-text table."""
  lines = [f"{result['split']}: {result['num_images']} images, "
           f"{result['num_anomalous']} anomalous (checkpoint step {result['step']})"]
  w = max([10] + [len(k) for k in (*result.get("sample", {}), *result.get("pixel", {}))])
  if "sample" in result:
    ranking = result.get("ranking") or {"order": list(result["sample"]), "auroc": {}}
    by = "valAUROC" if ranking.get("by") == "validation AUROC" else "rank by"
    lines.append(f"  {'score':<{w}} {'AUROC':>7} {'AUPRC':>7} {'95% CI':>15} {'logreg':>7} "
                 f"{by:>8}")
    for k in ranking["order"]:
      row = result["sample"][k]
      ci = result.get("bootstrap", {}).get(k)
      ci = f"[{ci['low']:.3f}, {ci['high']:.3f}]" if ci else ""
      lr = result["logistic_regression"][k].get("auroc", float("nan"))
      rank = ranking["auroc"].get(k)
      rank = f"{rank:.3f}" if rank is not None else "-"
      mark = "* " if k == ranking.get("best") else "  "
      lines.append(f"{mark}{k:<{w}} {row['all']['auroc']:>7.3f} {row['all']['auprc']:>7.3f} "
                   f"{ci:>15} {lr:>7.3f} {rank:>8}")
    if "by" in ranking:
      lines.append(f"(ordered by {ranking['by']}; * = best: {ranking['note']})")
  if "image_thresholds" in result:
    lines.append(threshold_line(result["image_thresholds"]))
  if "pixel" in result:
    lines.append(f"  {'map':<{w}} {'pxAUROC':>7} {'95% CI':>15} {'pxAUPRC':>7} "
                 f"{'pxAUPRO':>7} {'Dice@cal':>8} {'Dice@PR':>8} {'Dice@Nσ':>8}")
    for k, m in result["pixel"].items():
      t = m["thresholds"]
      dice = lambda key: f"{t[key]['dice']:.3f}" if "dice" in t.get(key, {}) else "-"
      ci = m.get("bootstrap", {}).get("auroc")
      ci = f"[{ci['low']:.3f}, {ci['high']:.3f}]" if ci else ""
      lines.append(f"  {k:<{w}} {m['auroc']:>7.3f} {ci:>15} {m['auprc']:>7.3f} "
                   f"{_number(m.get('aupro')):>7} {dice('calibrated'):>8} "
                   f"{dice('pr_operating_point'):>8} {dice('n_sigma'):>8}")
  if "throughput" in result:
    lines.append(throughput_line(result["throughput"]))
  return "\n".join(lines)


def throughput_line(t: dict) -> str:
  """`scored N images in S s (X images/s); host coders: Y images/s, H cached`."""
  rate = lambda v: "-" if v is None or v != v else f"{v:.1f}"
  line = f"scored {t['images']} images in {t['seconds']:.1f} s ({rate(t['images_per_s'])} images/s)"
  if "coder_images_per_s" in t:
    line += (f"; host complexity coders: {rate(t['coder_images_per_s'])} images/s, "
             f"{t['coder_cache_hits']} of {t['coder_images']} from the cache")
  return line


def _number(value) -> str:
  return "-" if value is None else f"{value:.3f}"


def threshold_line(section: dict) -> str:
  """The headline's image-threshold line: the default (score, rule) on this split."""
  default = section.get("default")
  if default is None:
    return f"image threshold: none ({section['note'].split(':')[0]})"
  row = section["scores"][default["score"]][default["rule"]]
  return (f"image threshold: {default['score']} >= {row['threshold']:.4g} "
          f"({default['rule']} on validation): sensitivity {_number(row['sensitivity'])}, "
          f"specificity {_number(row['specificity'])}, F1 {_number(row['f1'])}")
