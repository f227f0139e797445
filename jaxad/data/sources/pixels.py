"""Pixels as every source serves them: decoded files, three dtypes, binary masks.

Sources return pixels in their stored dtype (uint8, uint16 or float32) with a trailing
channel axis, and masks as uint8 in {0, 1}; the pipeline maps intensities by dtype, so
the rules that pick the dtype live here, once.
"""

from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from jaxad.data.sources.base import Reader
from jaxad.errors import DataError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


def decode_image(path: str) -> np.ndarray:
  """Decodes an image file to H×W×C in its stored dtype (uint8, uint16 or float32)."""
  try:
    with Image.open(path) as im:
      return _pil_to_array(im, path)
  except DataError:
    raise
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise DataError(f"cannot decode image {path} ({e}); remove or replace the "
                    "file") from None


def _pil_to_array(im: Image.Image, path: str) -> np.ndarray:
  """Grayscale stays 1 channel and 16-bit stays uint16; alpha is dropped."""
  mode = im.mode
  if mode.startswith("I;16"):
    return np.asarray(im).astype(np.uint16)[..., None]
  if mode == "I":
    x = np.asarray(im)
    if x.size and (x.min() < 0 or x.max() > 65535):
      raise DataError(f"image {path} is 32-bit integer with values in [{x.min()}, "
                      f"{x.max()}], outside 0..65535: save it as 16-bit or float32")
    return x.astype(np.uint16)[..., None]
  if mode == "F":
    return np.asarray(im, np.float32)[..., None]
  if mode in ("1", "L", "LA", "La"):
    return np.asarray(im.convert("L"), np.uint8)[..., None]
  return np.asarray(im.convert("RGB"), np.uint8)  # RGB, RGBA, P, CMYK, YCbCr, ...


def binary_mask(mask: np.ndarray, spatial_ndim: int) -> np.ndarray:
  """Any nonzero pixel (in any channel) → 1; returns uint8 spatial×1."""
  mask = np.asarray(mask)
  if mask.ndim == spatial_ndim + 1:
    mask = np.any(mask != 0, axis=-1)
  return (mask != 0).astype(np.uint8)[..., None]


def read_mask(path: str, image: np.ndarray, image_name: str) -> np.ndarray:
  """The binary mask in image file `path`, checked against its image's size."""
  mask = binary_mask(decode_image(path), 2)
  if mask.shape[:2] != image.shape[:2]:
    raise DataError(f"mask {path} is {mask.shape[0]}×{mask.shape[1]} but image "
                    f"{image_name} is {image.shape[0]}×{image.shape[1]}: masks must "
                    "match their image's size")
  return mask


def file_reader(paths: Sequence[str], mask_paths: Sequence[str | None] | None,
                read: Callable[[str], np.ndarray],
                read_mask_file: Callable[[str, np.ndarray, str], np.ndarray]) -> Reader:
  """i → (read(paths[i]), mask) for one-file-per-example sources.

  The mask is None without `mask_paths`, all zeros where an example has no mask file (a
  healthy image has no lesion), else read_mask_file(mask path, image, image path).
  """
  def reader(i):
    image = read(paths[i])
    if mask_paths is None:
      return image, None
    if mask_paths[i] is None:
      return image, np.zeros(image.shape[:-1] + (1,), np.uint8)
    return image, read_mask_file(mask_paths[i], image, paths[i])

  return reader


def standard_dtype(images: np.ndarray, what: str) -> np.ndarray:
  """In-memory pixel arrays → uint8, uint16 or float32 (integers by their range)."""
  value_range = lambda: (images.min().item(), images.max().item()) if images.size else (0, 0)
  return as_pixels(images, pixel_dtype(images.dtype, value_range, what))


def pixel_dtype(dtype, value_range: Callable[[], tuple], what: str, *,
                by_width: bool = False) -> np.dtype:
  """The dtype pixels are served in: uint8, uint16 or float32.

  Other integers go by the range of the whole array (so every image of it maps its
  intensities the same way), or with `by_width` (one file of many) by their width: 8
  bits → uint8, wider → uint16, after checking the values fit. `value_range()` gives
  (min, max) and is called only for integer dtypes other than uint8 and uint16.
  """
  dtype = np.dtype(dtype)
  if dtype == np.bool_ or (dtype.kind == "u" and dtype.itemsize == 1):
    return np.dtype(np.uint8)
  if dtype.kind == "u" and dtype.itemsize == 2:
    return np.dtype(np.uint16)
  if dtype.kind == "f":
    return np.dtype(np.float32)
  if dtype.kind in "iu":
    lo, hi = value_range()
    if by_width and lo >= 0 and hi <= (255 if dtype.itemsize == 1 else 65535):
      return np.dtype(np.uint8 if dtype.itemsize == 1 else np.uint16)
    if not by_width and lo >= 0 and hi <= 255:
      return np.dtype(np.uint8)
    if lo >= 0 and hi <= 65535:
      return np.dtype(np.uint16)
    raise DataError(f"{what} has {dtype} pixels in [{lo}, {hi}], outside 0..65535: "
                    "store them as uint16, or as float32 in [0, 1] (e.g. after a CT "
                    "window)")
  raise DataError(f"{what} has unsupported pixel dtype {dtype}: store uint8, uint16 "
                  "or float32 pixels")


def as_pixels(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
  """`x` in the dtype `pixel_dtype` chose; booleans become 0 / 255."""
  if x.dtype == np.bool_:
    return x.astype(np.uint8) * np.uint8(255)
  return x.astype(dtype, copy=False)
