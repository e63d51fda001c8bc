"""Dataset readers behind one registry: ``load_dataset(name, root, download)``."""

from . import (  # noqa: F401  (register the readers)
    brain_mri,
    cityscapes,
    digits,
    folders,
    idx,
    mask_folders,
    subtomograms,
    vision,
)
from .base import DATASETS, DatasetBundle, check_labels, load_dataset, tensor_dataset
from .batching import iter_batches

__all__ = [
    "DATASETS",
    "DatasetBundle",
    "check_labels",
    "iter_batches",
    "load_dataset",
    "tensor_dataset",
]
