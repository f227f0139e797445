"""Input complexity (Serrà et al., ICLR 2020): an image's length under a lossless coder.

Likelihood models give simple images (a thin "1", a dark and smooth X-ray) a high
likelihood whatever their class, so −log p(x) ranks them as normal. Serrà et al.
subtract the image's complexity L(x), its length in bits under a generic lossless
compressor, from the negative log-likelihood:

  S(x) = −log₂ p(x) − L(x),   here per dimension: bpd(x) − L(x)/D,

a likelihood ratio against a generic image model: an image counts as anomalous when
the trained model explains it no better than a compressor does. Their best coder was
FLIF; its successor, JPEG XL's lossless (modular) mode, is `jpegxl` here, through
imagecodecs' binding of libjxl (maintained; there is no maintained FLIF binding).
`png` is the PNG file written by Pillow at the image's bit depth (libpng through
imagecodecs for 16-bit colour, which Pillow cannot write). Both lengths include the
files' few bytes of header, the same for every image of one size.

Images are coded as the model sees them (resized, in [-1, 1]) after rounding back to
`bit_depth` bits per value, so L(x) and the model's bits per dimension describe the
same discrete image. `ComplexityPool` codes batches on host threads while the
accelerator scores them.
"""

import concurrent.futures
import io
import os

import numpy as np

CODERS = ("jpegxl", "png")  # the first gives the `*_complexity` scores
JPEGXL_EFFORT = 7  # libjxl's default speed/size trade-off


def length_name(coder: str) -> str:
  """The score holding L(x)/D under `coder`: jpegxl_bpd, png_bpd."""
  return f"{coder}_bpd"


def corrected_name(likelihood_score: str, coder: str) -> str:
  """vae_complexity (JPEG XL), vae_complexity_png, ..."""
  suffix = "" if coder == CODERS[0] else f"_{coder}"
  return f"{likelihood_score}_complexity{suffix}"


def check_bit_depth(bit_depth) -> int:
  if isinstance(bit_depth, bool) or not isinstance(bit_depth, int) or not 1 <= bit_depth <= 16:
    raise ValueError(f"bit_depth must be an int in 1..16 (8 for PNG/JPEG/uint8 data, 16 for "
                     f"16-bit, 12 for 12-bit CT); got {bit_depth!r}")
  return bit_depth


def quantize(images: np.ndarray, bit_depth: int) -> np.ndarray:
  """[-1, 1] floats → integers 0..2^bit_depth − 1 (uint8 up to 8 bits, else uint16)."""
  top = 2 ** check_bit_depth(bit_depth) - 1
  k = np.rint((np.clip(np.asarray(images, np.float64), -1.0, 1.0) + 1.0) * (top / 2.0))
  return k.astype(np.uint8 if bit_depth <= 8 else np.uint16)


def as_planar_image(image: np.ndarray) -> np.ndarray:
  """One image (*spatial, C) as a 2D picture a coder takes: (H, W) grey or (H, W, 3).

  A volume (D, H, W, C) becomes its slices stacked, (D·H, W, C); channel counts other
  than 1 and 3 are laid side by side as one grey picture (H, W·C).
  """
  if image.ndim == 4:
    image = image.reshape(-1, *image.shape[2:])
  if image.ndim != 3:
    raise ValueError(f"expected one image (H, W, C) or volume (D, H, W, C); got shape "
                     f"{image.shape}")
  channels = image.shape[-1]
  if channels == 1:
    return image[..., 0]
  if channels == 3:
    return image
  return np.moveaxis(image, -1, 1).reshape(image.shape[0], -1)


def encode(picture: np.ndarray, coder: str, bit_depth: int) -> bytes:
  """`picture` (uint8/uint16, (H, W) or (H, W, 3)) coded losslessly by `coder`."""
  picture = np.ascontiguousarray(picture)
  if coder == "jpegxl":
    import imagecodecs
    return imagecodecs.jpegxl_encode(picture, lossless=True, effort=JPEGXL_EFFORT,
                                     bitspersample=bit_depth, numthreads=1)
  if coder == "png":
    if picture.dtype == np.uint16 and picture.ndim == 3:
      import imagecodecs  # Pillow writes 16-bit PNGs in grey only
      return imagecodecs.png_encode(picture, level=9)
    from PIL import Image
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG", compress_level=9)
    return buffer.getvalue()
  raise ValueError(f"unknown coder {coder!r}; use one of {CODERS}")


def complexity_bpd(images: np.ndarray, bit_depth: int, coder: str) -> np.ndarray:
  """L(x)/D in bits per dimension (B,) for a batch (B, *spatial, C) in [-1, 1]."""
  q = quantize(images, bit_depth)
  num_dims = int(np.prod(q.shape[1:]))
  return np.asarray([8 * len(encode(as_planar_image(x), coder, bit_depth)) / num_dims
                     for x in q], np.float64)


def lengths(images: np.ndarray, bit_depth: int) -> dict[str, np.ndarray]:
  """{jpegxl_bpd, png_bpd}: each image's length under every coder, bits per dim."""
  return {length_name(c): complexity_bpd(images, bit_depth, c) for c in CODERS}


def score_names(likelihood_scores) -> tuple[str, ...]:
  """The names `corrected_scores` adds for these likelihood scores."""
  return tuple(length_name(c) for c in CODERS) + tuple(
      corrected_name(k, c) for k in likelihood_scores for c in CODERS)


def corrected_scores(model_bpd: dict[str, np.ndarray],
                     code_lengths: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """S = bpd − L/D for every likelihood score and coder, and the lengths themselves.

  model_bpd: {vae: ..., iwae: ...} in bits per dimension of the discrete image (see the
  families' `likelihood_bpd`); code_lengths: from `lengths`.
  """
  out = dict(code_lengths)
  for name, bpd in model_bpd.items():
    for coder in CODERS:
      out[corrected_name(name, coder)] = np.asarray(bpd, np.float64) - \
          code_lengths[length_name(coder)]
  return out


class ComplexityPool:
  """Codes image batches on host threads, beside the device work of the eval loop.

  `submit(images)` returns a future of `lengths(images, bit_depth)`, images coded in
  parallel. libjxl, libpng and zlib release the GIL while they code.
  """

  def __init__(self, bit_depth: int, threads: int = 0):
    self.bit_depth = check_bit_depth(bit_depth)
    self._pool = concurrent.futures.ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1))

  names = tuple(length_name(c) for c in CODERS)

  def submit(self, images: np.ndarray) -> "concurrent.futures.Future":
    images = np.array(images, copy=True)  # the caller may reuse its buffer
    chunks = [self._pool.submit(lengths, part, self.bit_depth)
              for part in np.array_split(images, max(1, min(len(images), 8)))
              if len(part)]
    return _Joined(chunks)

  def close(self, wait: bool = True) -> None:
    """Frees the threads; with wait=False once the work already submitted is done."""
    self._pool.shutdown(wait=wait)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class _Joined:
  """The chunks' results, concatenated in order, as one future-like `result()`."""

  def __init__(self, chunks):
    self._chunks = chunks

  def result(self) -> dict[str, np.ndarray]:
    parts = [c.result() for c in self._chunks]
    if not parts:
      return {length_name(c): np.zeros(0) for c in CODERS}
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
