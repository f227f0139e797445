"""Scores every member of a trained grid group on the test split, vmapped over members.

A member's numbers are what `jaxad.evaluate` reports for its config: the same scores
(complexity and likelihood-ratio ones via `scoring.likelihood_derived`; the test images
coded once per data config from when `grid.data.load_data` reads them), the same keys
(image i scored alone with `fold_in(purpose_key(seed, EVAL), i)`, `scoring.per_image`,
whatever eval.batch_size), the same lesions (a function of the lesion seed and the
image's index alone), and pixel curves over the same range
(`scoring.pixel_range` of the member's healthy-map statistics, `scoring.MapStats`),
with the pixels above it counted as `clipped_pixels`.
"""

import dataclasses
import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxad import compile_options, keys, metrics, scoring
from jaxad.keys import EVAL, HEALTHY
from jaxad.scoring import likelihood_derived, pixel_range  # the eval binary's rules
from jaxad.data import lesions as lesions_lib
from jaxad.errors import DataError
from jaxad.families import vae as vae_family
from jaxad.grid.axes import Group
from jaxad.grid.data import GroupData, member_split, padded_batches
from jaxad.grid.train import GridState, Layout, group_setup, member_family
from jaxad.scores import pixel, sample

log = logging.getLogger("jaxad")


@functools.lru_cache(maxsize=16)
def make_score_fn(model, likelihood, num_samples: int, smooth_sigma: float, maps: bool,
                  layout: Layout, purpose: int = EVAL):
  """jit(vmap): member k scores images[idx[k]]; sample scores, or pixel maps if `maps`.

  Image i's key is the eval binary's: fold_in(purpose_key(seed, purpose), i)
  (`scoring.per_image`).
  """

  def member(params, model_state, beta, seed, images, index):
    family = member_family(model, likelihood, beta, num_samples=num_samples,
                           smooth_sigma=smooth_sigma)
    # The family's one pass gives both; jit drops the half not returned.
    one_pass = lambda v, x, rng: family.score(v, x, rng, maps)[int(maps)]
    return scoring.per_image(one_pass)({"params": params, **model_state}, images, index,
                                       keys.purpose_key(seed, purpose))

  def score(state: GridState, all_images, idx, betas, seeds):
    return jax.vmap(member)(state.params, state.model_state, betas, seeds,
                            layout.gather(all_images, idx), idx)

  return compile_options.jit(layout.per_member(score, (True, False, True, True, True)))


def lesioned(images: np.ndarray, spec) -> tuple[np.ndarray, np.ndarray]:
  """Every image of the split with its synthetic lesion (or none) and mask.

  `images` is the whole preprocessed split (row = index), so image i gets exactly the
  lesion the eval binary inserts (`scoring.lesioned_batches`), donor included.
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
    out = score_fn(state, dev_images, layout.put(idx[:, b], layout.batch), betas, seeds)
    consume(idx[:, b], valid[:, b] > 0, jax.device_get(out))


def _healthy_stats(healthy_fn, state, data: GroupData, batch, betas, seeds, layout,
                   progress, desc) -> list[dict]:
  """Per member: each map's statistics over its healthy validation images (else
  training images), with the eval binary's accumulator, images, batches and keys
  (`scoring.healthy_map_stats`)."""
  images, splits = (data.val, data.val_splits) if data.val is not None else (
      data.train, data.train_splits)
  stats = [scoring.MapStats() for _ in splits]

  def keep(idx, valid, out):
    for j, acc in enumerate(stats):
      if valid[j].any():
        acc.update({name: v[j] for name, v in out.items()}, valid[j])

  _run(healthy_fn, state, layout.put(jnp.asarray(images["image"]), layout.replicated),
       [s.normal_indices for s in splits], batch, betas, seeds, layout, progress, desc, keep)
  return [acc.result() for acc in stats]


def _ranking(labels, values) -> dict:
  try:
    return {"auroc": metrics.auroc(labels, values), "auprc": metrics.auprc(labels, values)}
  except DataError as e:  # e.g. non-finite scores of a collapsed model
    return {"auroc": None, "auprc": None, "error": str(e)}


def betas_of(group: Group, layout: Layout) -> jax.Array:
  return layout.put(jnp.asarray([m.config.model.beta for m in group.members], jnp.float32))


def _sample_scores(model, likelihood, group, state, images, layout, betas, seeds, progress,
                   desc) -> dict[str, np.ndarray]:
  """{score: (K, N)}: every member's `sample.score_names(likelihood)` of every image."""
  e, k, n = group.config.eval, len(group.members), len(images)
  score_fn = make_score_fn(model, likelihood, int(e.num_samples), 0.0, maps=False,
                           layout=layout)
  dev_images = layout.put(jnp.asarray(images), layout.replicated)
  scores = {name: np.zeros((k, n)) for name in sample.score_names(likelihood)}

  def keep_scores(idx, valid, out):
    for j in range(k):
      for name in scores:
        scores[name][j, idx[j][valid[j]]] = out[name][j][valid[j]]

  _run(score_fn, state, dev_images, [np.arange(n)] * k, int(e.batch_size), betas, seeds,
       layout, progress, desc, keep_scores)
  return scores


@dataclasses.dataclass
class _Members:
  """A trained group as the scoring functions see it."""
  group: Group
  state: GridState
  data: GroupData
  layout: Layout
  model: Any
  likelihood: Any  # the group's (β = 1; `group_setup`)
  betas: Any
  seeds: Any
  splits: list  # each member's test split (its own anomalous classes)
  diverged: np.ndarray
  progress: bool


def _background_scores(m: _Members, background_model):
  """(background group, model, likelihood, its scores, its diverged flags), or None."""
  if background_model is None:
    return None
  bg_group, bg_state = background_model
  bg_model, bg_likelihood, _ = group_setup(bg_group, m.data.shape)
  scores = _sample_scores(bg_model, bg_likelihood, bg_group, bg_state, m.data.test["image"],
                          m.layout, betas_of(bg_group, m.layout), m.seeds, m.progress,
                          f"{bg_group.name} scores")
  diverged = np.asarray(jax.device_get(bg_state.diverged)).astype(bool)
  return bg_group, bg_model, bg_likelihood, scores, diverged


def _sample_results(m: _Members, results: list[dict], background_model) -> None:
  """Sample-wise AUROC/AUPRC of every test image, each member's own anomalous classes
  (the test images' code lengths were submitted to host threads when loaded)."""
  config, n = m.group.config, len(m.data.test["image"])
  scores = _sample_scores(m.model, m.likelihood, m.group, m.state, m.data.test["image"],
                          m.layout, m.betas, m.seeds, m.progress, f"{m.group.name} scores")
  bg = _background_scores(m, background_model)
  lengths = m.data.test_lengths.result() if m.data.test_lengths is not None else None
  for j, split in enumerate(m.splits):
    labels = split.anomalous
    results[j].update(num_test=n, num_anomalous=int(labels.sum()))
    if m.diverged[j] or not 0 < labels.sum() < n:
      continue
    with_bg = {}
    if bg is not None and not bg[4][j]:
      with_bg = dict(
          background_family=member_family(
              bg[1], bg[2], float(bg[0].members[j].config.model.beta)),
          background_scores={name: v[j] for name, v in bg[3].items()})
    own = likelihood_derived(
        member_family(m.model, m.likelihood, float(m.group.members[j].config.model.beta)),
        {name: v[j] for name, v in scores.items()}, int(np.prod(m.data.shape)),
        int(config.data.bit_depth), lengths=lengths, **with_bg)
    results[j]["sample"] = {name: _ranking(labels, v) for name, v in own.items()}
    if bg is not None and not with_bg:
      results[j]["sample"].update({
          f"{name}_llr": {"auroc": None, "auprc": None,
                          "error": "its background model diverged"}
          for name in vae_family.VAE.likelihood_scores})


def _pixel_inputs(m: _Members, spec):
  """(images, masks, each member's list of scored images): the split's masks, or
  synthetic lesions in each member's normal test images."""
  test = m.data.test
  if spec is not None:
    images, masks = lesioned(test["image"], spec)
    return images, masks, [s.normal_indices for s in m.splits]
  return test["image"], test["mask"], [np.arange(len(test["image"]))] * len(m.splits)


def _stream_maps(m: _Members, images, masks, lists, curves) -> dict:
  """Every member's maps of its images into its pixel curves; {member: error}."""
  e, errors = m.group.config.eval, {}
  maps_fn = make_score_fn(m.model, m.likelihood, 1, float(e.smooth_sigma), maps=True,
                          layout=m.layout)

  def keep_maps(idx, valid, out):
    for j in range(len(m.splits)):
      if m.diverged[j] or j in errors or not valid[j].any():
        continue
      truth = masks[idx[j][valid[j]]][..., 0]
      try:
        for name, curve in curves[j].items():
          curve.update(out[name][j][valid[j]], truth)
      except DataError as err:  # non-finite maps of a collapsed model
        errors[j] = str(err)

  _run(maps_fn, m.state, m.layout.put(jnp.asarray(images), m.layout.replicated), lists,
       int(e.batch_size), m.betas, m.seeds, m.layout, m.progress, f"{m.group.name} maps",
       keep_maps)
  return errors


def _curve_result(curve) -> dict:
  try:
    return {"auroc": curve.auroc(), "auprc": curve.auprc(),
            "clipped_pixels": curve.num_clipped, "value_range": list(curve.value_range)}
  except DataError as err:  # no lesion pixel (or no normal pixel) among its images
    return {"auroc": None, "auprc": None, "error": str(err)}


def _pixel_results(m: _Members, results: list[dict]) -> None:
  """Pixel AUROC/AUPRC per member over the eval binary's range (its healthy maps)."""
  e = m.group.config.eval
  lesion_cfg = m.group.config.data.synthetic_lesions
  spec = lesions_lib.spec_from_config(lesion_cfg, "data.synthetic_lesions") \
      if lesion_cfg.enabled else None
  if not e.pixel_maps or (spec is None and "mask" not in m.data.test):
    return
  images, masks, lists = _pixel_inputs(m, spec)
  healthy_fn = make_score_fn(m.model, m.likelihood, 1, float(e.smooth_sigma), maps=True,
                             layout=m.layout, purpose=HEALTHY)
  stats = _healthy_stats(healthy_fn, m.state, m.data, int(e.batch_size), m.betas, m.seeds,
                         m.layout, m.progress, f"{m.group.name} healthy maps")
  curves = [{name: metrics.PixelCurve(e.pixel_bins,
                                      pixel_range(stats[j].get(name, {}).get("max")))
             for name in pixel.map_names(m.likelihood)} for j in range(len(m.splits))]
  errors = _stream_maps(m, images, masks, lists, curves)
  for j in range(len(m.splits)):
    results[j]["num_pixel_images"] = int(len(lists[j]))
    if m.diverged[j]:
      continue
    if j in errors:
      results[j]["pixel"] = {name: {"auroc": None, "auprc": None, "error": errors[j]}
                             for name in pixel.map_names(m.likelihood)}
      continue
    results[j]["pixel"] = {name: _curve_result(c) for name, c in curves[j].items()}


def evaluate_group(group: Group, state: GridState, data: GroupData, mesh, *,
                   progress: bool = True, background_model=None) -> list[dict]:
  """Per member: {"sample": {score: {auroc, auprc}}, "pixel": {map: ...}, counts}.

  Sample scores include the complexity-corrected ones (eval.complexity) and, with
  `background_model` = (its group, its trained state), the likelihood ratios, as the
  eval binary computes them (`scoring.likelihood_derived`).
  """
  layout = Layout.make(mesh, len(group.members), int(group.config.eval.batch_size))
  model, likelihood, _ = group_setup(group, data.shape)
  diverged = np.asarray(jax.device_get(state.diverged)).astype(bool)
  members = _Members(
      group, state, data, layout, model, likelihood, betas_of(group, layout),
      layout.put(jnp.asarray([m.config.seed for m in group.members], jnp.int32)),
      [member_split(data.test_split, m.config.data, "test") for m in group.members],
      diverged, progress)
  results = [{"diverged": bool(d)} for d in diverged]
  _sample_results(members, results, background_model)
  _pixel_results(members, results)
  return results
