"""Dataset readers behind one registry: ``load_dataset(name, root, download)``."""

from . import digits, folders, idx, subtomograms, vision  # noqa: F401  (register the readers)
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
