"""Synthetic lesions: anomalies painted into normal images, with their exact masks.

Pixel-wise evaluation needs ground-truth masks and most data sets have none. These
functions insert seeded lesions into preprocessed images (float32 in [-1, 1], channels
last, 2D (H, W, C) or 3D (D, H, W, C)) and return a mask that is exactly the set of
changed pixels, so any pixel map can be scored on any data set.

Every lesion is an ellipse (2D) or ellipsoid (3D) with random radii, orientation and
position, filled one of three ways:
  ellipse: an intensity shift, the same for all channels;
  noise:   additive gaussian noise;
  patch:   the same region of another (donor) image (Zimmerer's "foreign patch").
Edges are soft (the outer `EDGE` of each radius ramps to zero), and a pixel belongs to
the mask iff some channel moved by more than `EPS`; pixels below that are left exactly
as they were. All draws for one image come from `np.random.default_rng([seed, index])`,
including its patch donor, an index drawn over the whole split (read through the same
source and preprocessing), so a test image gets the same lesion whatever its batch,
order, batch size, device or process count, and the same in the eval binary and grid.
"""

import dataclasses
from collections.abc import Callable

import ml_collections
import numpy as np

from jaxad.errors import ConfigError

KINDS = ("ellipse", "noise", "patch")
EPS = 1e-3  # A pixel counts as changed when some channel moved by more than this.
EDGE = 0.3  # Soft edge: strength ramps from 1 at 0.7·radius to 0 at the radius.


@dataclasses.dataclass(frozen=True)
class LesionSpec:
  """Which lesions to insert, how large and how often; validated on construction."""
  kinds: tuple[str, ...] = KINDS  # One kind drawn per lesion; a repeat weights a kind.
  fraction: float = 0.5  # Fraction of images that receive a lesion.
  min_radius: float = 0.08  # Radius range, as a fraction of each image side.
  max_radius: float = 0.2
  intensity: float = 0.6  # ellipse: shift added, sign drawn at random, clipped.
  noise_std: float = 0.5  # noise: std of the additive noise inside the blob.
  seed: int = 0

  def __post_init__(self):
    object.__setattr__(self, "kinds", _as_kinds(self.kinds))
    _validate({f.name: getattr(self, f.name) for f in dataclasses.fields(self)},
              "LesionSpec")


def _as_kinds(kinds) -> tuple[str, ...]:
  """Accepts a tuple, a single kind, or a comma-separated string from the command line."""
  if isinstance(kinds, str):
    kinds = [k.strip() for k in kinds.split(",") if k.strip()]
  return tuple(kinds)


def _is_number(value) -> bool:
  return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
      value, bool)


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def _validate(v: dict, prefix: str) -> None:
  """Raises ConfigError naming the first field (as `prefix.field`) that cannot work."""
  unknown = [k for k in v["kinds"] if k not in KINDS]
  _require(bool(v["kinds"]) and not unknown,
           f"{prefix}.kinds={v['kinds']!r} has unknown or no kinds {unknown}: use a "
           f"non-empty subset of {list(KINDS)}")
  for key in ("fraction", "min_radius", "max_radius", "intensity", "noise_std"):
    _require(_is_number(v[key]), f"{prefix}.{key}={v[key]!r} must be a number")
  _require(0.0 <= v["fraction"] <= 1.0,
           f"{prefix}.fraction={v['fraction']} must be in [0, 1]: set "
           f"{prefix}.fraction to the share of images that get a lesion")
  _require(0.0 < v["min_radius"] <= v["max_radius"] < 0.5,
           f"{prefix}.min_radius={v['min_radius']} and {prefix}.max_radius="
           f"{v['max_radius']} must satisfy 0 < min_radius <= max_radius < 0.5 "
           "(fractions of the image side): set both, e.g. 0.08 and 0.2")
  _require(EPS < v["intensity"] <= 2.0,
           f"{prefix}.intensity={v['intensity']} must be in ({EPS}, 2] (a shift in "
           "the [-1, 1] intensity scale): set e.g. 0.6")
  _require(v["noise_std"] > 0.0,
           f"{prefix}.noise_std={v['noise_std']} must be > 0: set e.g. 0.5")
  _require(isinstance(v["seed"], (int, np.integer)) and not isinstance(v["seed"], bool)
           and v["seed"] >= 0,
           f"{prefix}.seed={v['seed']!r} must be an integer >= 0")


def spec_from_config(cfg: ml_collections.ConfigDict, prefix: str = "lesions") -> LesionSpec:
  """Builds a LesionSpec from the fields of `cfg` (missing ones keep their defaults).

  `prefix` is where `cfg` lives in the experiment config; error messages name
  `prefix.field` so the user knows which flag to fix.
  """
  default = LesionSpec()
  values = {f.name: cfg.get(f.name, getattr(default, f.name))
            for f in dataclasses.fields(LesionSpec)}
  values["kinds"] = _as_kinds(values["kinds"])
  _validate(values, prefix)
  return LesionSpec(**values)


def _check_image(image: np.ndarray, name: str) -> None:
  if image.ndim not in (3, 4):
    raise ValueError(f"{name} must be (H, W, C) or (D, H, W, C); got shape {image.shape}")


def _rotation(rng: np.random.Generator, n: int) -> np.ndarray:
  """A uniformly random orthogonal matrix (its columns are the ellipse axes)."""
  q, r = np.linalg.qr(rng.normal(size=(n, n)))
  return q * np.sign(np.diag(r))


def _draw_ellipse(rng: np.random.Generator, spatial: tuple[int, ...],
                  spec: LesionSpec) -> tuple[tuple[slice, ...], np.ndarray]:
  """Draws an ellipse(-oid) and returns its bounding box and soft weights in that box.

  Coordinates are fractions of each side, so radii are fractions of the side along
  every axis. The centre is a pixel centre (which always gets weight 1) placed so the
  whole rotated ellipse fits inside the image, up to half a pixel of rounding.
  """
  n = len(spatial)
  radii = rng.uniform(spec.min_radius, spec.max_radius, n)
  rotation = _rotation(rng, n)
  reach = radii.max()
  center = []
  for size in spatial:
    lo, hi = int(np.ceil(reach * size - 0.5)), int(np.floor((1 - reach) * size - 0.5))
    center.append(int(rng.integers(lo, hi + 1)) if lo <= hi else (size - 1) // 2)
  box = tuple(slice(max(0, c - int(np.ceil(reach * s))),
                    min(s, c + int(np.ceil(reach * s)) + 1))
              for c, s in zip(center, spatial))
  axes = [(np.arange(b.start, b.stop) - c) / s for b, c, s in zip(box, center, spatial)]
  offsets = np.stack(np.meshgrid(*axes, indexing="ij"), -1)
  distance = np.sqrt(np.sum((offsets @ rotation / radii) ** 2, -1))
  t = np.clip((1.0 - distance) / EDGE, 0.0, 1.0)
  return box, (t * t * (3.0 - 2.0 * t)).astype(np.float32)


def _paint(image: np.ndarray, box: tuple[slice, ...], weight: np.ndarray,
           target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Blends `target` into `image[box]` by `weight`; keeps only changes above EPS."""
  region = image[box]
  blended = np.clip(region + weight[..., None] * (target - region), -1.0, 1.0)
  changed = np.abs(blended - region).max(-1) > EPS
  out = image.copy()
  out[box] = np.where(changed[..., None], blended, region)
  mask = np.zeros(image.shape[:-1] + (1,), np.float32)
  mask[box + (0,)] = changed
  return out, mask


def _kinds_without_patch(kinds: tuple[str, ...]) -> tuple[str, ...]:
  return tuple(k for k in kinds if k != "patch") or ("ellipse",)


def insert_lesion(image: np.ndarray, rng: np.random.Generator, spec: LesionSpec,
                  donor: np.ndarray | None = None,
                  kind: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Inserts one lesion; returns (image, mask (*spatial, 1) float32 in {0, 1}).

  The kind is `kind`, else drawn from spec.kinds ('patch' only when a donor of the same
  shape is given). If a lesion would change no pixel visibly (a donor equal to the
  image there, or a shift into saturation), an intensity shift of the other sign is
  used instead, so the mask is never empty.
  """
  image = np.asarray(image, np.float32)
  _check_image(image, "image")
  if donor is not None:
    donor = np.asarray(donor, np.float32)
    if donor.shape != image.shape:
      raise ValueError(f"donor shape {donor.shape} differs from image shape {image.shape}")
  if kind is None:
    kinds = spec.kinds if donor is not None else _kinds_without_patch(spec.kinds)
    kind = kinds[int(rng.integers(len(kinds)))]
  elif kind not in KINDS or (kind == "patch" and donor is None):
    raise ValueError(f"kind={kind!r} needs to be one of {list(KINDS)}, and 'patch' a donor")
  box, weight = _draw_ellipse(rng, image.shape[:-1], spec)
  sign = float(rng.choice((-1.0, 1.0)))
  region = image[box]
  if kind == "ellipse":
    target = region + sign * spec.intensity
  elif kind == "noise":
    target = region + rng.normal(0.0, spec.noise_std, region.shape).astype(np.float32)
  else:
    target = donor[box]
  out, mask = _paint(image, box, weight, target)
  for s in (sign, -sign):
    if mask.any():
      break
    out, mask = _paint(image, box, weight, region + s * spec.intensity)
  return out, mask


def plan(index: int, spec: LesionSpec, num_images: int) -> tuple[str | None, int]:
  """(kind, donor index) of image `index` of a `num_images` split; kind None: no lesion.

  A function of (spec.seed, index, num_images) alone. The donor (-1 unless the kind is
  'patch') is uniform over the split's other images; a one-image split has no donor,
  so it draws among the other kinds.
  """
  return _plan(int(index), spec, int(num_images))[1:]


def _plan(index: int, spec: LesionSpec, num_images: int):
  """(the image's generator after its plan draws, kind, donor); see `plan`."""
  if not 0 <= index < num_images:
    raise ValueError(f"index {index} is outside the split's {num_images} images: pass "
                     "dataset indices in [0, num_images)")
  rng = np.random.default_rng([spec.seed, index])
  if not rng.random() < spec.fraction:
    return rng, None, -1
  kinds = spec.kinds if num_images > 1 else _kinds_without_patch(spec.kinds)
  kind = kinds[int(rng.integers(len(kinds)))]
  donor = -1
  if kind == "patch":
    donor = (index + 1 + int(rng.integers(num_images - 1))) % num_images
  return rng, kind, donor


def add_lesions(images: np.ndarray, index: np.ndarray, spec: LesionSpec, *,
                num_images: int,
                read_donors: Callable[[np.ndarray], np.ndarray] | None = None,
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Inserts lesions into a batch; returns (images, masks (B, *spatial, 1), anomalous (B,)).

  `index[b]` is image b's index in its split of `num_images` images; whether it gets a
  lesion, which one, and its patch donor depend only on (spec.seed, index[b],
  num_images) (see `plan`), never on the batch. `read_donors(indices)` returns those
  images of the split, preprocessed as `images` are; it is needed only when
  spec.kinds has 'patch'. Repeated indices (eval padding) get identical lesions.
  Images without a lesion come back unchanged with an all-zero mask.
  """
  images = np.asarray(images, np.float32)
  index = np.asarray(index)
  if images.ndim not in (4, 5) or index.shape != images.shape[:1]:
    raise ValueError(f"need images (B, *spatial, C) and index (B,); got {images.shape} "
                     f"and {index.shape}")
  plans = [_plan(i, spec, num_images) for i in index.tolist()]
  donor_of = sorted({d for _, _, d in plans if d >= 0})
  donors = {}
  if donor_of:
    if read_donors is None:
      raise ValueError("patch lesions take their donor from the whole split: pass "
                       "read_donors (indices -> preprocessed images), or leave 'patch' "
                       "out of the lesion kinds")
    read = np.asarray(read_donors(np.asarray(donor_of)), np.float32)
    if read.shape != (len(donor_of), *images.shape[1:]):
      raise ValueError(f"read_donors returned shape {read.shape} for {len(donor_of)} "
                       f"donors of images shaped {images.shape[1:]}")
    donors = dict(zip(donor_of, read))
  out = images.copy()
  masks = np.zeros(images.shape[:-1] + (1,), np.float32)
  anomalous = np.zeros(images.shape[0], np.int32)
  for pos, (rng, kind, donor) in enumerate(plans):
    if kind is None:
      continue
    out[pos], masks[pos] = insert_lesion(images[pos], rng, spec, donors.get(donor), kind)
    anomalous[pos] = 1
  return out, masks, anomalous
