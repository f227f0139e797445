"""What `jaxad.predict` shows a reader: heat-map overlays, NIfTI maps, a summary page.

An overlay is the model's input image (grey: the channel mean of RGB, else the first
channel, so colours do not compete with the heat map) with the pixel map blended over it
as a semi-transparent heat map (`COLORMAP`; opacity grows with the value, so low values
leave the image visible) and, when the map has a threshold, the outline of the pixels at
or above it (`CONTOUR_RGB`). The colour scale is [0, 2 × threshold] when there is a
threshold (the outline sits mid-scale, and overlays compare across images), else
[0, the image's own maximum]. Overlays are drawn in NumPy (no figure per image) at the
model's resolution, upscaled by a whole factor to at least `MIN_SIDE` pixels.

Volumes get their map as NIfTI (`write_nifti`, the model's D×H×W resolution stored as
x, y, z like `jaxad.data.sources.read_nifti` reads it) with an affine that places it on
the input volume (`resized_affine`), and an overlay of their most anomalous slice.

Every file is written atomically (`jaxad.files`); the summary page is one self-contained
HTML file (inline CSS, thumbnails as data URIs).
"""

import base64
import gzip
import html
import io
import math

import matplotlib
import numpy as np
from PIL import Image

from jaxad import files
from jaxad.errors import ConfigError, DataError

MIN_SIDE = 256  # overlays are upscaled (nearest neighbour) to at least this many pixels
THUMB_SIDE = 128  # summary thumbnails are at most this many pixels a side
ALPHA = 0.6  # heat-map opacity at the top of the colour scale
COLORMAP = "inferno"
CONTOUR_RGB = (0, 255, 255)  # the outline of the pixels at or above the map's threshold


def _plane(image: np.ndarray) -> np.ndarray:
  """(H, W) grey in [0, 1] from an (H, W, C) image in [-1, 1] (see the module doc)."""
  image = np.asarray(image, np.float32)
  if image.ndim != 3:
    raise DataError(f"an overlay needs one (H, W, C) image; got shape {image.shape}")
  plane = image.mean(axis=-1) if image.shape[-1] == 3 else image[..., 0]
  return np.clip((plane + 1.0) / 2.0, 0.0, 1.0)


def image_rgb(image: np.ndarray) -> np.ndarray:
  """uint8 (H, W, 3) of an (H, W, C) image in [-1, 1]: RGB as RGB, else grey."""
  image = np.asarray(image, np.float32)
  if image.ndim == 3 and image.shape[-1] == 3:
    rgb = np.clip((image + 1.0) / 2.0, 0.0, 1.0)
  else:
    rgb = np.repeat(_plane(image)[..., None], 3, axis=-1)
  return _to_uint8(rgb)


def _to_uint8(rgb: np.ndarray) -> np.ndarray:
  return (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def upscale_factor(shape: tuple[int, ...], min_side: int = MIN_SIDE) -> int:
  """The whole factor that brings the longer side of `shape` to at least `min_side`."""
  return max(1, math.ceil(min_side / max(shape[:2])))


def _upscale(x: np.ndarray, factor: int) -> np.ndarray:
  return np.repeat(np.repeat(x, factor, axis=0), factor, axis=1)


def contour(mask: np.ndarray) -> np.ndarray:
  """The pixels of a boolean (H, W) region with a 4-neighbour outside it (or the edge)."""
  padded = np.pad(np.asarray(mask, bool), 1)
  inner = (padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1]
           & padded[1:-1, :-2] & padded[1:-1, 2:])
  return padded[1:-1, 1:-1] & ~inner


def heat_range(heat: np.ndarray, threshold: float | None) -> tuple[float, float]:
  """The colour scale (lo, hi) of a map: [0, 2 × threshold], else [0, its maximum]."""
  lo = min(0.0, float(np.min(heat)))
  if threshold is not None and threshold > lo:
    return lo, lo + 2.0 * (threshold - lo)
  hi = float(np.max(heat))
  return lo, hi if hi > lo else lo + 1.0


def overlay(image: np.ndarray, heat: np.ndarray, *, threshold: float | None = None,
            factor: int | None = None) -> np.ndarray:
  """uint8 (H·f, W·f, 3): `heat` (H, W) over `image` (H, W, C in [-1, 1]), outlined at
  `threshold` when given; f = `upscale_factor` unless given."""
  heat = np.asarray(heat, np.float32)
  if heat.shape != np.shape(image)[:2]:
    raise DataError(f"a map of shape {heat.shape} cannot go over an image of shape "
                    f"{np.shape(image)}: one value per pixel is needed")
  factor = factor or upscale_factor(heat.shape)
  lo, hi = heat_range(heat, threshold)
  level = np.clip((heat - lo) / (hi - lo), 0.0, 1.0)
  color = np.asarray(matplotlib.colormaps[COLORMAP](level), np.float32)[..., :3]
  alpha = ALPHA * level[..., None]
  rgb = _to_uint8((1.0 - alpha) * _plane(image)[..., None] + alpha * color)
  rgb = _upscale(rgb, factor)
  if threshold is not None:
    rgb[contour(_upscale(heat >= threshold, factor))] = CONTOUR_RGB
  return rgb


def hottest_slice(volume_map: np.ndarray) -> int:
  """The slice (first axis) of a (D, H, W) map with the largest sum: the one to show."""
  v = np.asarray(volume_map, np.float64)
  return int(np.argmax(v.reshape(len(v), -1).sum(axis=1)))


def thumbnail(rgb: np.ndarray, max_side: int = THUMB_SIDE) -> np.ndarray:
  """`rgb` with every k-th pixel, k the smallest step that fits `max_side` (a copy)."""
  step = max(1, math.ceil(max(rgb.shape[:2]) / max_side))
  return np.ascontiguousarray(rgb[::step, ::step])


def png_bytes(rgb: np.ndarray) -> bytes:
  """A uint8 (H, W, 3) picture as PNG file bytes."""
  buffer = io.BytesIO()
  Image.fromarray(np.asarray(rgb, np.uint8)).save(buffer, format="PNG")
  return buffer.getvalue()


def write_png(path: str, rgb: np.ndarray) -> None:
  """Writes a uint8 (H, W, 3) picture as PNG, atomically."""
  data = png_bytes(rgb)
  with files.atomic_path(path) as tmp, open(tmp, "wb") as f:
    f.write(data)


def data_uri(rgb: np.ndarray) -> str:
  """A PNG data URI of `rgb`, for an <img> inside a self-contained page."""
  return "data:image/png;base64," + base64.b64encode(png_bytes(rgb)).decode("ascii")


def _nibabel():
  try:
    import nibabel  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ConfigError("writing the maps of volumes as NIfTI needs nibabel: pip install "
                      "'jaxad[nifti]' (or pip install nibabel), or pass --maps=none")\
        from None
  return nibabel


def nifti_geometry(path: str) -> tuple[np.ndarray, tuple[int, int, int]]:
  """(affine, (x, y, z) shape) of a NIfTI file, from its header alone."""
  try:
    image = _nibabel().load(path)
    return np.asarray(image.affine, np.float64), tuple(int(s) for s in image.shape[:3])
  except ConfigError:
    raise
  except Exception as e:  # nibabel raises many kinds on a corrupt file
    raise DataError(f"cannot read the NIfTI header of {path} ({e}); remove or replace "
                    "the file") from None


def resized_affine(affine: np.ndarray, shape: tuple[int, ...],
                   new_shape: tuple[int, ...]) -> np.ndarray:
  """The affine of a volume of `shape` (x, y, z) resized to `new_shape` (half-pixel
  centres, as tf.image.resize): new voxel i sits at old index (i + ½)·s − ½, s the
  old/new size ratio per axis."""
  s = np.asarray(shape[:3], np.float64) / np.asarray(new_shape[:3], np.float64)
  scale = np.eye(4)
  scale[:3, :3] = np.diag(s)
  scale[:3, 3] = (s - 1.0) / 2.0
  return np.asarray(affine, np.float64) @ scale


def nifti_bytes(volume: np.ndarray, affine: np.ndarray | None = None) -> bytes:
  """A gzipped NIfTI-1 file of a (D, H, W) map, stored as (x, y, z) = (W, H, D)."""
  volume = np.asarray(volume, np.float32)
  if volume.ndim != 3:
    raise DataError(f"a NIfTI map needs one (D, H, W) volume; got shape {volume.shape}")
  image = _nibabel().Nifti1Image(np.ascontiguousarray(volume.transpose(2, 1, 0)),
                                 np.eye(4) if affine is None else affine)
  return gzip.compress(image.to_bytes(), compresslevel=6, mtime=0)


def write_nifti(path: str, volume: np.ndarray, affine: np.ndarray | None = None) -> None:
  """Writes a (D, H, W) map as a .nii.gz file, atomically (see `nifti_bytes`)."""
  data = nifti_bytes(volume, affine)
  with files.atomic_path(path) as tmp, open(tmp, "wb") as f:
    f.write(data)


_CSS = """
body{font-family:system-ui,Helvetica,Arial,sans-serif;margin:1.5em auto;max-width:1280px;
  padding:0 1em;color:#222}
h1{font-size:1.5em}table{border-collapse:collapse;font-size:.9em}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:middle}
th{background:#f2f2f2}td.num{text-align:right;font-variant-numeric:tabular-nums}
img{image-rendering:pixelated;width:128px}.yes{color:#b00;font-weight:600}
"""


def _summary_row(row: dict) -> str:
  """One table row: rank, id, score, label, image and overlay thumbnails."""
  label = row["pred_label"]
  cells = [f'<td class="num">{row["rank"]}</td>', f"<td>{html.escape(row['id'])}</td>",
           f'<td class="num">{row["score"]:.6g}</td>',
           f'<td class="{"yes" if label == 1 else ""}">{html.escape(str(label))}</td>',
           f'<td><img alt="image" src="{data_uri(row["image"])}"></td>']
  if row.get("overlay") is not None:
    picture = f'<img alt="overlay" src="{data_uri(row["overlay"])}">'
    if row.get("link"):
      picture = f'<a href="{html.escape(row["link"])}">{picture}</a>'
    note = f"<br>{html.escape(row['note'])}" if row.get("note") else ""
    cells.append(f"<td>{picture}{note}</td>")
  return "<tr>" + "".join(cells) + "</tr>"


def summary_page(*, title: str, facts: list[str], score_name: str, rows: list[dict],
                 map_name: str | None) -> str:
  """The summary page: `facts` as a list, then `rows` (most anomalous first): dicts
  with rank, id, score, pred_label, image (uint8 RGB) and, with a map, overlay, link
  and note."""
  head = ["#", "id", html.escape(score_name), "pred_label", "image"]
  if map_name is not None:
    head.append(f"{html.escape(map_name)} overlay")
  table = ("<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>\n"
           + "\n".join(_summary_row(r) for r in rows) + "</table>")
  items = "".join(f"<li>{html.escape(f)}</li>" for f in facts)
  return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>"
          f"{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
          f"<h1>{html.escape(title)}</h1>\n<ul>{items}</ul>\n"
          f"<h2>The {len(rows)} most anomalous images by {html.escape(score_name)}</h2>\n"
          f"{table}\n</body></html>\n")


def write_summary(path: str, **page) -> None:
  """Writes `summary_page(**page)` atomically."""
  files.write_text(path, summary_page(**page))
