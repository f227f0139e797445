"""Exports a trained workdir's scorer: `python -m jaxad.export --workdir=W [--out=DIR]`.

Serialises, with `jax.export` (StableHLO), the eval binary's scoring of a batch of any
size: every sample score and pixel map of the family (gradient maps traced, not
re-implemented) and, with a background model, the `*_llr` scores computed in the
program from the two models' bits per dimension. The program takes (variable leaves...,
images (b, *image_shape) float32, index (b,) int32) with a symbolic batch b; the eval
key (from config.seed) is baked in, so image i is scored exactly as the eval binary
scores split position index[i]. The folder (DIR, default W/export) holds

  scorer.jax_export   the serialised program, lowered for --platforms (cpu,cuda by
                      default) and for --try_platforms (tpu) when their lowering works
  variables.npz       its variable leaves, in argument order (v00000, v00001, ...)
  scorer.json         what it takes and returns, preprocessing, thresholds, the training
                      config, step, platforms, versions (jaxad.scorer.describe)
  jaxad_scorer.py     the runtime (jaxad/export_runtime.py): jax and numpy alone

It is written into a temporary folder beside DIR and renamed at the end, so DIR is
whole or absent; an existing non-empty DIR is refused (an export is never overwritten).

From Python:

  from jaxad import export
  folder = export.export("workdirs/oct", "exports/oct", platforms=("cpu", "cuda"))
  scorer = export.load(folder)        # jax and numpy only; jaxad_scorer.load elsewhere
  scores, maps = scorer(images)       # images preprocessed, (B, *scorer.image_shape)
"""

import functools
import math
import os
import shutil
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from jaxad import export_runtime, files
from jaxad.errors import CheckpointError, ConfigError

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # jax.export's names
ALIASES = {"gpu": "cuda"}  # jax.default_backend()'s name of an NVIDIA GPU


class LoadError(CheckpointError, export_runtime.ScorerError):
  """An export folder that cannot be loaded here (the message names the fix): both
  jaxad's CheckpointError and the runtime's ScorerError."""


def load(directory: str) -> export_runtime.Scorer:
  """The Scorer of an export folder (`export_runtime.load`: jax and numpy only); a
  refusal raises LoadError."""
  try:
    return export_runtime.load(directory)
  except export_runtime.ScorerError as e:
    raise LoadError(str(e)) from None


def scoring_program(family, bg_family, treedefs, seed: int, with_maps: bool,
                    num_dims: int, bit_depth: int):
  """fn(*leaves, images, index) → ({score: (b,)}, {map: (b, ...)}): the eval binary's
  per-image scores (`scoring.per_image(family.score)`) with the eval key baked in, and
  `<score>_llr` = bpd − background bpd when there is a background family."""
  from jaxad import background, keys, scoring
  score = scoring.per_image(functools.partial(family.score, with_maps=with_maps))
  bg_score = None if bg_family is None else \
      scoring.per_image(functools.partial(bg_family.score, with_maps=False))
  sizes = [treedef.num_leaves for treedef in treedefs]

  def fn(*args):
    leaves, images, index = args[:-2], args[-2], args[-1]
    variables = treedefs[0].unflatten(leaves[:sizes[0]])
    key = keys.purpose_key(seed, keys.EVAL)
    out, maps = score(variables, images, index, key)
    if bg_score is not None:
      bg_out, _ = bg_score(treedefs[1].unflatten(leaves[sizes[0]:]), images, index, key)
      model = family.likelihood_bpd(out, num_dims, bit_depth)
      bg = bg_family.likelihood_bpd(bg_out, num_dims, bit_depth)
      out = {**out, **background.llr_scores(model, bg)}
    return out, maps
  return fn


def _check_platforms(platforms, key: str) -> tuple[str, ...]:
  """The platform names, lower case, "gpu" read as "cuda"; an unknown one is refused."""
  platforms = tuple(dict.fromkeys(ALIASES.get(p.strip().lower(), p.strip().lower())
                                  for p in platforms if p.strip()))
  bad = [p for p in platforms if p not in PLATFORMS]
  if bad:
    raise ConfigError(f"{key}: unknown platform(s) {bad}: use some of {list(PLATFORMS)} "
                      "(cuda for NVIDIA GPUs, rocm for AMD)")
  return platforms


def lower(fn, specs, platforms, try_platforms) -> tuple:
  """(jax.export.Exported, {optional platform: why it was left out}): lowered for every
  platform in `platforms`, and for each of `try_platforms` that lowers too (tried all
  at once first: one trace when every platform lowers)."""
  optional = tuple(p for p in try_platforms if p not in platforms)
  if optional:
    try:
      return jax.export.export(jax.jit(fn), platforms=platforms + optional)(*specs), {}
    except Exception:  # noqa: BLE001 (a lowering rule missing for some platform)
      pass
  left_out = {}
  for p in optional:
    try:
      jax.export.export(jax.jit(fn), platforms=(p,))(*specs)
    except Exception as e:  # noqa: BLE001
      left_out[p] = f"{type(e).__name__}: {str(e)[:300]}"
  wanted = platforms + tuple(p for p in optional if p not in left_out)
  try:
    return jax.export.export(jax.jit(fn), platforms=wanted)(*specs), left_out
  except Exception as e:  # noqa: BLE001
    raise ConfigError(f"the scoring program does not lower for platforms {list(wanted)} "
                      f"({type(e).__name__}: {str(e)[:300]}): drop the platform that "
                      "fails from --platforms") from None


def _specs(leaves, image_shape):
  b, = jax.export.symbolic_shape("b")
  return ([jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
          + [jax.ShapeDtypeStruct((b, *image_shape), jnp.float32),
             jax.ShapeDtypeStruct((b,), jnp.int32)])


def _check_out(out_dir: str) -> None:
  if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
    raise ConfigError(f"{out_dir} already exists and is not an empty folder: an export "
                      "is never overwritten; pass a new --out (or remove that folder)")


def _write_folder(tmp: str, exported, leaves, meta: dict) -> None:
  """The export's files, each written atomically into `tmp`."""
  rt = export_runtime
  with files.atomic_path(os.path.join(tmp, rt.FUNCTION_FILE)) as path:
    with open(path, "wb") as f:
      f.write(exported.serialize())
  with files.atomic_path(os.path.join(tmp, rt.VARIABLES_FILE)) as path:
    with open(path, "wb") as f:
      np.savez(f, **{f"v{i:05d}": np.asarray(x) for i, x in enumerate(leaves)})
  with files.atomic_path(os.path.join(tmp, rt.RUNTIME_FILE)) as path:
    shutil.copyfile(rt.__file__, path)
  files.write_json(os.path.join(tmp, rt.META_FILE), meta)


def _publish(tmp: str, out_dir: str) -> None:
  """Renames the finished temporary folder to out_dir (its mode as mkdir would give)."""
  os.chmod(tmp, 0o777 & ~files.current_umask())
  try:
    os.rename(tmp, out_dir)  # replaces only a missing or empty folder
  except OSError as e:
    raise ConfigError(f"cannot create {out_dir} ({e.strerror}): another export wrote "
                      "it meanwhile, or its parent is not writable; pass a new --out"
                      ) from None


def export(workdir: str, out_dir: str | None = None, platforms=("cpu", "cuda"),
           with_maps: bool = True, *, try_platforms=("tpu",), config=None) -> str:
  """Writes the scorer of the workdir's latest checkpoint to `out_dir` (default
  WORKDIR/export; module docstring); returns the folder."""
  from jaxad import scorer as scorer_lib
  from jaxad import state as state_lib
  out_dir = os.path.abspath(out_dir or os.path.join(workdir, "export"))
  platforms = _check_platforms(platforms, "--platforms")
  try_platforms = _check_platforms(try_platforms, "--try_platforms")
  if not platforms:
    raise ConfigError("--platforms is empty: name the platforms the scorer must run on, "
                      "e.g. --platforms=cpu,cuda")
  _check_out(out_dir)
  config, ndim, model, bg, _ = scorer_lib.load_model(workdir, config,
                                                     jax.local_devices()[:1])
  with_maps = bool(with_maps and model.family.pixel_maps)
  trees = [model.variables] + ([] if bg is None else [bg.variables])
  flat = [jax.tree.flatten(jax.device_get(t)) for t in trees]
  leaves = [x for tree_leaves, _ in flat for x in tree_leaves]
  shape = tuple(int(s) for s in state_lib.image_shape(config, ndim))
  fn = scoring_program(model.family, None if bg is None else bg.family,
                       [treedef for _, treedef in flat], int(config.seed), with_maps,
                       math.prod(shape), int(config.data.bit_depth))
  exported, left_out = lower(fn, _specs(leaves, shape), platforms, try_platforms)
  meta = scorer_lib.describe(config, model.family, bg, model.step, ndim, with_maps,
                             workdir)
  meta["platforms"] = list(exported.platforms)
  if left_out:
    meta["platforms_not_exported"] = left_out
  meta["serialization"] = {
      "calling_convention_version": exported.calling_convention_version,
      "num_variables": len(leaves), "batch": "symbolic"}
  os.makedirs(os.path.dirname(out_dir), exist_ok=True)
  tmp = tempfile.mkdtemp(dir=os.path.dirname(out_dir),
                         prefix=f".{os.path.basename(out_dir)}.", suffix=".tmp")
  try:
    _write_folder(tmp, exported, leaves, meta)
    _publish(tmp, out_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out_dir


def define_flags() -> None:
  """The binary's flags (defined only when run as a binary: `load` needs no absl)."""
  from absl import flags
  flags.DEFINE_string("workdir", None, "A training workdir (holds config.json and "
                      "checkpoints/).")
  flags.DEFINE_string("out", None, "The export folder to create (default "
                      "WORKDIR/export); an existing non-empty folder is refused.")
  flags.DEFINE_list("platforms", ["cpu", "cuda"], "Platforms the program must run on "
                    "(cpu, cuda, rocm, tpu).")
  flags.DEFINE_list("try_platforms", ["tpu"], "Platforms added when the program lowers "
                    "for them (scorer.json records the ones that did not).")
  flags.DEFINE_boolean("with_maps", True, "Export the pixel maps as well as the scores.")


def main(argv):
  from absl import flags
  from jaxad import cli
  FLAGS = flags.FLAGS
  cli.check_no_args(argv)
  if not FLAGS.workdir:
    sys.exit("error: --workdir is required (a folder made by python -m jaxad.train)")
  with cli.session():
    folder = export(FLAGS.workdir, FLAGS.out, FLAGS.platforms, FLAGS.with_maps,
                    try_platforms=FLAGS.try_platforms)
  meta = export_runtime.read_meta(folder)
  print(f"exported {meta['family']} (checkpoint step {meta['step']}) for "
        f"{', '.join(meta['platforms'])}: scores {', '.join(meta['score_names'])}; maps "
        f"{', '.join(meta['map_names']) or 'none'}")
  if meta.get("thresholds_note"):
    print(f"thresholds: none ({meta['thresholds_note']})")
  print(f"scorer in {folder} (load it with jaxad_scorer.load; jax and numpy only)")


if __name__ == "__main__":
  from jaxad import cli
  define_flags()
  cli.run(main)
