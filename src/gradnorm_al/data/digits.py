"""scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes): no download needed.

The images are read from the file scikit-learn ships (``sklearn/datasets/data/digits.csv.gz``,
what ``sklearn.datasets.load_digits`` reads) without importing scikit-learn: importing it and its
model selection takes ~1.3 s, paid by every process that loads digits (the tests start dozens).
The train/test split is shipped with the package (``digits_split.npz``): the one scikit-learn's
``train_test_split(range(1797), test_size=0.2, random_state=0, stratify=target)`` makes, frozen,
so it also stays the same across scikit-learn versions (a test compares the two).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from ..errors import DataError
from .base import DATASETS, DatasetBundle, tensor_dataset

#: the train/test split is fixed: stratified, 20% test, this seed (frozen in SPLIT_FILE)
SPLIT_SEED = 0
TEST_FRACTION = 0.2
SPLIT_FILE = Path(__file__).with_name("digits_split.npz")


def digits_file() -> Path:
    """Where scikit-learn's package holds the digits (found without importing it)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("digits: scikit-learn is not installed (pip install scikit-learn)")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        raise DataError(f"digits: {path} is missing; reinstall scikit-learn")
    return path


def read_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images float64 [1797, 8, 8] with values 0..16, targets int64 [1797]), as
    ``sklearn.datasets.load_digits`` returns them."""
    path = digits_file()
    try:
        data = np.loadtxt(path, delimiter=",")
    except (OSError, ValueError, EOFError) as err:
        raise DataError(f"digits: cannot read {path} ({err}); reinstall scikit-learn") from err
    if data.shape != (1797, 65):
        raise DataError(f"digits: {path} holds {data.shape}, not 1797 rows of 64 pixels + label")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)


@DATASETS.register("digits")
def load_digits(root: Path | None = None, download: bool = False) -> DatasetBundle:
    pixels, targets = read_digits()
    # pixel values are 0..16; scale to [0, 1] then standardise with the training-set statistics
    images = (pixels.astype(np.float32) / 16.0)[:, None, :, :]
    with np.load(SPLIT_FILE) as split:
        idx_train, idx_test = split["train"].astype(np.int64), split["test"].astype(np.int64)
    mean, std = images[idx_train].mean(), images[idx_train].std()
    images = (images - mean) / std
    train = tensor_dataset(images[idx_train], targets[idx_train])
    test = tensor_dataset(images[idx_test], targets[idx_test])
    return DatasetBundle(
        name="digits",
        train=train,
        train_eval=train,
        test=test,
        train_targets=targets[idx_train],
        test_targets=targets[idx_test],
        num_classes=10,
        in_channels=1,
        image_size=(8, 8),
        default_model="smallcnn",
    )
