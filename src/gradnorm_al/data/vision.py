"""CIFAR-10, CIFAR-100 and SVHN through torchvision's readers (files must be in ``root``).

The training pool gets the usual augmentation (random 32x32 crop of the 4-pixel padded image, plus a
horizontal flip for CIFAR only: flipped digits are not digits); ``train_eval`` and ``test`` are only
converted and normalised.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError
from .base import DATASETS, DatasetBundle


@dataclass(frozen=True)
class VisionSpec:
    """What distinguishes the three torchvision datasets."""

    name: str
    torchvision_class: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    flip: bool  # horizontal flips in training augmentation
    expected_files: str  # for the "not found" message
    base_folder: str | None = None  # the folder torchvision expects inside root, if any


CIFAR10 = VisionSpec(
    name="cifar10",
    torchvision_class="CIFAR10",
    num_classes=10,
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616),
    flip=True,
    expected_files="cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}",
    base_folder="cifar-10-batches-py",
)
CIFAR100 = VisionSpec(
    name="cifar100",
    torchvision_class="CIFAR100",
    num_classes=100,
    mean=(0.5071, 0.4865, 0.4409),
    std=(0.2673, 0.2564, 0.2762),
    flip=True,
    expected_files="cifar-100-python/{train, test, meta}",
    base_folder="cifar-100-python",
)
SVHN = VisionSpec(
    name="svhn",
    torchvision_class="SVHN",
    num_classes=10,
    mean=(0.4377, 0.4438, 0.4728),
    std=(0.1980, 0.2010, 0.1970),
    flip=False,
    expected_files="train_32x32.mat and test_32x32.mat",
)


class ToNormalisedTensor:
    """``ToTensor()`` then ``Normalize(mean, std)`` for 8-bit PIL images, in one cheaper step.

    Gives the same values as the torchvision pair at about 40% of its cost per image, which matters
    because the whole pool is converted every time it is scored.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self._stats = (tuple(mean), tuple(std))  # for repr
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, image: Any) -> torch.Tensor:
        array = np.array(image, dtype=np.uint8)  # a writable copy: torch refuses read-only arrays
        if array.ndim == 2:  # greyscale
            array = array[:, :, None]
        x = torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)
        return x.sub_(self.mean).div_(self.std)

    def __repr__(self) -> str:
        mean, std = self._stats
        return f"{type(self).__name__}(mean={mean}, std={std})"


def _transforms(spec: VisionSpec) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    """(training transform with augmentation, evaluation transform)."""
    from torchvision import transforms as T

    to_tensor = ToNormalisedTensor(spec.mean, spec.std)
    augment: list[Callable[[Any], Any]] = [T.RandomCrop(32, padding=4)]
    if spec.flip:
        augment.append(T.RandomHorizontalFlip())
    return T.Compose([*augment, to_tensor]), to_tensor


def _with_transform(dataset: Any, transform: Callable[[Any], Any]) -> Any:
    """A shallow copy of a torchvision dataset with another image transform.

    The copy shares the decoded image array with the original, so both views hold the same samples
    in the same order without reading the files twice or doubling memory.
    """
    from torchvision.datasets.vision import StandardTransform

    view = copy.copy(dataset)
    view.transform = transform
    view.transforms = StandardTransform(transform, dataset.target_transform)
    return view


def _open(spec: VisionSpec, root: Path, train: bool, download: bool, transform: Any) -> Any:
    """Construct the torchvision dataset, turning its errors into :class:`DataError`."""
    import torchvision.datasets

    dataset_class = getattr(torchvision.datasets, spec.torchvision_class)
    if spec.torchvision_class == "SVHN":
        # the "extra" split is not used: the pool is the 73,257 training images
        kwargs: dict[str, Any] = {"split": "train" if train else "test"}
    else:
        kwargs = {"train": train}
    try:
        return dataset_class(str(root), transform=transform, download=download, **kwargs)
    except Exception as err:
        if download:  # network, checksum or disk errors all mean: no data
            detail = " ".join(str(err).split())[:300]
            raise DataError(
                f"{spec.name}: download into {root} failed ({type(err).__name__}: {detail}); "
                f"without network access, place the official files ({spec.expected_files}) in "
                f"{root} and drop --download"
            ) from err
        if isinstance(err, (RuntimeError, OSError)):
            # torchvision: "Dataset not found or corrupted" (missing file or md5 mismatch)
            raise DataError(
                f"{spec.name}: dataset files not found or corrupted in {root} (expected "
                f"{spec.expected_files}); pass --download to fetch them into {root}, or place the "
                f"official files there"
            ) from err
        # files that pass torchvision's checks but still fail to parse (unpickling, .mat reading)
        detail = " ".join(str(err).split())[:300]
        raise DataError(
            f"{spec.name}: cannot read the files in {root} ({type(err).__name__}: {detail}); "
            f"replace them with the official files ({spec.expected_files})"
        ) from err


def _resolve_root(spec: VisionSpec, root: Path | None) -> Path:
    if root is None:
        raise DataError(
            f"{spec.name} needs --data-root DIR (the folder holding {spec.expected_files}, or "
            f"where --download should put them)"
        )
    # accept a root pointing into the CIFAR batch folder itself, a common slip
    base = spec.base_folder
    if base is not None and root.name == base and not (root / base).exists():
        return root.parent
    return root


def load_vision_dataset(spec: VisionSpec, root: Path | None, download: bool) -> DatasetBundle:
    """Read one of the torchvision datasets into a :class:`DatasetBundle`."""
    root = _resolve_root(spec, root)
    train_transform, eval_transform = _transforms(spec)
    train_eval = _open(spec, root, train=True, download=download, transform=eval_transform)
    train = _with_transform(train_eval, train_transform)
    # the training download (if any) has fetched the whole archive (CIFAR) or not the test file
    # (SVHN), so the test set may still need downloading
    test = _open(spec, root, train=False, download=download, transform=eval_transform)
    labels_attr = "labels" if spec.torchvision_class == "SVHN" else "targets"
    return DatasetBundle(
        name=spec.name,
        train=train,
        train_eval=train_eval,
        test=test,
        train_targets=np.asarray(getattr(train_eval, labels_attr), dtype=np.int64),
        test_targets=np.asarray(getattr(test, labels_attr), dtype=np.int64),
        num_classes=spec.num_classes,
        in_channels=3,
        image_size=(32, 32),
        default_model="resnet18-cifar",
    )


@DATASETS.register("cifar10")
def load_cifar10(root: Path | None = None, download: bool = False) -> DatasetBundle:
    """CIFAR-10: 50,000 training and 10,000 test colour images, 32x32, 10 classes."""
    return load_vision_dataset(CIFAR10, root, download)


@DATASETS.register("cifar100")
def load_cifar100(root: Path | None = None, download: bool = False) -> DatasetBundle:
    """CIFAR-100: 50,000 training and 10,000 test colour images, 32x32, 100 classes."""
    return load_vision_dataset(CIFAR100, root, download)


@DATASETS.register("svhn")
def load_svhn(root: Path | None = None, download: bool = False) -> DatasetBundle:
    """SVHN house-number digits: 73,257 training and 26,032 test images, 32x32 (no "extra")."""
    return load_vision_dataset(SVHN, root, download)
