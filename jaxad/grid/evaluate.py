"""Scores every member of a trained grid group on the test split, vmapped over members.

Sample-wise: the six `sample.SAMPLE_SCORES` of every test image with L =
eval.num_samples (and the complexity-corrected and likelihood-ratio scores derived from
them, `evaluation.likelihood_derived`; the test images are coded once per data config,
on host threads from when `grid_train.load_data` reads them), batch `b`'s key `fold_in(purpose_key(seed, EVAL), b)` as in the eval
binary, so a member's numbers are what `jaxad.evaluate` reports for its config; AUROC
and AUPRC of the member's anomalous classes (its left-out class) against its normal
ones. Pixel-wise, when the split has masks or data.synthetic_lesions.enabled: the
five `pixel.PIXEL_MAPS` and streaming pixel AUROC/AUPRC (`metrics.PixelCurve`) over
the eval binary's range (`evaluation.pixel_range`: 4 × the map's maximum over the
member's healthy validation images, else training images, scored with the eval
binary's healthy-pass keys), with the pixels above it counted as `clipped_pixels`.
Lesions are those of the eval binary (a function of the lesion seed and the image's
index alone, donors included), inserted into each member's normal test images.
"""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from jaxad import compile_options, metrics, trainer
from jaxad.evaluation import EVAL, HEALTHY, likelihood_derived, pixel_range  # the eval
# binary's rules
from jaxad.data import lesions as lesions_lib
from jaxad.errors import DataError
from jaxad.families import vae as vae_family
from jaxad.grid_axes import Group
from jaxad.grid_train import GridState, GroupData, Layout, group_setup, member_family
from jaxad.grid_train import member_split, padded_batches
from jaxad.scores import pixel, sample

log = logging.getLogger("jaxad")


@functools.lru_cache(maxsize=16)
def make_score_fn(model, kind: str, num_samples: int, smooth_sigma: float, maps: bool,
                  layout: Layout, purpose: int = EVAL):
  """jit(vmap): member k scores images[idx[k]]; sample scores, or pixel maps if `maps`.

  Batch b's key is the eval binary's: fold_in(purpose_key(seed, purpose), b).
  """

  def member(params, model_state, beta, seed, images, b):
    family = member_family(model, kind, beta, num_samples=num_samples,
                           smooth_sigma=smooth_sigma)
    rng = jax.random.fold_in(trainer.purpose_key(seed, purpose), b)
    # The family's one pass gives both; jit drops the half not returned.
    return family.score({"params": params, **model_state}, images, rng, maps)[int(maps)]

  def score(state: GridState, all_images, idx, betas, seeds, b):
    return jax.vmap(member, in_axes=(0, 0, 0, 0, 0, None))(
        state.params, state.model_state, betas, seeds, layout.gather(all_images, idx), b)

  return compile_options.jit(
      layout.per_member(score, (True, False, True, True, True, False)))


def lesioned(images: np.ndarray, spec) -> tuple[np.ndarray, np.ndarray]:
  """Every image of the split with its synthetic lesion (or none) and mask.

  `images` is the whole preprocessed split (row = index), so image i gets exactly the
  lesion the eval binary inserts (`evaluation.lesioned_batches`), donor included.
  """
  out, masks, _ = lesions_lib.add_lesions(images, np.arange(len(images)), spec,
                                          num_images=len(images),
                                          read_donors=lambda i: images[i])
  return out, masks


def _run(score_fn, state, dev_images, index_lists, batch, betas, seeds, layout, progress,
         desc, consume) -> None:
  """Streams every member's padded index list through score_fn; consume(b, idx, valid, out)."""
  idx, valid = padded_batches(index_lists, batch)
  from tqdm.auto import tqdm
  for b in tqdm(range(idx.shape[1]), disable=not progress, desc=desc, unit="batch",
                mininterval=1.0):
    out = score_fn(state, dev_images, layout.put(idx[:, b], layout.batch), betas, seeds,
                   jnp.int32(b))
    consume(idx[:, b], valid[:, b] > 0, jax.device_get(out))


def _healthy_max(healthy_fn, state, data: GroupData, batch, betas, seeds, layout, progress,
                 desc) -> list[dict]:
  """Per member: each map's maximum over its healthy validation images (else training
  images), as the eval binary's `healthy_map_stats` finds it (same images, batches
  and keys)."""
  images, splits = (data.val, data.val_splits) if data.val is not None else (
      data.train, data.train_splits)
  peaks = [{} for _ in splits]

  def keep(idx, valid, out):
    for j, peak in enumerate(peaks):
      if not valid[j].any():
        continue
      for name, v in out.items():
        peak[name] = max(peak.get(name, -np.inf), float(v[j][valid[j]].max()))

  _run(healthy_fn, state, layout.put(jnp.asarray(images["image"]), layout.replicated),
       [s.normal_indices for s in splits], batch, betas, seeds, layout, progress, desc, keep)
  return peaks


def _ranking(labels, values) -> dict:
  try:
    return {"auroc": metrics.auroc(labels, values), "auprc": metrics.auprc(labels, values)}
  except DataError as e:  # e.g. non-finite scores of a collapsed model
    return {"auroc": None, "auprc": None, "error": str(e)}


def betas_of(group: Group, layout: Layout) -> jax.Array:
  return layout.put(jnp.asarray([m.config.model.beta for m in group.members], jnp.float32))


def _sample_scores(model, kind, group, state, images, layout, betas, seeds, progress,
                   desc) -> dict[str, np.ndarray]:
  """{score: (K, N)}: every member's `sample.SAMPLE_SCORES` of every image."""
  e, k, n = group.config.eval, len(group.members), len(images)
  score_fn = make_score_fn(model, kind, int(e.num_samples), 0.0, maps=False,
                           layout=layout)
  dev_images = layout.put(jnp.asarray(images), layout.replicated)
  scores = {name: np.zeros((k, n)) for name in sample.SAMPLE_SCORES}

  def keep_scores(idx, valid, out):
    for j in range(k):
      for name in scores:
        scores[name][j, idx[j][valid[j]]] = out[name][j][valid[j]]

  _run(score_fn, state, dev_images, [np.arange(n)] * k, int(e.batch_size), betas, seeds,
       layout, progress, desc, keep_scores)
  return scores


def evaluate_group(group: Group, state: GridState, data: GroupData, mesh, *,
                   progress: bool = True, background_model=None) -> list[dict]:
  """Per member: {"sample": {score: {auroc, auprc}}, "pixel": {map: ...}, counts}.

  Sample scores include the complexity-corrected ones (eval.complexity) and, with
  `background_model` = (its group, its trained state), the likelihood ratios, as the
  eval binary computes them (`evaluation.likelihood_derived`).
  """
  config = group.config
  e = config.eval
  k = len(group.members)
  batch = int(e.batch_size)
  layout = Layout.make(mesh, k, batch)
  model, kind, _ = group_setup(group, data.shape)
  betas = betas_of(group, layout)
  seeds = layout.put(jnp.asarray([m.config.seed for m in group.members], jnp.int32))
  splits = [member_split(data.test_split, m.config.data, "test") for m in group.members]
  diverged = np.asarray(jax.device_get(state.diverged)).astype(bool)
  results = [{"diverged": bool(d)} for d in diverged]
  test = data.test
  n = len(test["image"])

  # Sample-wise: every test image, the member's own anomalous classes (the test images'
  # code lengths were submitted to host threads when the data was loaded).
  scores = _sample_scores(model, kind, group, state, test["image"], layout, betas, seeds,
                          progress, f"{group.name} scores")
  bg_scores = None
  if background_model is not None:
    bg_group, bg_state = background_model
    bg_model, bg_kind, _ = group_setup(bg_group, data.shape)
    bg_scores = _sample_scores(bg_model, bg_kind, bg_group, bg_state, test["image"], layout,
                               betas_of(bg_group, layout), seeds, progress,
                               f"{bg_group.name} scores")
    bg_diverged = np.asarray(jax.device_get(bg_state.diverged)).astype(bool)
  lengths = data.test_lengths.result() if data.test_lengths is not None else None
  num_dims = int(np.prod(data.shape))
  for j, split in enumerate(splits):
    labels = split.anomalous
    results[j].update(num_test=n, num_anomalous=int(labels.sum()))
    if diverged[j] or not 0 < labels.sum() < n:
      continue
    beta = float(group.members[j].config.model.beta)
    with_bg = {}
    if bg_scores is not None and not bg_diverged[j]:
      with_bg = dict(
          background_family=member_family(
              bg_model, bg_kind, float(bg_group.members[j].config.model.beta)),
          background_scores={name: v[j] for name, v in bg_scores.items()})
    own = likelihood_derived(member_family(model, kind, beta),
                             {name: v[j] for name, v in scores.items()}, num_dims,
                             int(config.data.bit_depth), lengths=lengths, **with_bg)
    results[j]["sample"] = {name: _ranking(labels, v) for name, v in own.items()}
    if bg_scores is not None and not with_bg:
      results[j]["sample"].update({
          f"{name}_llr": {"auroc": None, "auprc": None,
                          "error": "its background model diverged"}
          for name in vae_family.VAE.likelihood_scores})

  # Pixel-wise: masks of the split, or synthetic lesions in normal test images.
  lesion_cfg = config.data.synthetic_lesions
  spec = lesions_lib.spec_from_config(lesion_cfg, "data.synthetic_lesions") \
      if lesion_cfg.enabled else None
  if not e.pixel_maps or (spec is None and "mask" not in test):
    return results
  if spec is not None:
    images, masks = lesioned(test["image"], spec)
    lists = [s.normal_indices for s in splits]
  else:
    images, masks = test["image"], test["mask"]
    lists = [np.arange(n)] * k
  maps_fn = make_score_fn(model, kind, 1, float(e.smooth_sigma), maps=True,
                         layout=layout)
  healthy_fn = make_score_fn(model, kind, 1, float(e.smooth_sigma), maps=True,
                             layout=layout, purpose=HEALTHY)
  peaks = _healthy_max(healthy_fn, state, data, batch, betas, seeds, layout, progress,
                       f"{group.name} healthy maps")
  curves = [{name: metrics.PixelCurve(e.pixel_bins, pixel_range(peaks[j].get(name)))
             for name in pixel.PIXEL_MAPS} for j in range(k)]

  errors = {}

  def keep_maps(idx, valid, out):
    for j in range(k):
      if diverged[j] or j in errors or not valid[j].any():
        continue
      truth = masks[idx[j][valid[j]]][..., 0]
      try:
        for name, curve in curves[j].items():
          curve.update(out[name][j][valid[j]], truth)
      except DataError as err:  # non-finite maps of a collapsed model
        errors[j] = str(err)

  _run(maps_fn, state, layout.put(jnp.asarray(images), layout.replicated), lists, batch,
       betas, seeds, layout, progress, f"{group.name} maps", keep_maps)
  for j in range(k):
    results[j]["num_pixel_images"] = int(len(lists[j]))
    if diverged[j]:
      continue
    if j in errors:
      results[j]["pixel"] = {name: {"auroc": None, "auprc": None, "error": errors[j]}
                             for name in pixel.PIXEL_MAPS}
      continue
    pix = {}
    for name, curve in curves[j].items():
      try:
        pix[name] = {"auroc": curve.auroc(), "auprc": curve.auprc(),
                     "clipped_pixels": curve.num_clipped,
                     "value_range": list(curve.value_range)}
      except DataError as err:  # no lesion pixel (or no normal pixel) among its images
        pix[name] = {"auroc": None, "auprc": None, "error": str(err)}
    results[j]["pixel"] = pix
  return results
