"""Data sources: one split of a dataset as metadata in memory and pixels read by index.

A `Source` holds labels, ids and groups for every example of a split, and a `reader`
that decodes example `i` on demand; the tf.data pipeline calls `Source.read` inside
`tf.numpy_function`, then resizes and scales. Sources do neither: `read` returns pixels
in their stored dtype, always one of uint8, uint16 or float32 (float values as stored;
the pipeline maps the dtype's range, float 0..1, unless data.intensity_range says
otherwise), with a trailing channel axis (H×W×C for images, D×H×W×1 for volumes), and
masks as uint8 in {0, 1} with one channel. Pixel values (finite, float in [0, 1]) are
checked by the pipeline, which knows data.intensity; sources with in-memory float
arrays offer them whole (`Source.blocks`) so that check is one vectorised pass.

Classes, one rule for every source: `class_names[i]` names label i. Sources that derive
names from the data (CSV label values, class folders of folder and nifti) sort them by
integer value when every name is an integer ('0', '1', ..., '10', '11'), else as plain
strings (`base.sorted_class_names`); npz and tfds without stored names use '0'..'K-1'.
A class selector (data.normal_classes / data.anomalous_classes, `resolve_classes`) that
is a class name selects that class, given as str or int (9 and '9' both select '9');
any other int is an index into class_names.

Sources by `data.source` (`registry`), one module each: tfds, folder
(`ROOT/<split>/<class>/*.png`), nifti (the same layout with one `.nii`/`.nii.gz` volume
per file; both walk folders with `walk`), csv (`csv_table`: ISIC 2018), npz
(`npz_arrays`: MedMNIST), digits (scikit-learn 8×8 digits) and synthetic (smooth fields
with bright elliptic lesions, for tests). `base` holds the Source and the split and
class helpers, `pixels` decoding, dtypes and masks, `unlabeled` the eval binary's
unlabeled inputs.
"""

from jaxad.data.sources.base import (ROLES, VAL_SEED, Blocks, Reader, Source,
                                     held_out_indices, resolve_classes,
                                     sorted_class_names)
from jaxad.data.sources.digits import DIGITS_FRACTIONS
from jaxad.data.sources.nifti import NIFTI_EXTS, read_nifti
from jaxad.data.sources.pixels import IMAGE_EXTS, decode_image
from jaxad.data.sources.registry import NAMES, get_source
from jaxad.data.sources.synthetic import SYNTHETIC_SPLITS
from jaxad.data.sources.synthetic import example as _synthetic_example  # for tests
from jaxad.data.sources.unlabeled import unlabeled_source
from jaxad.data.sources.walk import MASKS_FOLDER

__all__ = [
    "Blocks", "DIGITS_FRACTIONS", "IMAGE_EXTS", "MASKS_FOLDER", "NAMES", "NIFTI_EXTS",
    "ROLES", "Reader", "SYNTHETIC_SPLITS", "Source", "VAL_SEED", "decode_image",
    "get_source", "held_out_indices", "read_nifti", "resolve_classes",
    "sorted_class_names", "unlabeled_source",
]
