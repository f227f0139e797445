"""Unlabeled inputs for batch scoring (the eval binary's --input, `jaxad.predict`): a
folder of images, a folder of NIfTI volumes, or an .npz.

Not a `data.source`: no splits and no classes, just images to score. Every kind is
read one image at a time, so memory stays flat however many images they hold.
"""

import os

import numpy as np

from jaxad.data import npz as npz_lib
from jaxad.data.sources import base, npz_arrays, pixels
from jaxad.data.sources.nifti import NIFTI_EXTS, read_nifti
from jaxad.errors import DataError


def _is_nifti(name: str) -> bool:
  return name.lower().endswith(NIFTI_EXTS)


def _is_image(name: str) -> bool:
  return os.path.splitext(name)[1].lower() in pixels.IMAGE_EXTS


def folder_files(path: str, ndim: int = 0) -> tuple[list[str], int]:
  """(files relative to `path`, sorted; their spatial rank) of an --input folder.

  ndim 2 takes the images (*.png, *.jpg, ...), 3 the NIfTI volumes (*.nii, *.nii.gz),
  0 whichever kind the folder holds (a folder holding both is an error).
  """
  found = sorted(os.path.relpath(os.path.join(d, f), path)
                 for d, _, names in os.walk(path) for f in names if not f.startswith("."))
  images, volumes = [f for f in found if _is_image(f)], [f for f in found if _is_nifti(f)]
  if ndim == 0 and images and volumes:
    raise DataError(f"{path} holds both images ({images[0]}, ...) and NIfTI volumes "
                    f"({volumes[0]}, ...): give --input a folder of one kind")
  if ndim == 3 or (ndim == 0 and volumes):
    if not volumes:
      raise DataError(f"no NIfTI volumes under {path} (looked for "
                      f"{' and '.join('*' + e for e in NIFTI_EXTS)}; the model scores "
                      "3-D volumes): check --input")
    return volumes, 3
  if not images:
    raise DataError(f"no images under {path} (looked for "
                    f"{', '.join('*' + e for e in pixels.IMAGE_EXTS)}): check --input")
  return images, 2


def unlabeled_source(path: str, ndim: int = 0) -> base.Source:
  """Images to score with no labels: a folder (searched recursively) or an .npz file.

  A folder is read file by file: images, or NIfTI volumes (D×H×W×1, `read_nifti`) when
  `ndim` is 3 or the folder holds only volumes. An .npz is read row by row (its
  `images` array, or its only `*_images` array). Ids are the paths relative to the
  folder, or `<array>/<row>`. Every image gets the class 'unlabeled', treated as normal.
  """
  if os.path.isdir(path):
    files, spatial_ndim = folder_files(path, ndim)
    read = read_nifti if spatial_ndim == 3 else pixels.decode_image
    reader = lambda i: (read(os.path.join(path, files[i])), None)
    ids, blocks = files, None
  elif path.endswith(".npz") and os.path.isfile(path):
    names = npz_lib.member_names(path)
    keys = [k for k in names if k == "images" or k.endswith("_images")]
    if len(keys) != 1:
      raise DataError(f"{path} must hold one image array named 'images' or "
                      f"'<split>_images' (its keys: {names}): check --input")
    images = npz_lib.NpzArray(path, keys[0])
    spatial_ndim = npz_arrays.spatial_rank(images.shape, ndim, f"npz:{path}")
    read_row = npz_arrays.image_reader(images, spatial_ndim, f"npz:{path}")
    reader = lambda i: (read_row(i), None)
    blocks = npz_arrays.image_blocks(images, spatial_ndim)
    ids = [f"{keys[0]}/{i}" for i in range(len(images))]
  else:
    raise DataError(f"--input={path!r} is neither a folder of images or NIfTI volumes "
                    "nor an .npz file")
  return base.Source(
      name=f"input:{path}", class_names=("unlabeled",), labels=np.zeros(len(ids), np.int32),
      ids=base.str_array(ids), groups=None, has_masks=False, spatial_ndim=spatial_ndim,
      reader=reader, from_files=os.path.isdir(path), blocks=blocks)
