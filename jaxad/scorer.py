"""A trained workdir as a Scorer: preprocessed images in, the eval binary's scores out.

`from_workdir(W)` restores W's latest checkpoint (and its background model, when
`config.background.enabled`) and scores with the eval binary's own functions:
`scoring.make_score_fn` (image i keyed by fold_in(purpose_key(seed, EVAL), index[i])),
`scoring.score_batch` and `scoring.likelihood_derived` for the `*_llr` scores, so a
score equals the one `python -m jaxad.evaluate` writes for the same image and index.
Batches of any size are padded to the device count and sharded over the local devices.
The images' spatial rank comes from the config (data.ndim; NIfTI volumes); a workdir
of npz or tfds data with data.ndim=0 is restored as 2D, else as 3D.
Complexity-corrected scores are not here (they need host coders; `jaxad.scores.
complexity` adds them). `jaxad.export` serialises the same computation for sites
without jaxad (`jaxad.export_runtime`, whose Scorer class this module returns).

From Python:

  from jaxad import scorer
  s = scorer.from_workdir("workdirs/oct")            # with_maps=False: scores only
  scores, maps = s(images, index)                    # images (B, *s.image_shape)
  flagged = scores["vae_rec"] >= s.thresholds["scores"]["vae_rec"]["n_sigma"]["threshold"]
"""

import math
import os
from typing import Any, NamedTuple

import jax
import jaxlib
import numpy as np

import jaxad
from jaxad import background, keys, parallel, scoring
from jaxad import config as config_lib
from jaxad import files
from jaxad import state as state_lib
from jaxad.errors import CheckpointError
from jaxad.export_runtime import FORMAT, Scorer, current_platform

__all__ = ["Scorer", "from_workdir", "load_model", "Loaded", "describe", "score_names"]
THRESHOLDS = os.path.join("eval", "thresholds.json")
# config.data keys the pipeline reads to turn a stored image into the model's input.
PREPROCESSING_KEYS = ("image_size", "depth", "channels", "intensity", "intensity_range",
                      "bit_depth", "ndim")


def spatial_ndims(config, workdir: str) -> tuple[int, ...]:
  """The spatial ranks the workdir's images may have, to try in order: the one the
  trainer recorded in WORKDIR/model.json; for older workdirs, what the config says
  (data.ndim for npz, NIfTI volumes, 2D images for the other sources) or 2 then 3."""
  path = os.path.join(workdir, state_lib.MODEL_JSON)
  if os.path.exists(path):
    return (int(files.read_json(path)["spatial_ndim"]),)
  ndim = int(config.data.get("ndim", 0) or 0)
  if ndim in (2, 3):
    return (ndim,)
  if config.data.source == "nifti":
    return (3,)
  return (2, 3) if config.data.source in ("npz", "tfds") else (2,)


def restore(config, workdir: str, mesh):
  """(spatial_ndim, state.Restored) of the workdir's latest checkpoint on `mesh`; the
  rank is the one whose model matches the checkpoint (`spatial_ndims`)."""
  ranks = spatial_ndims(config, workdir)
  for i, ndim in enumerate(ranks):
    try:
      return ndim, state_lib.restore_for_eval(config, workdir, ndim, mesh)
    except CheckpointError:
      if i == len(ranks) - 1:
        raise
  raise AssertionError("unreachable")


def score_names(family, bg) -> tuple[str, ...]:
  """The sample scores a Scorer returns: the family's, then `<likelihood score>_llr`
  with a background model (as the eval binary reports them)."""
  llr = () if bg is None else tuple(f"{k}_llr" for k in family.likelihood_scores)
  return tuple(family.sample_scores) + llr


def thresholds(workdir: str, step: int) -> tuple[dict, str | None]:
  """(WORKDIR/eval/thresholds.json, None), or ({}, why not) when it is missing or
  belongs to another checkpoint step."""
  path = os.path.join(workdir, THRESHOLDS)
  fix = (f"evaluate a labelled split (python -m jaxad.evaluate --workdir={workdir} "
         "--split=val or test) to write it")
  if not os.path.exists(path):
    return {}, f"no {THRESHOLDS} in the workdir: {fix}"
  saved = files.read_json(path)
  if saved.get("step") != step:
    return {}, (f"{THRESHOLDS} is for checkpoint step {saved.get('step')}, not {step} "
                f"(the scorer's): {fix}")
  return saved, None


def describe(config, family, bg, step: int, ndim: int, with_maps: bool,
             workdir: str) -> dict:
  """scorer.json's content (without "platforms" and "serialization", which the export
  adds): what the scorer takes, returns and was trained with."""
  shape = state_lib.image_shape(config, ndim)
  found, note = thresholds(workdir, step)
  data = config_lib.to_dict(config.data)
  meta = {
      "format": FORMAT, "image_shape": list(shape), "spatial_ndim": ndim,
      "preprocessing": {**{k: data.get(k) for k in PREPROCESSING_KEYS},
                        "source": data["source"], "resize": data.get("resize", "bilinear"),
                        "scale": "intensity window → [0, 1] → 2x − 1 = [-1, 1]"},
      "score_names": list(score_names(family, bg)),
      "map_names": list(family.pixel_maps) if with_maps else [],
      "thresholds": found, "config": config_lib.to_dict(config), "step": step,
      "platforms": [current_platform()], "family": config.model.family,
      "versions": {"jaxad": jaxad.__version__, "jax": jax.__version__,
                   "jaxlib": jaxlib.__version__},
      "eval_key": {"seed": int(config.seed), "purpose": keys.EVAL,
                   "image_key": "fold_in(fold_in(key(seed), purpose), index[i])"}}
  if bg is not None:
    meta["background"] = bg.describe()
  if note:
    meta["thresholds_note"] = note
  return meta


def _padded(images: np.ndarray, index: np.ndarray, multiple: int):
  """The batch padded to a multiple of the device count (the last image repeated)."""
  pad = -len(images) % multiple
  if not pad:
    return images, index
  return (np.concatenate([images, np.repeat(images[-1:], pad, axis=0)]),
          np.concatenate([index, np.repeat(index[-1:], pad)]))


def make_score_fn(config, family, variables, bg, mesh, shape, with_maps: bool):
  """(images, index) → ({score: (B,)}, {map: (B, ...)}), computed with the eval
  binary's functions on the mesh."""
  fn = scoring.make_score_fn(family, with_maps)
  key = keys.purpose_key(config.seed, keys.EVAL)
  num_dims, bit_depth = int(math.prod(shape)), int(config.data.bit_depth)

  def score(images, index):
    n = len(images)
    placed = parallel.put_batch(_padded(images, index, mesh.devices.size), mesh)
    out, maps = scoring.score_batch(fn, variables, bg, *placed, key)
    out, maps = jax.tree.map(lambda x: np.asarray(x)[:n], jax.device_get((out, maps)))
    raw = {k: v.astype(np.float64) for k, v in out.items()}
    raw_bg = {k[len(background.PREFIX):]: raw.pop(k) for k in list(raw)
              if k.startswith(background.PREFIX)}
    out = scoring.likelihood_derived(
        family, raw, num_dims, bit_depth,
        background_family=bg.family if bg is not None else None, background_scores=raw_bg)
    return out, maps

  return score


class Loaded(NamedTuple):
  """A workdir's model as a Scorer (or the export) needs it."""
  config: Any
  spatial_ndim: int
  model: Any  # state.Restored
  bg: Any  # scoring.Background, or None
  mesh: Any  # the devices its variables are replicated on


def load_model(workdir: str, config=None, devices=None) -> Loaded:
  """The workdir's latest checkpoint and background model, replicated over `devices`
  (default: the local ones); `config` defaults to WORKDIR/config.json (an override may
  change only what the eval binary allows)."""
  saved = config_lib.load_workdir_config(workdir)
  if config is None:
    config = saved
  else:
    config_lib.check_eval_overrides(config_lib.to_dict(saved), config, workdir)
  mesh = parallel.make_mesh(jax.local_devices() if devices is None else devices)
  ndim, model = restore(config, workdir, mesh)
  bg = scoring.restore_background(config, workdir, ndim, mesh)
  return Loaded(config, ndim, model, bg, mesh)


def from_workdir(workdir: str, *, with_maps: bool = True, config=None) -> Scorer:
  """The Scorer of a workdir's latest checkpoint on the local devices (module
  docstring); `config` as in `load_model`."""
  config, ndim, model, bg, mesh = load_model(workdir, config)
  with_maps = bool(with_maps and model.family.pixel_maps)
  shape = state_lib.image_shape(config, ndim)
  meta = describe(config, model.family, bg, model.step, ndim, with_maps, workdir)
  return Scorer(meta, make_score_fn(config, model.family, model.variables, bg, mesh,
                                    shape, with_maps))
