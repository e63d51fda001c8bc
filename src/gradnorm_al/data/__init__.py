"""Dataset readers behind one registry: ``load_dataset(name, root, download)``."""

from . import brain_mri, digits, folders, idx, mask_folders, vision  # noqa: F401  (readers)
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
