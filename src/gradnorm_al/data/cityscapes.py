"""Cityscapes (fine annotations) for semantic segmentation, through torchvision's reader.

Layout, ``root`` being ``--data-root`` (what unzipping the official ``leftImg8bit_trainvaltest.zip``
and ``gtFine_trainvaltest.zip`` into it gives; torchvision's ``Cityscapes`` also unpacks those two
archives itself when they lie in ``root`` and the folders do not)::

    root/leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    root/gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png

The pool is the ``train`` split (2,975 images), the test set the ``val`` split (500 images): the
``test`` split has no public labels. Cityscapes needs a login at cityscapes-dataset.com, so it is
never downloaded (``download=True`` is an error saying what to fetch).

torchvision's ``Cityscapes(root, split, mode="fine", target_type="semantic")`` finds the files
(its layout and file naming); the pairs are then sorted by path (torchvision lists folders in
directory order, which differs between machines; a seeded run must see one order), files whose
name does not end in ``_leftImg8bit.png`` are left out, and every image is checked to have its
``_gtFine_labelIds.png`` before anything is read. Items are decoded here, one at a time:

* image: RGB float32 [3, H, W], ``(x / 255 - mean) / std`` with the ImageNet statistics
  (:data:`~gradnorm_al.data.folders.IMAGENET_MEAN`, ``IMAGENET_STD``);
* mask: int64 [H, W], the label ids mapped to the 19 training classes of the official table
  (``trainId`` in cityscapesScripts' ``labels.py``, which torchvision's ``Cityscapes.classes``
  carries): road 0, sidewalk 1, ..., bicycle 18; every other official id (void, parking, rail
  track, guard rail, bridge, tunnel, polegroup, caravan, trailer) is 255, ignored. A value that is
  no official id is a :class:`~gradnorm_al.errors.DataError` naming the file.

``train`` and ``train_eval`` give the full-size items (2048x1024); training batches are cropped
and flipped by the bundle's ``augment``, ``RandomCropFlip(688)``: random 688x688 crops and
horizontal flips of image and mask together, as in the paper.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError
from .augment import RandomCropFlip
from .base import DATASETS, DatasetBundle
from .folders import IMAGENET_MEAN, IMAGENET_STD, load_rgb
from .mask_folders import read_index_image
from .vision import ToNormalisedTensor

NUM_CLASSES = 19
IGNORE_INDEX = 255
#: side of the random training crops (the paper's 688x688)
CROP = 688
ARCHIVES = ("leftImg8bit_trainvaltest.zip", "gtFine_trainvaltest.zip")
IMAGE_SUFFIX = "_leftImg8bit.png"
MASK_SUFFIX = "_gtFine_labelIds.png"
#: the Cityscapes split that each part of the bundle reads
SPLITS = {"pool": "train", "test": "val"}
_NOT_AN_ID = -1  # in the lookup table: a value that is no official label id
_FETCH = (
    f"download {' and '.join(ARCHIVES)} from https://www.cityscapes-dataset.com (needs a login) "
    "and unzip both into {root}"
)


@functools.cache
def _official_table() -> tuple[tuple[int, int, str], ...]:
    """(label id, train id, name) of every official Cityscapes label with an id >= 0."""
    from torchvision.datasets import Cityscapes

    return tuple((c.id, c.train_id, c.name) for c in Cityscapes.classes if c.id >= 0)


@functools.cache
def train_id_lut() -> np.ndarray:
    """int64 [256]: label id -> training class (0-18, or 255 for the ignored ids); -1 for the
    values that are no official label id. Built from torchvision's copy of the official table."""
    lut = np.full(256, _NOT_AN_ID, dtype=np.int64)
    for label_id, train_id, _ in _official_table():
        lut[label_id] = IGNORE_INDEX if train_id in (-1, IGNORE_INDEX) else train_id
    used = sorted(int(t) for t in set(lut.tolist()) - {_NOT_AN_ID, IGNORE_INDEX})
    if used != list(range(NUM_CLASSES)):  # a torchvision that changed the table
        raise RuntimeError(f"torchvision's Cityscapes table has training classes {used}")
    lut.setflags(write=False)
    return lut


@functools.cache
def class_names() -> tuple[str, ...]:
    """The 19 training classes' names, in training-id order (road, sidewalk, ..., bicycle)."""
    names = {t: n for _, t, n in _official_table() if 0 <= t < NUM_CLASSES}
    return tuple(names[t] for t in range(NUM_CLASSES))


def _image_size(path: str) -> tuple[int, int]:
    """(width, height) from the header of ``path``."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(
            f"cannot read image {path} ({type(err).__name__}: {err}); replace it with "
            "the official file"
        ) from err


def _open_split(root: Path, split: str) -> Any:
    """torchvision's ``Cityscapes`` of ``split`` (fine, semantic), its errors as DataError."""
    from torchvision.datasets import Cityscapes

    images, masks = root / "leftImg8bit" / split, root / "gtFine" / split
    fetch = _FETCH.format(root=root)
    try:
        return Cityscapes(str(root), split=split, mode="fine", target_type="semantic")
    except RuntimeError as err:  # "Dataset not found or incomplete" (a split folder is missing)
        missing = [str(d) for d in (images, masks) if not d.is_dir()] or [str(images)]
        raise DataError(
            f"cityscapes: {' and '.join(missing)} not found; {fetch} (giving "
            f"{root}/leftImg8bit/{split}/<city>/ and {root}/gtFine/{split}/<city>/)"
        ) from err
    except OSError as err:  # a file where torchvision expects a city folder, unreadable folders
        where = err.filename or images
        raise DataError(
            f"cityscapes: cannot list {where} ({err.strerror or err}); {images} must hold one "
            "folder per city and nothing else"
        ) from err
    except Exception as err:  # unpacking archives found in root (a damaged zip)
        detail = " ".join(str(err).split())[:300]
        raise DataError(
            f"cityscapes: cannot read the files in {root} ({type(err).__name__}: {detail}); "
            f"replace them: {fetch}"
        ) from err


class CityscapesFine(Dataset):
    """One split of Cityscapes' fine annotations (see the module docs).

    Item ``i``: (image float32 [3, H, W] normalised with the ImageNet mean/std, mask int64 [H, W]
    of training classes 0-18 and 255), files sorted by path. :meth:`target` reads a mask without
    decoding its image (what a :class:`~gradnorm_al.oracles.DatasetOracle` uses). Every image of
    the split must have the size of the first (2048x1024 for the official files).
    """

    def __init__(self, root: str | Path, split: str) -> None:
        self.root, self.split = Path(root), split
        found = _open_split(self.root, split)
        pairs = sorted(
            (image, targets[0])
            for image, targets in zip(found.images, found.targets)
            if os.path.basename(image).endswith(IMAGE_SUFFIX)
        )
        if not pairs:
            raise DataError(
                f"cityscapes: no *{IMAGE_SUFFIX} images in {found.images_dir}/<city>/; "
                f"{_FETCH.format(root=self.root)}"
            )
        missing = [mask for _, mask in pairs if not os.path.isfile(mask)]
        if missing:
            raise DataError(
                f"cityscapes: {missing[0]} not found ({len(missing)} of the {len(pairs)} {split} "
                f"images have no *{MASK_SUFFIX}); unzip the official gtFine_trainvaltest.zip "
                f"into {self.root}"
            )
        self.image_paths = [image for image, _ in pairs]
        self.mask_paths = [mask for _, mask in pairs]
        self.size = _image_size(self.image_paths[0])  # (width, height)
        self._to_tensor = ToNormalisedTensor(IMAGENET_MEAN, IMAGENET_STD)

    def __len__(self) -> int:
        return len(self.image_paths)

    def target(self, index: int) -> torch.Tensor:
        """int64 [H, W]: the training classes (255: ignored) of item ``index``'s label ids."""
        path = self.mask_paths[index]
        ids = read_index_image(path)
        lut = train_id_lut()
        bad = (ids < 0) | (ids >= len(lut))
        bad[~bad] = lut[ids[~bad]] == _NOT_AN_ID
        if bad.any():
            values = np.unique(ids[bad])
            raise DataError(
                f"cityscapes: mask {path} holds value {int(values[0])}, which is no Cityscapes "
                f"label id ({int(bad.sum())} such pixels; values "
                f"{', '.join(str(int(v)) for v in values[:5])}); the *{MASK_SUFFIX} files hold "
                "the official ids 0-33: replace it with the official file"
            )
        return torch.from_numpy(lut[ids])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        path = self.image_paths[index]
        rgb = load_rgb(path)
        if rgb.size != self.size:
            (w, h), (w0, h0) = rgb.size, self.size
            raise DataError(
                f"cityscapes: image {path} is {w}x{h} pixels but {self.image_paths[0]} is "
                f"{w0}x{h0}; all images of a split must have one size (the official ones are "
                "2048x1024): replace it with the official file"
            )
        mask = self.target(index)
        if tuple(mask.shape) != (rgb.size[1], rgb.size[0]):
            raise DataError(
                f"cityscapes: mask {self.mask_paths[index]} is {mask.shape[1]}x{mask.shape[0]} "
                f"pixels but its image {path} is {rgb.size[0]}x{rgb.size[1]}; replace it with "
                "the official file"
            )
        return self._to_tensor(rgb), mask

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r}, split={self.split!r}, n={len(self)})"


@DATASETS.register("cityscapes")
def load_cityscapes(
    root: Path | None = None,
    download: bool = False,
    *,
    crop: int | tuple[int, int] = CROP,
) -> DatasetBundle:
    """Cityscapes, fine annotations: 2,975 training images (the pool), the 500 validation images
    as the test set, 19 classes; random ``crop`` (688x688) crops and flips in training."""
    if download:
        where = root if root is not None else "--data-root DIR"
        raise DataError(
            "cityscapes cannot be downloaded automatically (its files need a login): "
            f"{_FETCH.format(root=where)}, then drop --download"
        )
    if root is None:
        raise DataError(
            "cityscapes needs --data-root DIR, the folder holding leftImg8bit/ and gtFine/ ("
            + _FETCH.format(root="it")
            + ")"
        )
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"cityscapes: {root} is not a folder; {_FETCH.format(root=root)}")
    pool = CityscapesFine(root, SPLITS["pool"])
    test = CityscapesFine(root, SPLITS["test"])
    width, height = pool.size
    return DatasetBundle(
        name="cityscapes",
        train=pool,  # unaugmented: training batches are augmented by `augment`
        train_eval=pool,
        test=test,
        train_targets=None,  # masks are read one at a time through pool.target(i)
        test_targets=None,
        num_classes=NUM_CLASSES,
        in_channels=3,
        image_size=(height, width),
        default_model="drn-d-22",
        task="segmentation",
        ignore_index=IGNORE_INDEX,
        augment=RandomCropFlip(crop, flip=True, ignore_index=IGNORE_INDEX),
        class_names=class_names(),
    )
