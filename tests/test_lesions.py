"""Synthetic lesions: exact masks, sizes, per-index determinism, fraction, validation."""

import math

import ml_collections
import numpy as np
import pytest

from jaxad.data import lesions
from jaxad.errors import ConfigError

SHAPES = {2: (64, 64), 3: (32, 32, 32)}


def _images(n, spatial, channels, seed=0):
  """Random textures in [-0.9, 0.9]: every lesion kind visibly changes them."""
  rng = np.random.default_rng(seed)
  return rng.uniform(-0.9, 0.9, (n, *spatial, channels)).astype(np.float32)


def _check_contract(image, out, mask):
  assert out.shape == image.shape and out.dtype == np.float32
  assert mask.shape == image.shape[:-1] + (1,) and mask.dtype == np.float32
  assert out.min() >= -1.0 and out.max() <= 1.0
  assert set(np.unique(mask)) <= {0.0, 1.0}
  inside = mask[..., 0] == 1
  assert inside.any()
  change = np.abs(out - image).max(-1)
  np.testing.assert_array_equal(out[~inside], image[~inside])
  assert (change[inside] > lesions.EPS).all()


@pytest.mark.parametrize("kind", lesions.KINDS)
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("channels", [1, 3])
def test_each_kind_marks_exactly_the_changed_pixels(kind, ndim, channels):
  spec = lesions.LesionSpec(kinds=(kind,))
  spatial = SHAPES[ndim]
  ball = math.pi if ndim == 2 else 4 / 3 * math.pi
  smallest = ball * spec.min_radius ** ndim * math.prod(spatial)
  largest = ball * spec.max_radius ** ndim * math.prod(spatial)
  image, donor = _images(2, spatial, channels)
  for seed in range(4):
    out, mask = lesions.insert_lesion(image, np.random.default_rng(seed), spec, donor)
    _check_contract(image, out, mask)
    assert 0.6 * smallest <= mask.sum() <= 1.3 * largest
    if kind == "patch":
      inside = mask[..., 0] == 1
      # Deep inside the patch the donor is copied; everywhere it moves towards it.
      assert np.isclose(out[inside], donor[inside]).mean() > 0.3


def test_ellipse_shift_is_one_signed_intensity_change():
  spec = lesions.LesionSpec(kinds=("ellipse",), intensity=0.4)
  image = np.zeros((32, 32, 3), np.float32)
  out, mask = lesions.insert_lesion(image, np.random.default_rng(1), spec)
  delta = (out - image)[mask[..., 0] == 1]
  assert np.allclose(delta, delta[:, :1])  # same shift in every channel
  assert np.isclose(np.abs(delta).max(), 0.4)
  assert (delta > 0).all() or (delta < 0).all()


def test_patch_without_donor_uses_another_kind():
  spec = lesions.LesionSpec(kinds=("patch",))
  image = _images(1, (32, 32), 1)[0]
  out, mask = lesions.insert_lesion(image, np.random.default_rng(0), spec)
  _check_contract(image, out, mask)


def test_invisible_lesions_fall_back_to_a_visible_shift():
  saturated = np.ones((32, 32, 1), np.float32)
  for seed in range(6):
    rng = np.random.default_rng(seed)
    out, mask = lesions.insert_lesion(saturated, rng, lesions.LesionSpec(kinds=("ellipse",)))
    _check_contract(saturated, out, mask)
  image = _images(1, (32, 32), 3)[0]
  out, mask = lesions.insert_lesion(image, np.random.default_rng(0),
                                    lesions.LesionSpec(kinds=("patch",)), donor=image)
  _check_contract(image, out, mask)


def _add(pool, index, spec):
  """add_lesions on pool[index], donors read from the whole pool (the split)."""
  return lesions.add_lesions(pool[index], index, spec, num_images=len(pool),
                             read_donors=lambda i: pool[i])


def test_add_lesions_is_deterministic_per_index_whatever_the_batch_order():
  spec = lesions.LesionSpec(fraction=0.7, seed=5)
  pool = _images(112, (24, 24), 3)
  index = np.arange(100, 112)
  out, masks, anomalous = _add(pool, index, spec)
  assert masks.shape == (12, 24, 24, 1) and anomalous.dtype == np.int32
  perm = np.random.default_rng(0).permutation(12)
  out2, masks2, anomalous2 = _add(pool, index[perm], spec)
  np.testing.assert_array_equal(out2, out[perm])
  np.testing.assert_array_equal(masks2, masks[perm])
  np.testing.assert_array_equal(anomalous2, anomalous[perm])
  assert 0 < anomalous.sum() < 12


@pytest.mark.parametrize("spatial", [(16, 16), (8, 8, 8)])
def test_lesions_and_donors_do_not_depend_on_the_batch(spatial):
  # Every kind, patches included: batches of 1, 3, 8 and 24 and a shuffled order give
  # the same lesion per index, and patch donors come from outside the batch.
  spec = lesions.LesionSpec(fraction=0.8, seed=2)
  pool = _images(24, spatial, 1)
  whole = _add(pool, np.arange(24), spec)
  for size in (1, 3, 8):
    for start in range(0, 24, size):
      rows = np.arange(start, min(start + size, 24))
      for a, b in zip(whole, _add(pool, rows, spec)):
        np.testing.assert_array_equal(a[rows], b)
  plans = [lesions.plan(i, spec, 24) for i in range(24)]
  kinds = {kind for kind, _ in plans}
  assert {"ellipse", "noise", "patch", None} <= kinds
  for i, (kind, donor) in enumerate(plans):
    assert (donor >= 0) == (kind == "patch") and donor != i and donor < 24
    if kind == "patch" and donor // 8 != i // 8:  # a donor outside a batch of 8
      inside = whole[1][i, ..., 0] == 1  # every changed pixel moved towards the donor
      out, before, target = whole[0][i][inside], pool[i][inside], pool[donor][inside]
      assert (np.abs(out - target) < np.abs(before - target)).all()
      assert np.isclose(out, target).any()  # the centre is the donor's pixel


def test_patch_lesions_need_the_split_to_read_donors():
  pool = _images(8, (16, 16), 1)
  spec = lesions.LesionSpec(kinds=("patch",), fraction=1.0)
  with pytest.raises(ValueError, match="pass read_donors"):
    lesions.add_lesions(pool, np.arange(8), spec, num_images=8)
  with pytest.raises(ValueError, match="outside the split's 8 images"):
    lesions.add_lesions(pool[:1], np.array([8]), spec, num_images=8,
                        read_donors=lambda i: pool[i])
  # A one-image split has no donor: another kind, and no read needed.
  out, masks, anomalous = lesions.add_lesions(pool[:1], np.array([0]), spec, num_images=1)
  assert anomalous.tolist() == [1] and masks.sum() > 0
  # Without 'patch' nothing is read.
  no_patch = lesions.LesionSpec(kinds=("ellipse", "noise"), fraction=1.0)
  assert lesions.add_lesions(pool, np.arange(8), no_patch, num_images=8)[2].sum() == 8


def test_padding_repeats_and_single_image_batches():
  spec = lesions.LesionSpec(fraction=1.0)
  pool = _images(9, (16, 16), 1)
  out, masks, anomalous = _add(pool, np.array([7, 8, 7]), spec)
  np.testing.assert_array_equal(out[0], out[2])
  np.testing.assert_array_equal(masks[0], masks[2])
  out1, masks1, anomalous1 = _add(pool, np.array([7]), spec)
  assert anomalous1.tolist() == [1] and masks1.sum() > 0
  np.testing.assert_array_equal(out1[0], out[0])


def test_different_seeds_give_different_lesions():
  pool = _images(8, (16, 16), 1)
  index = np.arange(8)
  a = _add(pool, index, lesions.LesionSpec(fraction=1.0, seed=0))
  b = _add(pool, index, lesions.LesionSpec(fraction=1.0, seed=1))
  assert not np.array_equal(a[1], b[1])


@pytest.mark.parametrize("fraction", [0.2, 0.5])
def test_fraction_and_untouched_images(fraction):
  spec = lesions.LesionSpec(fraction=fraction, seed=3)
  images = _images(2000, (6, 6), 1)
  out, masks, anomalous = _add(images, np.arange(2000), spec)
  assert abs(anomalous.mean() - fraction) <= 0.05
  clean = anomalous == 0
  np.testing.assert_array_equal(out[clean], images[clean])
  assert masks[clean].sum() == 0
  assert (masks[~clean].reshape(int((~clean).sum()), -1).max(-1) == 1).all()


def test_spec_from_config_reads_fields_and_defaults():
  cfg = ml_collections.ConfigDict(dict(kinds="ellipse, noise", fraction=0.3, seed=2))
  spec = lesions.spec_from_config(cfg)
  assert spec.kinds == ("ellipse", "noise") and spec.fraction == 0.3 and spec.seed == 2
  assert spec.max_radius == lesions.LesionSpec().max_radius


@pytest.mark.parametrize("fields,match", [
    (dict(kinds=("ellipse", "blob")), r"eval\.lesions\.kinds.*'ellipse', 'noise', 'patch'"),
    (dict(kinds=()), r"eval\.lesions\.kinds"),
    (dict(min_radius=0.3, max_radius=0.2), r"eval\.lesions\.min_radius.*max_radius"),
    (dict(max_radius=0.5), r"max_radius"),
    (dict(min_radius=0.0), r"min_radius"),
    (dict(fraction=1.5), r"eval\.lesions\.fraction"),
    (dict(intensity=0.0), r"eval\.lesions\.intensity"),
    (dict(noise_std=-1.0), r"eval\.lesions\.noise_std"),
    (dict(seed=-1), r"eval\.lesions\.seed"),
])
def test_spec_from_config_rejects_bad_values(fields, match):
  with pytest.raises(ConfigError, match=match):
    lesions.spec_from_config(ml_collections.ConfigDict(fields), prefix="eval.lesions")


def test_direct_construction_is_validated_too():
  with pytest.raises(ConfigError, match="LesionSpec.kinds"):
    lesions.LesionSpec(kinds=("square",))
