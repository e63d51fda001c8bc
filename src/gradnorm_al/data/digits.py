"""scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes): no download needed."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import DATASETS, DatasetBundle, tensor_dataset

#: the train/test split is fixed: stratified, 20% test, this seed
SPLIT_SEED = 0
TEST_FRACTION = 0.2


@DATASETS.register("digits")
def load_digits(root: Path | None = None, download: bool = False) -> DatasetBundle:
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    # pixel values are 0..16; scale to [0, 1] then standardise with the training-set statistics
    images = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]
    targets = bunch.target.astype(np.int64)
    idx_train, idx_test = train_test_split(
        np.arange(len(targets)), test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=targets
    )
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
