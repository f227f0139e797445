"""The nifti source: brain-MRI volumes as their users keep them, ROOT/<split>/<class>/.

The folder source's layout (`walk`) with one .nii or .nii.gz volume per file; optional
masks ROOT/<split>/masks/<class>/<same stem>.nii[.gz], and a volume without one gets an
all-zero mask. nibabel is imported only when a volume is read.
"""

import numpy as np

from jaxad.data.sources import base, pixels, walk
from jaxad.errors import ConfigError, DataError

NIFTI_EXTS = (".nii", ".nii.gz")


def _stem(name: str) -> str:
  return name[:-len(".nii.gz")] if name.lower().endswith(".nii.gz") else name[:-len(".nii")]


LAYOUT = walk.Layout(
    root_name="NIfTI folder", items="NIfTI volumes", looked_for="*.nii and *.nii.gz",
    matches=lambda f: f.lower().endswith(NIFTI_EXTS), stem=_stem)


def read_nifti(path: str) -> np.ndarray:
  """A NIfTI volume as D×H×W×1 in its stored dtype (uint8, uint16 or float32).

  The file's (x, y, z) axes are reversed to (z, y, x) = D×H×W, so slicing D gives the
  axial slices of an RAS-oriented brain MRI; a trailing axis of length 1 (x, y, z, 1)
  is dropped. Intensity scaling in the header (scl_slope) gives float32. Integer
  volumes are served by their stored width, not their values (int16 → uint16 even for a
  dark scan whose values fit in uint8), so every file of a dataset maps intensities to
  [-1, 1] the same way.
  """
  try:
    import nibabel  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ConfigError("data.source='nifti' needs nibabel: pip install 'jaxad[nifti]' "
                      "(or pip install nibabel)") from None
  try:
    volume = np.asanyarray(nibabel.load(path).dataobj)
  except Exception as e:  # nibabel raises many kinds on a corrupt file
    raise DataError(f"cannot read NIfTI volume {path} ({base.first_line(e)}); remove or "
                    "replace the file") from None
  while volume.ndim > 3 and volume.shape[-1] == 1:  # (x, y, z, 1), as some tools save
    volume = volume[..., 0]
  if volume.ndim != 3:
    raise DataError(f"NIfTI file {path} has shape {volume.shape}: one 3-D volume per "
                    "file is expected (split 4-D series into one file per volume)")
  volume = np.ascontiguousarray(volume.transpose(2, 1, 0))
  value_range = lambda: (volume.min().item(), volume.max().item()) if volume.size else (0, 0)
  dtype = pixels.pixel_dtype(volume.dtype, value_range, f"NIfTI file {path}",
                             by_width=True)
  return pixels.as_pixels(volume, dtype)[..., None]


def load(data, split: str, key: str) -> base.Source:
  """ROOT/<split>/<class>/*.nii[.gz] as 3D volumes, ROOT = data.path."""
  return walk.load(data, split, key, LAYOUT, "nifti", 3, read_nifti, _read_mask)


def _read_mask(path: str, volume: np.ndarray, volume_path: str) -> np.ndarray:
  """The binary mask volume in `path`, checked against its volume's shape."""
  mask = pixels.binary_mask(read_nifti(path)[..., 0], 3)
  if mask.shape[:3] != volume.shape[:3]:
    raise DataError(f"mask {path} is {mask.shape[:3]} but volume {volume_path} "
                    f"is {volume.shape[:3]}: masks must match their volume")
  return mask
