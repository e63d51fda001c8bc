"""What every dataset reader returns, and the dataset registry."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from ..errors import DataError
from ..registry import Registry

#: the kinds of supervision a dataset can have (the task a run builds for it)
TASKS = ("classification", "segmentation")


@dataclass
class DatasetBundle:
    """A training pool and a test set, ready for the active-learning loop.

    ``train`` and ``train_eval`` hold the same samples in the same order (pool index i is
    sample i of both); ``train`` applies training augmentation (if any), ``train_eval`` does not
    and is what scoring and training accuracy see. Items are ``(image [C, H, W] float32, label)``.

    ``task`` is the kind of supervision: ``"classification"`` (a label is a class index;
    ``train_targets``/``test_targets`` hold them all) or ``"segmentation"`` (a label is a mask
    int64 [H, W] of class indices or ``ignore_index``; the targets may be None, the masks then
    being read from the items, one at a time). ``augment`` is a joint augmentation of a training
    batch ``(inputs, labels, generator) -> (inputs, labels)`` for labels that move with the
    pixels (random crops and flips of images and masks together,
    :class:`~gradnorm_al.data.augment.RandomCropFlip`); dense datasets use it instead of
    augmenting ``train``'s items, whose masks are not the labels the learner trains on.
    """

    name: str
    train: Dataset
    train_eval: Dataset
    test: Dataset
    train_targets: np.ndarray | None  # int64 [N_pool] (segmentation: masks [N, H, W] or None)
    test_targets: np.ndarray | None  # int64 [N_test] (segmentation: as train_targets)
    num_classes: int
    in_channels: int
    image_size: tuple[int, ...]  # (H, W), or (D, H, W) for volumes
    default_model: str
    task: str = "classification"
    ignore_index: int = 255  # segmentation: the mask value of unlabelled pixels
    augment: Callable[..., Any] | None = None
    class_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise DataError(f"{self.name}: unknown task {self.task!r}; use one of {TASKS}")
        if len(self.train_eval) != len(self.train):
            raise DataError(f"{self.name}: the two training views differ in length")
        if self.task == "classification":
            if self.train_targets is None or self.test_targets is None:
                raise DataError(f"{self.name}: a classification dataset needs its targets")
            check_labels(self.train_targets, self.num_classes, f"{self.name} training labels")
            check_labels(self.test_targets, self.num_classes, f"{self.name} test labels")
        for what, data, targets in (
            ("training", self.train, self.train_targets),
            ("test", self.test, self.test_targets),
        ):
            if targets is not None and len(targets) != len(data):
                raise DataError(f"{self.name}: the {what} set and its targets differ in length")

    @property
    def dense(self) -> bool:
        """Whether labels are per pixel (segmentation)."""
        return self.task != "classification"

    @property
    def pool_size(self) -> int:
        return len(self.train_eval)

    def with_pool_subset(self, size: int, rng: np.random.Generator) -> DatasetBundle:
        """The same data with a random pool of ``size`` training samples (test set unchanged);
        pool index i of the result is training sample ``indices[i]`` (sorted)."""
        if not 1 <= size <= self.pool_size:
            raise DataError(
                f"{self.name}: pool size {size} is not between 1 and the {self.pool_size} "
                "training samples; lower --pool-size"
            )
        if size == self.pool_size:
            return self
        idx = np.sort(rng.choice(self.pool_size, size=size, replace=False))
        return dataclasses.replace(
            self,
            name=f"{self.name}[pool {size}]",
            train=Subset(self.train, idx.tolist()),
            train_eval=Subset(self.train_eval, idx.tolist()),
            train_targets=None if self.train_targets is None else self.train_targets[idx],
        )


def check_labels(targets: np.ndarray, num_classes: int, what: str) -> None:
    """Raise :class:`DataError` unless every label is an integer in [0, num_classes)."""
    targets = np.asarray(targets)
    if targets.ndim != 1:
        raise DataError(f"{what}: expected a 1-D array of class indices, got shape {targets.shape}")
    if targets.size and not np.issubdtype(targets.dtype, np.integer):
        raise DataError(f"{what}: labels must be integers, got dtype {targets.dtype}")
    if targets.size and (targets.min() < 0 or targets.max() >= num_classes):
        bad = targets[(targets < 0) | (targets >= num_classes)]
        raise DataError(
            f"{what}: label {int(bad[0])} is out of range [0, {num_classes}) "
            f"({bad.size} such labels); fix the labels or the number of classes"
        )


def mask_value_problem(mask: np.ndarray, num_classes: int, ignore_index: int) -> str | None:
    """What is wrong with the values of a class-index mask (None: every value is a class in
    [0, num_classes) or the ignore index)."""
    bad = (mask != ignore_index) & ((mask < 0) | (mask >= num_classes))
    if not bad.any():
        return None
    values = np.unique(mask[bad])
    return (
        f"value {int(values[0])} is neither a class in [0, {num_classes}) nor the ignore index "
        f"{ignore_index} ({int(bad.sum())} such pixels; values "
        f"{', '.join(str(int(v)) for v in values[:5])})"
    )


def tensor_dataset(images: np.ndarray | torch.Tensor, targets: np.ndarray) -> TensorDataset:
    """A :class:`TensorDataset` of float32 images [N, C, H, W] and int64 labels."""
    x = torch.as_tensor(images, dtype=torch.float32)
    y = torch.as_tensor(np.asarray(targets), dtype=torch.int64)
    return TensorDataset(x, y)


Loader = Callable[[Path | None, bool], DatasetBundle]
DATASETS: Registry[Loader] = Registry("dataset")


def load_dataset(
    name: str, root: str | Path | None = None, download: bool = False
) -> DatasetBundle:
    """Load the dataset registered as ``name``.

    ``root`` is where its files are (or go, with ``download=True``). Raises
    :class:`~gradnorm_al.errors.UnknownNameError` for an unknown name and
    :class:`~gradnorm_al.errors.DataError` when the files are missing or malformed.
    """
    loader = DATASETS.get(name)
    return loader(Path(root).expanduser() if root is not None else None, download)
