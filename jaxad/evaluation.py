"""Evaluation: a workdir's latest checkpoint → every score → scores files, metrics, report.

`evaluate(workdir, split)` scores every image of a split exactly once (padded batches
carry `index` and `valid`), sample-wise with L samples in one pass and pixel-wise with
`jax.grad` maps when masks (or synthetic lesions) exist. Pixel AUROC/AUPRC and Dice/IoU
stream over histograms, so memory stays flat however large the split; maps, when
saved, go to disk batch by batch. Every file is written atomically.

Multi-process: each process scores its shard of every global batch, then every process
gathers the whole batch (`parallel.allgather`) and runs the same bookkeeping, so all
return the same result and process 0 writes one scores file in the single-process order.
"""

import functools
import os
import shutil
import tempfile
import zipfile

import jax
import ml_collections
import numpy as np

from jaxad import background, checkpoint, compile_options, defaults, files, metrics, parallel
from jaxad import trainer
from jaxad.data import lesions as lesions_lib
from jaxad.data import pipeline, sources
from jaxad.errors import CheckpointError, DataError
from jaxad.scores import complexity as complexity_lib

EVAL, HEALTHY = 3, 4  # key purposes (trainer uses 0–2)
RANGE_FACTOR = 4.0  # pixel curves span [0, RANGE_FACTOR × the healthy maps' maximum]


def _merge(config: ml_collections.ConfigDict, saved: dict) -> None:
  for key, value in saved.items():
    if key not in config:
      continue  # a key this version no longer has
    if isinstance(config[key], ml_collections.ConfigDict) and isinstance(value, dict):
      _merge(config[key], value)
    else:
      config[key] = tuple(value) if isinstance(value, list) else value


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The workdir's resolved config on top of today's defaults (new keys keep defaults)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise CheckpointError(f"{path} not found: {workdir} is not a training workdir "
                          "(train first: python -m jaxad.train --workdir=...)")
  config = defaults.get_config()
  _merge(config, files.read_json(path))
  return config


def restore_variables(config, workdir: str, spatial_ndim: int, mesh):
  """The model family and the latest checkpoint's variables, replicated on `mesh`.

  The variables hold the EMA parameters when the run kept an EMA (score models).
  """
  family, tx = trainer.build(config, spatial_ndim)
  shape = trainer.image_shape(config, spatial_ndim)
  ckpt = checkpoint.Checkpoints(workdir)
  try:
    state = ckpt.restore(trainer.create_state(family, tx, shape, config.seed, mesh,
                                              ema=bool(config.train.ema_rate)))
  finally:
    ckpt.close()
  variables = {"params": trainer.eval_params(state), **state.model_state}
  return family, variables, int(state.step)


@functools.lru_cache(maxsize=8)
def make_score_fn(family, with_maps: bool):
  """One jitted pass: every sample-wise score, and the pixel maps when asked.

  Cached, so evaluating several splits (or workdirs of one architecture) compiles once.
  """
  return compile_options.jit(functools.partial(family.score, with_maps=with_maps))


@functools.lru_cache(maxsize=8)
def make_reconstruct_fn(family):
  """What the report's grid shows beside each image (None if the family has nothing),
  from the batch and the key its scores came from."""
  return compile_options.jit(family.reconstruct)


class _MapFile:
  """Pixel maps (and masks) written to per-name .npy memmaps, zipped into maps.npz."""

  def __init__(self, path: str, n: int, spatial: tuple[int, ...], names, with_mask: bool):
    self.path, self.tmp = path, tempfile.mkdtemp(dir=os.path.dirname(path), prefix=".maps.")
    types = {**{k: np.float32 for k in names}, **({"mask": np.uint8} if with_mask else {})}
    self.arrays = {k: np.lib.format.open_memmap(os.path.join(self.tmp, f"{k}.npy"), "w+",
                                                t, (n, *spatial)) for k, t in types.items()}

  def write(self, positions: np.ndarray, maps: dict) -> None:
    for k, v in maps.items():
      self.arrays[k][positions] = v

  def close(self, extra: dict) -> None:
    for a in self.arrays.values():
      a.flush()
    with files.atomic_path(self.path) as tmp:
      with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for k in self.arrays:
          with open(os.path.join(self.tmp, f"{k}.npy"), "rb") as src, \
               zf.open(f"{k}.npy", "w", force_zip64=True) as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
        for k, v in extra.items():
          with zf.open(f"{k}.npy", "w", force_zip64=True) as dst:
            np.lib.format.write_array(dst, np.asarray(v))
    self.arrays = {}
    shutil.rmtree(self.tmp, ignore_errors=True)


def _batches(split, config, *, normal_only=False, process_index=None, process_count=None):
  return pipeline.eval_batches(
      split, config.data, global_batch=config.eval.batch_size, normal_only=normal_only,
      process_index=jax.process_index() if process_index is None else process_index,
      process_count=jax.process_count() if process_count is None else process_count)


def donor_reader(split, data):
  """indices → those images of `split` through the pipeline (patch lesion donors), so a
  donor has exactly the pixels it has in its own batch."""
  def read(indices):
    subset = pipeline.Split(split.source.subset(indices), split.normal_labels)
    return next(pipeline.eval_batches(subset, data, global_batch=len(indices)))["image"]
  return read


def lesioned_batches(split, config, spec, *, process_index=None, process_count=None):
  """This process's eval batches of the split's normal images with synthetic lesions.

  `image`, `mask` and `anomalous` of each image depend on (spec, its index) alone, not
  on eval.batch_size, the devices or the processes: patch donors are drawn over the
  whole split and read through the pipeline (`lesions.add_lesions`).
  """
  read = donor_reader(split, config.data)
  for batch in _batches(split, config, normal_only=True, process_index=process_index,
                        process_count=process_count):
    images, mask, anomalous = lesions_lib.add_lesions(
        batch["image"], batch["index"], spec, num_images=len(split.source),
        read_donors=read)
    yield {**batch, "image": images, "mask": mask, "anomalous": anomalous}


def healthy_map_stats(score_fn, variables, split, config, mesh, seed) -> dict:
  """Mean, std and max of each pixel map over healthy images (no anomalous data)."""
  sums = {}
  for i, batch in enumerate(_batches(split, config, normal_only=True)):
    images = parallel.put_batch(batch["image"], mesh)
    _, maps = score_fn(variables, images, jax.random.fold_in(
        trainer.purpose_key(seed, HEALTHY), i))
    maps, valid = parallel.allgather((maps, batch["valid"]))  # the whole global batch
    valid = valid > 0
    for k, v in maps.items():
      v = v[valid].astype(np.float64)
      total, squares, count, peak = sums.get(k, (0.0, 0.0, 0, -np.inf))
      sums[k] = (total + v.sum(), squares + (v * v).sum(), count + v.size,
                 max(peak, float(v.max())))
  stats = {}
  for k, (s1, s2, n, mx) in sums.items():
    mean = s1 / n
    stats[k] = {"mean": mean, "std": float(np.sqrt(max(s2 / n - mean * mean, 0.0))),
                "max": float(mx), "num_pixels": int(n)}
  return stats


def pixel_range(healthy_max: float | None) -> tuple[float, float] | None:
  """A map's PixelCurve range: [0, RANGE_FACTOR × its maximum over healthy images].

  Lesions up to that much brighter than anything healthy keep their own bins; values
  above land in the top bin and are reported as clipped_pixels. None (the first
  batch's range, widened) when there is no healthy maximum or it is not positive.
  """
  if healthy_max is None or not healthy_max > 0:
    return None
  return 0.0, RANGE_FACTOR * float(healthy_max)


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
                   calibration: str) -> dict:
  out = {}
  for name, (whole, calib, report) in curves.items():
    m = {"auroc": whole.auroc(), "auprc": whole.auprc(), "clipped_pixels": whole.num_clipped}
    thresholds = {}
    try:
      t, _ = calib.best_f1_threshold()
      thresholds["calibrated"] = {**overlap_at(report, t), "chosen_on": calibration}
    except DataError as e:  # e.g. no lesion pixel in the calibration images
      thresholds["calibrated"] = {"error": f"{e} (calibration images: {calibration})"}
    t, _ = whole.best_f1_threshold()
    thresholds["pr_operating_point"] = {
        **overlap_at(whole, t),
        "chosen_on": "the evaluated split itself (best F1 on its PR curve)"}
    if name in stats:
      t = stats[name]["mean"] + config.eval.n_sigma * stats[name]["std"]
      thresholds["n_sigma"] = {**overlap_at(whole, t), "n_sigma": config.eval.n_sigma,
                               "chosen_on": f"healthy {healthy_source} images only"}
    m["thresholds"] = thresholds
    out[name] = m
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


def evaluate(workdir: str, *, split: str = "test", input_path: str | None = None,
             config: ml_collections.ConfigDict | None = None, devices=None) -> dict:
  """Scores a split (or the unlabelled images at `input_path`); returns the metrics.

  Writes `workdir/eval/<split>/scores.{csv,npz}` (and `maps.npz` with eval.save_maps),
  `workdir/eval/metrics.json` (one entry per split) and `workdir/eval/report.html`.
  """
  config = load_config(workdir) if config is None else config
  e = config.eval
  mesh = parallel.make_mesh(devices)
  parallel.local_batch_size(e.batch_size, mesh, "eval.batch_size")
  if input_path:
    source = sources.unlabeled_source(input_path, int(config.data.ndim))
    pipeline.check_files(source, config.data)
    data_split, name = pipeline.Split(source, np.array([0])), "input"
  else:
    data_split, name = pipeline.load_split(config.data, split), split
  source = data_split.source
  family, variables, step = restore_variables(config, workdir, source.spatial_ndim, mesh)
  bg = restore_background(config, workdir, source.spatial_ndim, mesh)
  lesion_cfg = config.data.synthetic_lesions
  spec = lesions_lib.spec_from_config(lesion_cfg, "data.synthetic_lesions") \
      if lesion_cfg.enabled and not input_path else None
  with_maps = bool(e.pixel_maps and (source.has_masks or spec is not None or
                                     (input_path and e.save_maps)))
  score_fn = make_score_fn(family, with_maps)
  out_dir = os.path.join(workdir, "eval", name)
  os.makedirs(out_dir, exist_ok=True)

  # Healthy statistics: the N-sigma threshold and the histogram range of every map.
  stats, healthy_source = {}, None
  if with_maps and not input_path:
    healthy = pipeline.load_split(config.data, "val")
    healthy_source = "validation"
    if healthy is None:
      healthy = pipeline.load_split(config.data, "train")
      healthy_source = "training"
    stats = healthy_map_stats(score_fn, variables, healthy, config, mesh, config.seed)

  positions = np.arange(len(source)) if spec is None else data_split.normal_indices
  n = len(positions)
  is_calib, calibration = calibration_images(
      n, None if source.groups is None else source.groups[positions],
      e.calibration_fraction, config.seed)
  curves = {}  # per map: PixelCurves of the whole split, calibration and report images
  map_file = None
  shape = trainer.image_shape(config, source.spatial_ndim)
  if with_maps and e.save_maps and parallel.is_main_process():
    map_file = _MapFile(os.path.join(out_dir, "maps.npz"), n, shape[:-1], family.pixel_maps,
                        with_mask=source.has_masks or spec is not None)

  index, anomalous, class_of = [], [], []
  scores = {k: [] for k in _score_names(family, bg)}
  coder = _coder(family, config)
  lengths = {k: [] for k in (coder.names if coder else ())}
  examples = {"normal": [], "anomalous": []}
  seen = 0
  key = trainer.purpose_key(config.seed, EVAL)
  from tqdm.auto import tqdm
  bar = tqdm(total=n, unit="img", disable=jax.process_index() != 0, mininterval=1.0,
             desc=f"scoring {name}")
  batches = _batches(data_split, config) if spec is None else \
      lesioned_batches(data_split, config, spec)
  for b, batch in enumerate(batches):
    images, is_anomalous, mask = batch["image"], batch["anomalous"], batch.get("mask")
    placed, batch_key = parallel.put_batch(images, mesh), jax.random.fold_in(key, b)
    coded = coder.submit(images) if coder else None  # host threads, beside the device
    out, maps = _score_batch(score_fn, variables, bg, placed, batch_key)
    # From here on every process holds the whole global batch (images only while the
    # report still wants examples: they are the largest thing to gather).
    want_images = any(len(v) < e.num_examples // 2 for v in examples.values())
    out, maps, mask, is_anomalous, images, batch, coded = parallel.allgather(
        (out, maps, mask, is_anomalous, images if want_images else None,
         {k: batch[k] for k in ("index", "valid", "label")},
         coded.result() if coded else None))
    valid = batch["valid"] > 0
    rows = np.arange(seen, seen + int(valid.sum()))
    seen += len(rows)
    index.append(batch["index"][valid])
    anomalous.append(is_anomalous[valid])
    for k in scores:
      scores[k].append(out[k][valid])
    for k in lengths:
      lengths[k].append(coded[k][valid])
    labels = batch["label"][valid]
    names = np.asarray(source.class_names)[labels].astype(object)
    if spec is not None:
      names[is_anomalous[valid] > 0] = "lesion"
    class_of.append(names)
    if maps and mask is not None:
      for k, v in maps.items():
        if k not in curves:
          value_range = pixel_range(stats.get(k, {}).get("max"))
          curves[k] = [metrics.PixelCurve(e.pixel_bins, value_range,
                                          keep_images=bool(e.bootstrap) and whole)
                       for whole in (True, False, False)]
        v, m, calib = v[valid], mask[valid][..., 0], is_calib[rows]
        for curve, keep in zip(curves[k], (slice(None), calib, ~calib)):
          if len(v[keep]):
            curve.update(v[keep], m[keep])
    if map_file is not None:
      saved = {k: v[valid] for k, v in maps.items()}
      if "mask" in map_file.arrays:
        saved["mask"] = mask[valid][..., 0]
      map_file.write(rows, saved)
    picked = []
    for j in np.flatnonzero(valid) if want_images else ():
      kind = "anomalous" if is_anomalous[j] else "normal"
      if len(examples[kind]) < e.num_examples // 2:
        examples[kind].append({"id": str(source.ids[batch["index"][j]]),
                               "image": images[j],
                               "mask": None if mask is None else mask[j, ..., 0],
                               "maps": {k: v[j] for k, v in maps.items()}})
        picked.append((examples[kind][-1], j))
    if picked and not input_path:
      _add_reconstructions(picked, family, variables, placed, batch_key)
    bar.update(len(rows))
  bar.close()

  index = np.concatenate(index)
  anomalous = np.concatenate(anomalous).astype(np.int32)
  class_of = np.concatenate(class_of).astype(str)
  scores = _derived_scores(family, config, shape, scores, lengths, coder, bg)
  ids = source.ids[index]
  if jax.process_index() == 0:
    _write_scores(out_dir, ids, index, class_of, anomalous, scores)
  if map_file is not None:
    map_file.close({"index": index, "id": np.asarray(ids, str)})
  if not np.all(np.isfinite(np.stack(list(scores.values())))):
    bad = [k for k, v in scores.items() if not np.all(np.isfinite(v))]
    raise FloatingPointError(f"non-finite scores {bad}: the checkpoint may have diverged")

  result = {"split": name, "step": step, "num_images": int(len(index)),
            "num_anomalous": int(anomalous.sum()), "family": config.model.family,
            "num_samples": e.num_samples,
            "synthetic_lesions": spec is not None}
  if not input_path and 0 < anomalous.sum() < len(anomalous):
    normal_names = sorted(set(class_of[anomalous == 0]))
    groups = None if source.groups is None else source.groups[index]
    result.update(_sample_metrics(scores, anomalous, class_of, normal_names, groups, config))
  if "sample" in result:
    result["ranking"] = score_ranking(
        result["sample"], None if input_path or name == "val" else
        validation_auroc(family, variables, config, mesh, source.spatial_ndim, bg), name)
  if curves:
    result["pixel"] = _pixel_metrics(curves, stats, config, healthy_source, calibration)
    groups = None if source.groups is None else source.groups[index]
    for k, (whole, _, _) in curves.items():
      if not e.bootstrap:
        break
      try:  # one histogram per scored image, in the order of `index`
        result["pixel"][k]["bootstrap"] = _pixel_bootstrap(
            whole, result["pixel"][k], groups, config)
      except DataError as err:  # e.g. too few lesion images to resample
        result["pixel"][k]["bootstrap"] = {"error": str(err)}
  if stats:
    result["healthy_map_stats"] = stats
  grid = None if input_path else _example_grid(examples)
  if parallel.is_main_process():
    path = os.path.join(workdir, "eval", "metrics.json")
    everything = files.read_json(path) if os.path.exists(path) else {}
    everything[name] = result
    files.write_json(path, everything)
    if not input_path:
      _write_report(workdir, name, result, scores, class_of, anomalous, grid)
  return result


def restore_background(config, workdir: str, spatial_ndim: int, mesh):
  """(family, variables) of the likelihood ratio's background model, or None when
  background.enabled is off."""
  if not config.background.enabled:
    return None
  directory = os.path.join(workdir, background.SUBDIR)
  if not os.path.isdir(os.path.join(directory, "checkpoints")):
    raise CheckpointError(
        f"background.enabled is on but {directory} holds no checkpoint: run python -m "
        f"jaxad.train again with the same --config and --workdir={workdir} (it trains the "
        "background model after the model), or pass --config.background.enabled=False")
  bg_family, bg_variables, _ = restore_variables(background.background_config(config),
                                                 directory, spatial_ndim, mesh)
  return bg_family, bg_variables


def _score_names(family, bg) -> list[str]:
  names = list(family.sample_scores)
  return names + ([] if bg is None else
                  [background.PREFIX + k for k in bg[0].sample_scores])


def _coder(family, config):
  """A ComplexityPool when the family has likelihood scores and eval.complexity is on."""
  if config.eval.complexity and getattr(family, "likelihood_scores", ()):
    return complexity_lib.ComplexityPool(int(config.data.bit_depth))
  return None


def _score_batch(score_fn, variables, bg, images, key):
  """The family's one pass, and the background model's scores of the same images with
  the same key (prefixed background_)."""
  out, maps = score_fn(variables, images, key)
  if bg is not None:
    bg_out, _ = make_score_fn(bg[0], False)(bg[1], images, key)
    out = {**out, **{background.PREFIX + k: v for k, v in bg_out.items()}}
  return out, maps


def _derived_scores(family, config, shape, scores: dict, lengths: dict, coder, bg) -> dict:
  """The concatenated scores, with those `likelihood_derived` adds on the host."""
  scores = {k: np.concatenate(v).astype(np.float64) for k, v in scores.items()}
  raw_bg = {k[len(background.PREFIX):]: scores.pop(k) for k in list(scores)
            if k.startswith(background.PREFIX)}
  if coder is not None:
    coder.close()
  return likelihood_derived(
      family, scores, int(np.prod(shape)), int(config.data.bit_depth),
      lengths={k: np.concatenate(v) for k, v in lengths.items()} if coder else None,
      background_family=bg[0] if bg else None, background_scores=raw_bg)


def likelihood_derived(family, scores: dict, num_dims: int, bit_depth: int, *,
                       lengths: dict | None = None, background_family=None,
                       background_scores: dict | None = None) -> dict:
  """`scores` with the scores derived from the family's likelihood scores: Serrà et
  al.'s complexity correction (with `lengths`, `complexity.lengths` of the same images)
  and Ren et al.'s likelihood ratio (with a background family and its scores of the
  same images). The eval binary and the grid both use it."""
  scores = dict(scores)
  if lengths is None and background_family is None:
    return scores
  model_bpd = family.likelihood_bpd(scores, num_dims, bit_depth)
  if background_family is not None:
    scores.update(background.llr_scores(model_bpd, background_family.likelihood_bpd(
        background_scores, num_dims, bit_depth)))
  if lengths is not None:
    scores.update(complexity_lib.corrected_scores(model_bpd, lengths))
  return scores


def validation_auroc(family, variables, config, mesh, spatial_ndim: int,
                     bg=None) -> dict | None:
  """AUROC of every sample score on the validation split, or None when it has no
  anomalous (or no normal) image to rank scores with.

  The same pass as the eval binary's (batches, keys, complexity, background), sample
  scores only, so `--split=val` reports the same numbers.
  """
  split = pipeline.load_split(config.data, "val")
  if split is None or not 0 < split.anomalous.sum() < len(split.source):
    return None
  score_fn = make_score_fn(family, False)
  coder = _coder(family, config)
  scores = {k: [] for k in _score_names(family, bg)}
  lengths = {k: [] for k in (coder.names if coder else ())}
  anomalous, key = [], trainer.purpose_key(config.seed, EVAL)
  for b, batch in enumerate(_batches(split, config)):
    coded = coder.submit(batch["image"]) if coder else None
    out, _ = _score_batch(score_fn, variables, bg, parallel.put_batch(batch["image"], mesh),
                          jax.random.fold_in(key, b))
    out, coded, batch = parallel.allgather(
        (out, coded.result() if coded else None,
         {k: batch[k] for k in ("index", "valid")}))
    valid = batch["valid"] > 0
    for k in scores:
      scores[k].append(out[k][valid])
    for k in lengths:
      lengths[k].append(coded[k][valid])
    anomalous.append(split.anomalous[batch["index"][valid]])
  shape = trainer.image_shape(config, spatial_ndim)
  scores = _derived_scores(family, config, shape, scores, lengths, coder, bg)
  anomalous = np.concatenate(anomalous)
  out = {}
  for k, v in scores.items():
    try:
      out[k] = metrics.auroc(anomalous, v)
    except DataError:  # non-finite scores of a diverged model
      out[k] = None
  return out


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


def _add_reconstructions(picked, family, variables, images, rng) -> None:
  """Stores each picked example's reconstruction, from its whole batch and the key the
  batch was scored with (the GAN's latent search then ends where the scored one did).
  Runs on every process: it is a computation over the global mesh."""
  recon = make_reconstruct_fn(family)(variables, images, rng)
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


def _write_report(workdir, name, result, scores, class_of, anomalous, grid) -> None:
  from jaxad import report
  report.write_report(os.path.join(workdir, "eval"), title=f"jaxad evaluation: {name} split",
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
  if "pixel" in result:
    lines.append(f"  {'map':<{w}} {'pxAUROC':>7} {'95% CI':>15} {'pxAUPRC':>7} {'Dice@cal':>8} "
                 f"{'Dice@PR':>8} {'Dice@Nσ':>8}")
    for k, m in result["pixel"].items():
      t = m["thresholds"]
      dice = lambda key: f"{t[key]['dice']:.3f}" if "dice" in t.get(key, {}) else "-"
      ci = m.get("bootstrap", {}).get("auroc")
      ci = f"[{ci['low']:.3f}, {ci['high']:.3f}]" if ci else ""
      lines.append(f"  {k:<{w}} {m['auroc']:>7.3f} {ci:>15} {m['auprc']:>7.3f} "
                   f"{dice('calibrated'):>8} {dice('pr_operating_point'):>8} "
                   f"{dice('n_sigma'):>8}")
  return "\n".join(lines)
