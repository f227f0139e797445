"""Unlabeled inputs for batch scoring (the eval binary's --input): a folder or an .npz.

Not a `data.source`: no splits and no classes, just images to score. Both kinds are
read one image at a time, so memory stays flat however many images they hold.
"""

import os

import numpy as np

from jaxad.data import npz as npz_lib
from jaxad.data.sources import base, npz_arrays, pixels
from jaxad.errors import DataError


def unlabeled_source(path: str, ndim: int = 0) -> base.Source:
  """Images to score with no labels: a folder (searched recursively) or an .npz file.

  A folder is read file by file and an .npz (its `images` array, or its only
  `*_images` array) row by row. Every image gets the class 'unlabeled', treated as
  normal.
  """
  if os.path.isdir(path):
    files = sorted(os.path.relpath(os.path.join(d, f), path)
                   for d, _, names in os.walk(path) for f in names
                   if not f.startswith(".")
                   and os.path.splitext(f)[1].lower() in pixels.IMAGE_EXTS)
    if not files:
      raise DataError(f"no images under {path} (looked for "
                      f"{', '.join('*' + e for e in pixels.IMAGE_EXTS)}): check --input")
    reader = lambda i: (pixels.decode_image(os.path.join(path, files[i])), None)
    ids, spatial_ndim, blocks = files, 2, None
  elif path.endswith(".npz") and os.path.isfile(path):
    names = npz_lib.member_names(path)
    keys = [k for k in names if k == "images" or k.endswith("_images")]
    if len(keys) != 1:
      raise DataError(f"{path} must hold one image array named 'images' or "
                      f"'<split>_images' (its keys: {names}): check --input")
    images = npz_lib.NpzArray(path, keys[0])
    spatial_ndim = npz_arrays.spatial_rank(images.shape, ndim, f"npz:{path}")
    read = npz_arrays.image_reader(images, spatial_ndim, f"npz:{path}")
    reader = lambda i: (read(i), None)
    blocks = npz_arrays.image_blocks(images, spatial_ndim)
    ids = [f"{keys[0]}/{i}" for i in range(len(images))]
  else:
    raise DataError(f"--input={path!r} is neither a folder of images nor an .npz file")
  return base.Source(
      name=f"input:{path}", class_names=("unlabeled",), labels=np.zeros(len(ids), np.int32),
      ids=base.str_array(ids), groups=None, has_masks=False, spatial_ndim=spatial_ndim,
      reader=reader, from_files=os.path.isdir(path), blocks=blocks)
