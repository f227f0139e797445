"""The folder source: image folders in the Kermany OCT2017 layout, ROOT/<split>/<class>/.

Class names are the class folders of every split the config names, sorted (by value
when all are integers: '0', '1', ..., '10'), so a label means the same class in each
split. When ROOT/<split>/masks/ exists, masks are read
from masks/<class>/<image stem>.<ext>, and an image without one gets an all-zero mask
(a healthy image has no lesion).
"""

import os

from jaxad.data.sources import base, pixels, walk

LAYOUT = walk.Layout(
    root_name="image folder", items="images",
    looked_for=", ".join("*" + e for e in pixels.IMAGE_EXTS),
    matches=lambda f: os.path.splitext(f)[1].lower() in pixels.IMAGE_EXTS,
    stem=lambda f: os.path.splitext(f)[0], list_splits=True)


def load(data, split: str, key: str) -> base.Source:
  """ROOT/<split>/<class>/*.{png,jpg,tif,...} as 2D images, ROOT = data.path."""
  return walk.load(data, split, key, LAYOUT, "folder", 2, pixels.decode_image,
                   pixels.read_mask)
