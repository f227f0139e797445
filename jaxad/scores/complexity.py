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
accelerator scores them; given a `cache_dir`, it codes each image once across runs
(`complexity_cache`: keyed by the quantised image and the coder settings) and counts
its own throughput (`stats`), which the eval binary reports beside the device's.
"""

import concurrent.futures
import io
import os
import threading
import time

import numpy as np

from jaxad.scores import complexity_cache

CODERS = ("jpegxl", "png")  # the first gives the `*_complexity` scores
JPEGXL_EFFORT = 7  # libjxl's default speed/size trade-off
PNG_LEVEL = 9  # zlib's smallest
LAYOUT = 1  # bump when `quantize` or `as_planar_image` change what is coded (cache key)


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
      return imagecodecs.png_encode(picture, level=PNG_LEVEL)
    from PIL import Image
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG", compress_level=PNG_LEVEL)
    return buffer.getvalue()
  raise ValueError(f"unknown coder {coder!r}; use one of {CODERS}")


def coder_settings(coder: str, bit_depth: int) -> dict:
  """Everything `encode` depends on besides the image: the code-length cache's key."""
  import imagecodecs
  settings = {"coder": coder, "bit_depth": check_bit_depth(bit_depth), "layout": LAYOUT,
              "imagecodecs": imagecodecs.__version__}
  if coder == "jpegxl":
    return {**settings, "effort": JPEGXL_EFFORT, "libjxl": imagecodecs.jpegxl_version()}
  if coder == "png":
    import PIL
    from PIL import features
    return {**settings, "level": PNG_LEVEL, "pillow": PIL.__version__,
            "zlib": features.version("zlib"), "libpng": imagecodecs.png_version()}
  raise ValueError(f"unknown coder {coder!r}; use one of {CODERS}")


def to_bpd(nbytes, num_dims: int) -> np.ndarray:
  """Code lengths in bytes → bits per dimension, float64 (B,)."""
  return np.asarray([8 * int(n) / num_dims for n in nbytes], np.float64)


def complexity_bpd(images: np.ndarray, bit_depth: int, coder: str) -> np.ndarray:
  """L(x)/D in bits per dimension (B,) for a batch (B, *spatial, C) in [-1, 1]."""
  q = quantize(images, bit_depth)
  return to_bpd([len(encode(as_planar_image(x), coder, bit_depth)) for x in q],
                int(np.prod(q.shape[1:])))


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
  parallel (libjxl, libpng and zlib release the GIL while they code). With `cache_dir`
  each image's lengths are looked up first (`complexity_cache`) and only the misses
  are coded, the result the same bit for bit: a batch seen before codes nothing.
  `stats()` counts images, cache hits and the coder's time.
  """

  names = tuple(length_name(c) for c in CODERS)

  def __init__(self, bit_depth: int, threads: int = 0, cache_dir: str | None = None):
    self.bit_depth = check_bit_depth(bit_depth)
    self.cache_dir = cache_dir
    self._caches = {} if cache_dir is None else {
        c: complexity_cache.LengthCache(cache_dir, coder_settings(c, self.bit_depth))
        for c in CODERS}
    self._clock = _Clock()
    self._pool = concurrent.futures.ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1))

  def submit(self, images: np.ndarray) -> "_Joined":
    images = np.array(images, copy=True)  # the caller may reuse its buffer
    parts = [part for part in np.array_split(images, max(1, min(len(images), 8)))
             if len(part)]
    batch = _NewLengths(len(parts), self._caches)
    self._clock.add(images=len(images))
    return _Joined([self._pool.submit(self._lengths, part, batch) for part in parts])

  def _lengths(self, part: np.ndarray, batch: "_NewLengths") -> dict[str, np.ndarray]:
    """`lengths(part, bit_depth)`: cached lengths looked up, the others coded."""
    q = quantize(part, self.bit_depth)
    keys = complexity_cache.digests(q) if self._caches else None
    out, new, coded = {}, {}, np.zeros(len(q), bool)
    try:
      for coder in CODERS:
        nbytes = self._caches[coder].get(keys) if keys else [None] * len(q)
        todo = [i for i, n in enumerate(nbytes) if n is None]
        if todo:
          with self._clock.busy():
            for i in todo:
              nbytes[i] = len(encode(as_planar_image(q[i]), coder, self.bit_depth))
          coded[todo] = True
          if keys:
            new[coder] = ([keys[i] for i in todo], [nbytes[i] for i in todo])
        self._clock.add(encodes=len(todo))
        out[length_name(coder)] = to_bpd(nbytes, int(np.prod(q.shape[1:])))
      self._clock.add(coded=int(coded.sum()), cached=int((~coded).sum()))
      return out
    finally:
      batch.done(new)

  def stats(self) -> dict:
    """images (submitted), cached (every length a cache hit), coded (the others),
    encodes (image × coder codings), coder_busy_s (summed over threads), coder_wall_s
    (time any thread was coding) and images_per_s (coded / coder_wall_s; NaN when
    nothing was coded). Counts finished batches; exact after `close()`."""
    return self._clock.stats()

  def close(self, wait: bool = True) -> None:
    """Frees the threads; with wait=False once the work already submitted is done."""
    self._pool.shutdown(wait=wait)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class _Clock:
  """The pool's counts and coder time: busy summed over threads, wall the union of
  the intervals in which any thread was coding."""

  def __init__(self):
    self._lock = threading.Lock()
    self._counts = dict(images=0, cached=0, coded=0, encodes=0)
    self._busy = self._wall = 0.0
    self._active, self._since = 0, 0.0

  def add(self, **counts) -> None:
    with self._lock:
      for k, n in counts.items():
        self._counts[k] += n

  def busy(self) -> "_Busy":
    return _Busy(self)

  def start(self) -> float:
    with self._lock:
      now = time.perf_counter()
      if self._active == 0:
        self._since = now
      self._active += 1
      return now

  def stop(self, started: float) -> None:
    with self._lock:
      now = time.perf_counter()
      self._busy += now - started
      self._active -= 1
      if self._active == 0:
        self._wall += now - self._since

  def stats(self) -> dict:
    with self._lock:
      wall = self._wall
      return {**self._counts, "coder_busy_s": self._busy, "coder_wall_s": wall,
              "images_per_s": self._counts["coded"] / wall if wall > 0 else float("nan")}


class _Busy:
  """`with clock.busy():` times one thread's coding."""

  def __init__(self, clock: _Clock):
    self._clock = clock

  def __enter__(self):
    self._started = self._clock.start()

  def __exit__(self, *exc):
    self._clock.stop(self._started)


class _NewLengths:
  """The lengths one batch coded, written to the caches as one file per coder when
  its last part is done (also when a part failed: what was coded is still right)."""

  def __init__(self, num_parts: int, caches: dict):
    self._lock = threading.Lock()
    self._left, self._caches = num_parts, caches
    self._new = {c: ([], []) for c in caches}

  def done(self, new: dict) -> None:
    with self._lock:
      for coder, (keys, nbytes) in new.items():
        self._new[coder][0].extend(keys)
        self._new[coder][1].extend(nbytes)
      self._left -= 1
      last = self._left == 0
    if last:
      for coder, (keys, nbytes) in self._new.items():
        if keys:
          self._caches[coder].add(keys, nbytes)


class _Joined:
  """The chunks' results, concatenated in order, as one future-like `result()`."""

  def __init__(self, chunks):
    self._chunks = chunks

  def done(self) -> bool:
    return all(c.done() for c in self._chunks)

  def result(self) -> dict[str, np.ndarray]:
    parts = [c.result() for c in self._chunks]
    if not parts:
      return {length_name(c): np.zeros(0) for c in CODERS}
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
