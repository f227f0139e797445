"""One scoring pass over a split: every sample score, map, lesion, code length and
background score, batch by batch; the healthy-map statistics; the derived scores; the
validation split's scores (`validation_scores`: the score ranking and image thresholds).

The eval binary, validation ranking and the grid all score through here, so a number
means the same wherever it is reported. Batches are padded and carry `index` and
`valid` (every image scored exactly once on any device count). Keys are per image, as
the synthetic lesions are: image i of a split is scored alone with
`fold_in(purpose_key(seed, purpose), i)` (`per_image`), so its sample scores, maps and
reconstruction depend on neither eval.batch_size, the devices nor its batch-mates.
Multi-process: each process scores its shard of every global batch, then every process
gathers the whole batch (`parallel.allgather`) so all hold the same results.
"""

import dataclasses
import functools
import os
from typing import Any, Callable, Iterator, NamedTuple

import jax
import ml_collections
import numpy as np

from jaxad import background, compile_options, keys, metrics, parallel
from jaxad import config as config_lib
from jaxad import state as state_lib
from jaxad.data import lesions as lesions_lib
from jaxad.data import pipeline
from jaxad.errors import CheckpointError, DataError
from jaxad.scores import complexity as complexity_lib
from jaxad.scores import complexity_cache

RANGE_FACTOR = 4.0  # pixel curves span [0, RANGE_FACTOR × the healthy maps' maximum]


def per_image(batch_fn: Callable) -> Callable:
  """batch_fn(variables, images, key) → fn(variables, images, index, key) that runs
  batch_fn on each image alone (a batch of one, vmapped) with the key
  fold_in(key, index[i]): an image's result is a function of (key, its index) only.

  batch_fn's outputs have the batch on their leading axis (or are None). The families'
  score functions run in eval mode (BatchNorm's running statistics), so the vmapped
  batch of one is the same computation as the batch, image by image.
  """
  def fn(variables, images, index, key):
    def one(image, i):
      out = batch_fn(variables, image[None], jax.random.fold_in(key, i))
      return jax.tree.map(lambda x: x[0], out)
    return jax.vmap(one)(images, index)
  return fn


@functools.lru_cache(maxsize=8)
def make_score_fn(family, with_maps: bool):
  """One jitted pass: every sample-wise score, and the pixel maps when asked;
  fn(variables, images, index, key), image i keyed by fold_in(key, index[i]).

  Cached, so evaluating several splits (or workdirs of one architecture) compiles once.
  """
  return compile_options.jit(per_image(functools.partial(family.score,
                                                         with_maps=with_maps)))


@functools.lru_cache(maxsize=8)
def make_reconstruct_fn(family):
  """What the report's grid shows beside each image (None if the family has nothing),
  fn(variables, images, index, key) with the keys its scores came from."""
  return compile_options.jit(per_image(family.reconstruct))


class Background(NamedTuple):
  """The likelihood ratio's background model as the scoring pass uses it."""
  family: Any
  variables: Any
  step: int  # its checkpoint's step
  num_steps: int  # the steps its config trains for
  stopped_early: bool
  directory: str  # its checkpoints folder

  def describe(self) -> dict:
    """What metrics.json records of it."""
    return {"step": self.step, "num_steps": self.num_steps,
            "stopped_early": self.stopped_early}


def background_num_steps(bg_config) -> int:
  """The steps the trainer runs the background model for (`config.total_steps` with its
  own data's steps per epoch)."""
  if bg_config.train.num_steps > 0:
    return config_lib.total_steps(bg_config, 0)
  train = pipeline.load_split(bg_config.data, "train")
  return config_lib.total_steps(
      bg_config, pipeline.steps_per_epoch(train, bg_config.train.batch_size))


def restore_background(config, workdir: str, spatial_ndim: int, mesh) -> Background | None:
  """The likelihood ratio's background model, or None when background.enabled is off.

  Its training must have finished (its config's steps, or early stopping): the
  `*_llr` scores of a half-trained background model are a different score.
  """
  if not config.background.enabled:
    return None
  directory = os.path.join(workdir, background.SUBDIR)
  fix = (f"run python -m jaxad.train again with the same --config and --workdir={workdir} "
         "to finish the background model (it trains after the model), or pass "
         "--config.background.enabled=False")
  if not os.path.isdir(os.path.join(directory, "checkpoints")):
    raise CheckpointError(f"background.enabled is on but {directory} holds no "
                          f"checkpoint: {fix}")
  bg_config = background.background_config(config)
  restored = state_lib.restore_for_eval(bg_config, directory, spatial_ndim, mesh)
  num_steps = background_num_steps(bg_config)
  if restored.step < num_steps and not restored.stopped:
    raise CheckpointError(
        f"the background model's latest checkpoint in {restored.directory} is at step "
        f"{restored.step} of the {num_steps} its config trains for (its training did not "
        f"finish), so its *_llr scores would come from a half-trained model: {fix}")
  return Background(restored.family, restored.variables, restored.step, num_steps,
                    restored.stopped, restored.directory)


def batches(split, config, *, normal_only=False, process_index=None, process_count=None):
  """This process's padded eval batches of a split (eval.batch_size global images)."""
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
  for batch in batches(split, config, normal_only=True, process_index=process_index,
                       process_count=process_count):
    images, mask, anomalous = lesions_lib.add_lesions(
        batch["image"], batch["index"], spec, num_images=len(split.source),
        read_donors=read)
    yield {**batch, "image": images, "mask": mask, "anomalous": anomalous}


def score_names(family, bg) -> list[str]:
  """The raw sample scores of one pass (the background's prefixed background_)."""
  names = list(family.sample_scores)
  return names + ([] if bg is None else
                  [background.PREFIX + k for k in bg[0].sample_scores])


def make_coder(family, config):
  """A ComplexityPool when the family has likelihood scores and eval.complexity is on."""
  if config.eval.complexity and getattr(family, "likelihood_scores", ()):
    return complexity_lib.ComplexityPool(
        int(config.data.bit_depth),
        cache_dir=complexity_cache.resolve_dir(config.eval.complexity_cache))
  return None


def score_batch(score_fn, variables, bg, images, index, key):
  """The family's one pass, and the background model's scores of the same images with
  the same keys (prefixed background_)."""
  out, maps = score_fn(variables, images, index, key)
  if bg is not None:
    bg_out, _ = make_score_fn(bg[0], False)(bg[1], images, index, key)
    out = {**out, **{background.PREFIX + k: v for k, v in bg_out.items()}}
  return out, maps


@dataclasses.dataclass
class Scored:
  """One global batch after scoring, gathered on every process (rows not yet filtered
  by `valid`); `placed`, `placed_index` and `key` are what it was scored with (for
  reconstructions: image i's key is fold_in(key, index[i]))."""
  index: np.ndarray
  valid: np.ndarray  # bool
  label: np.ndarray
  anomalous: np.ndarray
  scores: dict
  maps: dict
  mask: np.ndarray | None
  images: np.ndarray | None  # only when asked for (the largest thing to gather)
  lengths: dict | None  # complexity code lengths of the images
  placed: Any
  placed_index: Any
  key: jax.Array


def score_split(score_fn, variables, batch_iter, mesh, key, *, bg=None, coder=None,
                want_images: Callable[[], bool] = lambda: False) -> Iterator[Scored]:
  """Scores each batch of `batch_iter` (image i with fold_in(key, i), `per_image`), the
  images coded on host threads beside the device, and yields it gathered (`Scored`)."""
  for batch in batch_iter:
    images = batch["image"]
    placed, placed_index = parallel.put_batch((images, batch["index"]), mesh)
    coded = coder.submit(images) if coder else None  # host threads, beside the device
    out, maps = score_batch(score_fn, variables, bg, placed, placed_index, key)
    with_images = want_images()
    out, maps, mask, anomalous, gathered, rows, coded = parallel.allgather(
        (out, maps, batch.get("mask"), batch.get("anomalous"),
         images if with_images else None,
         {k: batch[k] for k in ("index", "valid", "label") if k in batch},
         coded.result() if coded else None))
    yield Scored(rows["index"], rows["valid"] > 0, rows.get("label"), anomalous, out, maps,
                 mask, gathered, coded, placed, placed_index, key)


class MapStats:
  """Mean, std, max and pixel count of each pixel map, accumulated in float64."""

  def __init__(self):
    self.sums = {}

  def update(self, maps: dict, valid: np.ndarray) -> None:
    for k, v in maps.items():
      v = v[valid].astype(np.float64)
      total, squares, count, peak = self.sums.get(k, (0.0, 0.0, 0, -np.inf))
      self.sums[k] = (total + v.sum(), squares + (v * v).sum(), count + v.size,
                      max(peak, float(v.max())))

  def result(self) -> dict:
    stats = {}
    for k, (s1, s2, n, mx) in self.sums.items():
      mean = s1 / n
      stats[k] = {"mean": mean, "std": float(np.sqrt(max(s2 / n - mean * mean, 0.0))),
                  "max": float(mx), "num_pixels": int(n)}
    return stats


def healthy_map_stats(score_fn, variables, split, config, mesh, seed) -> dict:
  """Mean, std and max of each pixel map over healthy images (no anomalous data)."""
  stats = MapStats()
  for scored in score_split(score_fn, variables, batches(split, config, normal_only=True),
                            mesh, keys.purpose_key(seed, keys.HEALTHY)):
    stats.update(scored.maps, scored.valid)
  return stats.result()


def healthy_split(config) -> tuple[Any, str]:
  """The healthy images map statistics come from: validation, else training."""
  healthy = pipeline.load_split(config.data, "val")
  if healthy is not None:
    return healthy, "validation"
  return pipeline.load_split(config.data, "train"), "training"


def pixel_range(healthy_max: float | None) -> tuple[float, float] | None:
  """A map's PixelCurve range: [0, RANGE_FACTOR × its maximum over healthy images].

  Lesions up to that much brighter than anything healthy keep their own bins; values
  above land in the top bin and are reported as clipped_pixels. None (the first
  batch's range, widened) when there is no healthy maximum or it is not positive.
  """
  if healthy_max is None or not healthy_max > 0:
    return None
  return 0.0, RANGE_FACTOR * float(healthy_max)


class SampleScores:
  """The sample scores (and code lengths) of a pass, in scoring order, then the derived
  ones (`likelihood_derived`)."""

  def __init__(self, family, bg, coder):
    self.family, self.bg, self.coder = family, bg, coder
    self.scores = {k: [] for k in score_names(family, bg)}
    self.lengths = {k: [] for k in (coder.names if coder else ())}

  def add(self, scored: Scored) -> None:
    for k in self.scores:
      self.scores[k].append(scored.scores[k][scored.valid])
    for k in self.lengths:
      self.lengths[k].append(scored.lengths[k][scored.valid])

  def result(self, config, shape) -> dict:
    """Every score as float64 (N,), with the complexity and likelihood-ratio scores."""
    scores = {k: np.concatenate(v).astype(np.float64) for k, v in self.scores.items()}
    raw_bg = {k[len(background.PREFIX):]: scores.pop(k) for k in list(scores)
              if k.startswith(background.PREFIX)}
    if self.coder is not None:
      self.coder.close()
    return likelihood_derived(
        self.family, scores, int(np.prod(shape)), int(config.data.bit_depth),
        lengths={k: np.concatenate(v) for k, v in self.lengths.items()}
        if self.coder else None,
        background_family=self.bg[0] if self.bg else None, background_scores=raw_bg)


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


@dataclasses.dataclass
class ValidationScores:
  """The validation split's sample scores, in scoring order, with its labels: what the
  score ranking (its AUROCs) and the image thresholds are chosen on."""
  scores: dict  # name → float64 (N,), every score of the eval binary
  anomalous: np.ndarray  # bool (N,)

  @property
  def has_both_classes(self) -> bool:
    return bool(0 < self.anomalous.sum() < len(self.anomalous))

  def describe(self) -> str:
    """'validation split: 180 images, 18 anomalous'."""
    return (f"validation split: {len(self.anomalous)} images, "
            f"{int(self.anomalous.sum())} anomalous")

  def auroc(self) -> dict | None:
    """AUROC of every score, or None when validation lacks one of the classes; a
    score with non-finite values (a diverged model) gets None."""
    if not self.has_both_classes:
      return None
    out = {}
    for k, v in self.scores.items():
      try:
        out[k] = metrics.auroc(self.anomalous, v)
      except DataError:
        out[k] = None
    return out


def validation_scores(family, variables, config: ml_collections.ConfigDict, mesh,
                      spatial_ndim: int, bg=None) -> ValidationScores | None:
  """Every sample score of the validation split, or None when there is none.

  The same pass as the eval binary's (batches, keys, complexity, background), sample
  scores only, so `--split=val` reports the same numbers.
  """
  split = pipeline.load_split(config.data, "val")
  if split is None:
    return None
  acc = SampleScores(family, bg, make_coder(family, config))
  anomalous = []
  for scored in score_split(make_score_fn(family, False), variables, batches(split, config),
                            mesh, keys.purpose_key(config.seed, keys.EVAL), bg=bg,
                            coder=acc.coder):
    acc.add(scored)
    anomalous.append(split.anomalous[scored.index[scored.valid]])
  scores = acc.result(config, state_lib.image_shape(config, spatial_ndim))
  return ValidationScores(scores, np.concatenate(anomalous).astype(bool))
