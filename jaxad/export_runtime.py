"""The scorer runtime: loads an exported jaxad scorer with jax and numpy alone.

`python -m jaxad.export` writes a folder (scorer.json, the StableHLO program, its
variables) and copies this file into it as `jaxad_scorer.py`, so a site without jaxad,
flax, optax or TensorFlow scores images with the trained model:

  import sys; sys.path.insert(0, "/models/oct_export")
  import jaxad_scorer
  scorer = jaxad_scorer.load("/models/oct_export")
  scores, maps = scorer(images)  # float32 (B, *scorer.image_shape), preprocessed

`images` are preprocessed as jaxad's pipeline does (scorer.meta["preprocessing"]: resized
to image_size, channels, intensity window mapped to [-1, 1]); image i is scored with the
eval binary's key for image position index[i] (default 0..B-1), so its scores equal the
eval binary's. An image is anomalous at `score >= scorer.thresholds["scores"][name]
[rule]["threshold"]` (thresholds.json of the workdir, when it was written).

The program's batch axis is symbolic: any batch size runs, each new size compiling once
(a batch is padded to a size already run when that is at most twice its own, so a
ragged last batch compiles nothing); score a large set in batches. It is compiled with
XLA's default options, so scores equal jaxad's to float32 rounding, not bit for bit.

This module imports only the standard library, numpy and jax: keep it so.
"""

import json
import os

import jax
import numpy as np

FORMAT = 1  # scorer.json's "format": bump when the folder's layout changes
META_FILE = "scorer.json"
FUNCTION_FILE = "scorer.jax_export"  # jax.export's serialised StableHLO program
VARIABLES_FILE = "variables.npz"  # the program's variable leaves, in its argument order
RUNTIME_FILE = "jaxad_scorer.py"  # this module, copied beside them


class ScorerError(ValueError):
  """An export folder that cannot be loaded here; the message names the fix."""


class Scorer:
  """Scores preprocessed images: scorer(images, index) → (scores, maps), each a dict
  of float32 arrays: a score (B,), a map (B, *spatial).

  `score_fn(images float32 (B, *image_shape), index int32 (B,))` computes the scores and
  maps (the exported program, or jaxad's own functions in `jaxad.scorer.from_workdir`).
  """

  def __init__(self, meta: dict, score_fn):
    self.meta = meta
    self.image_shape = tuple(int(s) for s in meta["image_shape"])
    self.score_names = tuple(meta["score_names"])
    self.map_names = tuple(meta["map_names"])
    self.thresholds = dict(meta.get("thresholds") or {})
    self._score_fn = score_fn
    self._sizes = set()  # batch sizes run so far (`_padded`)

  def __repr__(self) -> str:
    return (f"Scorer({self.meta.get('family')} at step {self.meta.get('step')}, images "
            f"{self.image_shape}, scores {list(self.score_names)}, maps "
            f"{list(self.map_names)})")

  def __call__(self, images, index=None) -> tuple[dict, dict]:
    """({score: float32 (B,)}, {map: float32 (B, *spatial)}) of the images; image i is
    keyed by index[i] (default arange(B)), as the eval binary keys split position i."""
    images, index = self._check(images, index)
    if not len(images):
      spatial = self.image_shape[:-1]
      return ({k: np.zeros(0, np.float32) for k in self.score_names},
              {k: np.zeros((0, *spatial), np.float32) for k in self.map_names})
    n = len(images)
    images, index = self._padded(images, index)
    scores, maps = self._score_fn(images, index)
    return ({k: np.asarray(scores[k], np.float32)[:n] for k in self.score_names},
            {k: np.asarray(maps[k], np.float32)[:n] for k in self.map_names})

  def _padded(self, images, index) -> tuple[np.ndarray, np.ndarray]:
    """The batch padded (last image repeated) to the smallest batch size already run
    that is at most twice its size, so a ragged last batch reuses the compiled program
    instead of compiling another (an image's scores do not depend on its batch-mates)."""
    n = len(images)
    size = min((s for s in self._sizes if n <= s <= 2 * n), default=n)
    self._sizes.add(size)
    if size == n:
      return images, index
    return (np.concatenate([images, np.repeat(images[-1:], size - n, axis=0)]),
            np.concatenate([index, np.repeat(index[-1:], size - n)]))

  def _check(self, images, index) -> tuple[np.ndarray, np.ndarray]:
    images = np.asarray(images)
    if images.shape[1:] != self.image_shape:
      raise ScorerError(
          f"images of shape {images.shape}: this scorer takes (B, *{self.image_shape}), "
          "images preprocessed as jaxad's pipeline does (scorer.meta['preprocessing']); "
          "a single image needs a leading batch axis (image[None])")
    if not np.issubdtype(images.dtype, np.floating):
      raise ScorerError(f"images of dtype {images.dtype}: pass float32 images scaled to "
                        "[-1, 1] as jaxad's pipeline does, not raw pixel values")
    images = images.astype(np.float32, copy=False)
    if index is None:
      return images, np.arange(len(images), dtype=np.int32)
    raw = np.asarray(index)
    if raw.shape != (len(images),) or not np.issubdtype(raw.dtype, np.integer):
      raise ScorerError(f"index of shape {raw.shape} and dtype {raw.dtype}: pass one "
                        f"integer position per image, shape ({len(images)},), or None")
    if len(raw) and (raw.min() < 0 or raw.max() > np.iinfo(np.int32).max):
      raise ScorerError(f"index values must lie in [0, 2^31): got {raw.min()}.."
                        f"{raw.max()}")
    return images, raw.astype(np.int32)


def current_platform() -> str:
  """jax.default_backend() as jax.export names platforms ("cuda"/"rocm", not "gpu")."""
  backend = jax.default_backend()
  if backend != "gpu":
    return backend
  version = str(getattr(jax.devices()[0].client, "platform_version", "")).lower()
  return "rocm" if "rocm" in version else "cuda"


def _need(directory: str, name: str) -> str:
  path = os.path.join(directory, name)
  if not os.path.isfile(path):
    raise ScorerError(
        f"{path} is missing: {directory} is not a whole jaxad export (it holds "
        f"{META_FILE}, {FUNCTION_FILE}, {VARIABLES_FILE} and {RUNTIME_FILE}); copy the "
        "whole export folder, or export again (python -m jaxad.export --workdir=WORKDIR "
        "--out=NEW_FOLDER)")
  return path


def read_meta(directory: str) -> dict:
  """scorer.json of an export folder, its format checked."""
  if not os.path.isdir(directory):
    raise ScorerError(f"{directory} is not a folder: pass the folder python -m "
                      "jaxad.export wrote (WORKDIR/export by default)")
  with open(_need(directory, META_FILE)) as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT:
    raise ScorerError(
        f"{os.path.join(directory, META_FILE)} has format {meta.get('format')!r} but "
        f"this runtime reads format {FORMAT}: load it with the {RUNTIME_FILE} saved in "
        "that folder (import it from there), or export the workdir again with this jaxad")
  return meta


def _check_platform(meta: dict, directory: str) -> None:
  here, exported = current_platform(), list(meta.get("platforms", ()))
  if here not in exported:
    other = exported[0] if exported else "cpu"
    raise ScorerError(
        f"{directory} was exported for {', '.join(exported) or 'no platform'} but jax "
        f"here runs on {here}: export again with "
        f"--platforms={','.join(exported + [here])}, or run on one of those (e.g. "
        f"JAX_PLATFORMS={other})")


def _deserialize(meta: dict, directory: str):
  """The exported program; a jax too old or too new to read it is named as such."""
  saved = meta.get("serialization", {})
  made_with = meta.get("versions", {}).get("jax", "an unknown jax")
  version = saved.get("calling_convention_version")
  low = jax.export.minimum_supported_calling_convention_version
  high = jax.export.maximum_supported_calling_convention_version
  fix = (f"load it with jax {made_with} (pip install jax=={made_with}), or export the "
         f"workdir again with jax {jax.__version__}")
  if version is not None and not low <= int(version) <= high:
    raise ScorerError(
        f"{directory} was exported by jax {made_with} with calling convention version "
        f"{version}; jax {jax.__version__} here reads versions {low}..{high}: {fix}")
  with open(_need(directory, FUNCTION_FILE), "rb") as f:
    data = bytearray(f.read())
  try:
    return jax.export.deserialize(data)
  except Exception as e:  # noqa: BLE001 (flatbuffer or MLIR errors of another jax)
    raise ScorerError(
        f"jax {jax.__version__} here cannot read "
        f"{os.path.join(directory, FUNCTION_FILE)} (exported by jax {made_with}, calling "
        f"convention version {version}; {type(e).__name__}: {str(e)[:200]}): {fix}"
    ) from None


def _variables(directory: str, count: int) -> list:
  """The program's variable leaves, in argument order, on the default device."""
  with np.load(_need(directory, VARIABLES_FILE)) as f:
    names = sorted(f.files)
    if len(names) != count:
      raise ScorerError(
          f"{os.path.join(directory, VARIABLES_FILE)} holds {len(names)} arrays but the "
          f"program takes {count}: the folder mixes two exports; export again")
    return [jax.device_put(f[k]) for k in names]


def load(directory: str) -> Scorer:
  """The Scorer of an export folder (`python -m jaxad.export`); ScorerError names what
  is wrong (a missing file, an unknown format, a platform or jax it was not made for)."""
  directory = os.path.abspath(directory)
  meta = read_meta(directory)
  _check_platform(meta, directory)
  exported = _deserialize(meta, directory)
  leaves = _variables(directory, len(exported.in_avals) - 2)
  call = jax.jit(exported.call)

  def score_fn(images, index):
    scores, maps = call(*leaves, images, index)
    return jax.device_get((scores, maps))

  return Scorer(meta, score_fn)
