"""The tfds source: a TensorFlow Datasets split, decoded into memory once.

Fine for MNIST-scale image-classification sets (the whole split is held as one array);
larger datasets should be exported to a folder or an npz file. tensorflow_datasets is
imported only when this source is used (it is slow to import).
"""

import re

import numpy as np

from jaxad.data.sources import base, pixels
from jaxad.errors import DataError


def load(data, split: str, key: str) -> base.Source:
  """Split `split` of the tfds dataset data.name (data.image_key, data.label_key)."""
  import tensorflow_datasets as tfds  # slow import: only when used

  name, data_dir = data.get("name", ""), data.get("data_dir", "") or None
  image_key, label_key = data.get("image_key", "image"), data.get("label_key", "label")
  builder = _builder(tfds, name, data_dir)
  known = list(builder.info.splits)
  unknown = [s for s in _split_bases(split) if s != "all" and s not in known]
  if known and unknown:
    raise DataError(f"tfds dataset {name!r} has no split {unknown[0]!r} (in {split!r}); "
                    f"its splits are {known}: {base.split_hint(key)}")
  features = builder.info.features
  for k, what in ((image_key, "data.image_key"), (label_key, "data.label_key")):
    if k not in features:
      raise DataError(f"tfds dataset {name!r} has no feature {k!r}; its features are "
                      f"{sorted(features.keys())}: set {what}")
  try:
    ds = builder.as_dataset(split=split, shuffle_files=False)
  except Exception as e:
    raise DataError(f"cannot read split {split!r} of tfds dataset {name!r} "
                    f"({base.first_line(e)}); splits: {known}: "
                    f"{base.split_hint(key)}") from None
  images, labels, spatial_ndim = _arrays(tfds, ds, image_key, label_key, name)
  label_feature = features[label_key]
  if hasattr(label_feature, "names"):
    class_names = tuple(label_feature.names)
  else:
    class_names = tuple(str(i) for i in range(int(labels.max(initial=-1)) + 1))
  blocks = None
  if isinstance(images, np.ndarray) and images.dtype.kind == "f":  # for the pixel check
    blocks = lambda: iter([(np.arange(len(images)), images)])
  return base.Source(
      name=f"tfds:{name}[{split}]", class_names=class_names, labels=labels,
      ids=base.example_ids(split, len(labels)), groups=None, has_masks=False,
      spatial_ndim=spatial_ndim, reader=lambda i: (images[i], None), blocks=blocks)


def _builder(tfds, name: str, data_dir: str | None):
  """The prepared builder for `name`, downloading it if tfds can."""
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:
    raise DataError(
        f"unknown tfds dataset {name!r} (tfds.builder({name!r}) failed: "
        f"{base.first_line(e)}): check data.name (`tfds.list_builders()` lists the "
        f"names); run `tfds build {name}` or set data.data_dir to a folder holding "
        "it") from None
  try:
    builder.download_and_prepare()
  except Exception as e:
    raise DataError(
        f"cannot download or prepare tfds dataset {name!r} into "
        f"{data_dir or 'the default tfds data_dir'} ({base.first_line(e)}): run "
        f"`tfds build {name}` where there is internet access and set data.data_dir "
        "to the folder it wrote") from None
  return builder


def _split_bases(split: str) -> list[str]:
  """'train[:90%]+test' → ['train', 'test']."""
  return [re.sub(r"\[.*\]$", "", s).strip() for s in split.split("+")]


def _arrays(tfds, ds, image_key: str, label_key: str, name: str):
  """Images (one array, or a list if sizes vary), int32 labels and spatial_ndim.

  Batches of 4096 rather than tfds's batch_size=-1, which needs the split size in the
  dataset info (absent under tfds.testing.mock_data, where it crashes).
  """
  spec = ds.element_spec[image_key]
  rank = spec.shape.rank
  if rank not in (2, 3, 4):
    raise DataError(f"tfds dataset {name!r}: feature {image_key!r} has rank {rank}; "
                    "expected H×W, H×W×C or D×H×W×C: check data.image_key")
  ds = ds.map(lambda ex: (ex[image_key], ex[label_key]))
  if spec.shape.is_fully_defined():
    parts = list(tfds.as_numpy(ds.batch(4096)))
    images = (np.concatenate([p[0] for p in parts]) if parts
              else np.zeros((0, *spec.shape), spec.dtype.as_numpy_dtype))
    labels = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0)
  else:
    pairs = list(tfds.as_numpy(ds))
    images, labels = [p[0] for p in pairs], np.asarray([p[1] for p in pairs])
  what = f"tfds dataset {name!r}"
  if isinstance(images, list):
    images = [_image(pixels.standard_dtype(x, what), rank) for x in images]
  else:
    images = _image(pixels.standard_dtype(images, what), rank)
  return images, labels.astype(np.int32).reshape(-1), 2 if rank < 4 else 3


def _image(x: np.ndarray, rank: int) -> np.ndarray:
  """Adds the channel axis of H×W images and drops alpha (works batched too)."""
  if rank == 2:
    return x[..., None]
  if rank == 3 and x.shape[-1] == 4:
    return x[..., :3]  # drop alpha
  return x
