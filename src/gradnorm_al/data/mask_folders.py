"""Segmentation data from a folder of images and same-named PNG masks.

Layout (``DIR`` a folder given by the user)::

    DIR/images/<stem>.png|.jpg|.jpeg     RGB, greyscale or palette images, any size
    DIR/masks/<stem>.png                 one mask per image, the same size as its image

A mask is an index image read with Pillow: a palette (``P``) PNG, whose pixel values are the palette
indices (the colours are ignored: VOC and most annotation tools save masks this way), or a greyscale
(``L``, ``I;16``, ``I``) PNG whose values are the classes. Values are classes in
``[0, num_classes)`` or the ignore index (255 by default: unlabelled pixels). RGB or RGBA colour
masks are refused: map their colours to indices first.

:func:`mask_folder_splits` reads ``DIR/train`` and ``DIR/test`` (or ``DIR/val``) when they exist,
each with the layout above, else ``DIR`` itself as the one split ``"all"``.

The registered dataset ``maskfolder`` (:func:`load_maskfolder`) reads ``--data-root DIR`` this
way, with the class names in ``DIR/classes.txt``.

Pairing and sizes are checked when the dataset is built (from the file headers, nothing
decoded); mask values when an item is read, so images and masks are decoded one at a time. Every
problem is a :class:`~gradnorm_al.errors.DataError` naming the file and the fix.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from ..errors import ConfigError, DataError
from .base import DATASETS, DatasetBundle, mask_value_problem
from .folders import load_rgb

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
MASK_EXTENSION = ".png"
_INDEX_MODES = ("P", "L", "I;16", "I", "1")


def _files(folder: Path, extensions: tuple[str, ...]) -> dict[str, str]:
    """stem -> file name of the visible files of ``folder`` with one of ``extensions``."""
    try:
        names = sorted(os.listdir(folder))
    except OSError as err:
        raise DataError(f"cannot list {folder} ({err.strerror or err})") from err
    found: dict[str, str] = {}
    for name in names:
        stem, ext = os.path.splitext(name)
        if name.startswith(".") or ext.lower() not in extensions:
            continue
        if stem in found:
            raise DataError(
                f"{folder / name} and {folder / found[stem]} share the stem {stem!r}; keep one "
                "file per stem (masks are paired with images by stem)"
            )
        found[stem] = name
    return found


def _size(path: Path) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size  # (width, height), from the header
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot read {path} ({type(err).__name__}: {err}); replace it") from err


def read_index_image(path: str | Path) -> np.ndarray:
    """int64 [H, W]: the values of the index image ``path`` (palette indices or grey levels),
    unchecked; :class:`DataError` naming the file for a colour image or an unreadable file."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode not in _INDEX_MODES:
                raise DataError(
                    f"mask {path} is a {im.mode} image; masks must be index images (palette 'P' "
                    "or greyscale 'L' PNGs whose values are the classes): map colours to indices"
                )
            return np.asarray(im).astype(np.int64)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot read mask {path} ({type(err).__name__}: {err})") from err


def read_mask(path: str | Path, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """int64 [H, W] class indices of the index PNG ``path``; :class:`DataError` naming the file
    for a colour mask or a value that is neither a class nor ``ignore_index``."""
    mask = read_index_image(path)
    problem = mask_value_problem(mask, num_classes, ignore_index)
    if problem is not None:
        raise DataError(f"mask {path}: {problem}; fix the mask or num_classes")
    return mask


class MaskFolder(Dataset):
    """Item ``i``: (image float32 [3, H, W] in [0, 1], mask int64 [H, W]), files sorted by stem.

    ``directory`` holds ``images/`` and ``masks/`` (see the module docs). A missing or extra mask,
    two files with one stem, or an image and mask of different sizes is a :class:`DataError`
    naming the file, raised here; a bad mask value is raised when that item is read.
    """

    def __init__(self, directory: str | Path, num_classes: int, ignore_index: int = 255) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ConfigError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        self.directory = Path(directory)
        self.num_classes, self.ignore_index = num_classes, ignore_index
        image_dir, mask_dir = self.directory / "images", self.directory / "masks"
        for d in (image_dir, mask_dir):
            if not d.is_dir():
                raise DataError(
                    f"{d} not found; a segmentation folder holds images/<stem>.png|jpg and "
                    "masks/<stem>.png"
                )
        images = _files(image_dir, IMAGE_EXTENSIONS)
        masks = _files(mask_dir, (MASK_EXTENSION,))
        missing = sorted(set(images) - set(masks))
        if missing:
            raise DataError(
                f"image {image_dir / images[missing[0]]} has no mask {mask_dir / missing[0]}.png "
                f"({len(missing)} images without a mask); add the masks or remove the images"
            )
        extra = sorted(set(masks) - set(images))
        if extra:
            raise DataError(
                f"mask {mask_dir / masks[extra[0]]} has no image of the same stem in {image_dir} "
                f"({len(extra)} such masks); add the images or remove the masks"
            )
        if not images:
            raise DataError(f"no images in {image_dir} (extensions: {', '.join(IMAGE_EXTENSIONS)})")
        self.stems = sorted(images)
        self.image_paths = [image_dir / images[s] for s in self.stems]
        self.mask_paths = [mask_dir / masks[s] for s in self.stems]
        self.sizes: list[tuple[int, int]] = []  # (width, height) of item i, from the headers
        for image, mask in zip(self.image_paths, self.mask_paths):
            (w, h), (mw, mh) = _size(image), _size(mask)
            self.sizes.append((w, h))
            if (w, h) != (mw, mh):
                raise DataError(
                    f"mask {mask} is {mw}x{mh} pixels but its image {image} is {w}x{h}; masks "
                    "must be the size of their images"
                )

    def __len__(self) -> int:
        return len(self.stems)

    def mask(self, index: int) -> torch.Tensor:
        """int64 [H, W]: the checked mask of item ``index`` (the image is not decoded)."""
        path = self.mask_paths[index]
        return torch.from_numpy(read_mask(path, self.num_classes, self.ignore_index))

    target = mask  # what a DatasetOracle reads: the label without decoding the image

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rgb = np.asarray(load_rgb(str(self.image_paths[index])), dtype=np.float32) / 255.0
        image = torch.from_numpy(rgb.transpose(2, 0, 1).copy())
        return image, self.mask(index)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.directory)!r}, n={len(self)})"


def mask_folder_splits(
    root: str | Path, num_classes: int, ignore_index: int = 255
) -> dict[str, MaskFolder]:
    """``{"train": ..., "test": ...}`` from ``root/train`` and ``root/test`` (``root/val`` if
    there is no ``test``) when ``root/train`` exists, else ``{"all": MaskFolder(root)}``."""
    root = Path(root).expanduser()
    if not (root / "train").is_dir():
        return {"all": MaskFolder(root, num_classes, ignore_index)}
    test = root / "test" if (root / "test").is_dir() else root / "val"
    if not test.is_dir():
        raise DataError(f"{root}/train exists but neither {root}/test nor {root}/val; add one")
    return {
        "train": MaskFolder(root / "train", num_classes, ignore_index),
        "test": MaskFolder(test, num_classes, ignore_index),
    }


# ---------------------------------------------------------------------------------------------
# the registered dataset ``maskfolder``

#: the file in ``--data-root`` that names the classes, one per line (line k: class k)
CLASSES_FILE = "classes.txt"
#: a folder without train/ and test/ is split once: this fraction (rounded, at least 1) is the
#: test set, drawn with this seed
TEST_FRACTION = 0.2
SPLIT_SEED = 0


def read_class_names(path: str | Path) -> tuple[str, ...]:
    """The class names of ``path``, one per line (surrounding spaces and blank lines at the
    end dropped). :class:`DataError` naming the file for a missing file, a blank line between
    names, a name given twice, or fewer than two classes."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"{path} not found; create it with one class name per line, in the order of the "
            "mask values (line 1: class 0, usually background)"
        )
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read {path} ({err}); save it as UTF-8 text") from err
    names = [line.strip() for line in lines]
    while names and not names[-1]:
        names.pop()
    for number, name in enumerate(names, 1):
        if not name:
            raise DataError(f"{path}, line {number}: blank; give one class name per line")
        if name in names[: number - 1]:
            raise DataError(f"{path}, line {number}: class {name!r} is listed twice")
    if len(names) < 2:
        raise DataError(f"{path}: {len(names)} class(es); a segmentation needs at least two")
    return tuple(names)


@DATASETS.register("maskfolder")
def load_maskfolder(root: Path | None = None, download: bool = False) -> DatasetBundle:
    """Segmentation data from ``--data-root DIR``: ``DIR/classes.txt`` (the classes, one per
    line) and the layout of :func:`mask_folder_splits`. A ``DIR`` without ``train/`` is split
    once, :data:`TEST_FRACTION` of its images at random (:data:`SPLIT_SEED`) for the test set.

    All images must have one size (training and evaluation batches stack them): a folder with
    several sizes is refused, naming two files, rather than resampled, since resampling masks
    would change the annotations that the test set is scored on. Nothing is resized or
    augmented; images are RGB in [0, 1], masks read when an item is (the oracle reads them one
    at a time); mask value 255 marks ignored pixels. Nothing is downloaded.
    """
    if root is None:
        raise DataError(
            f"maskfolder needs --data-root DIR: a folder holding {CLASSES_FILE} and "
            "images/ + masks/ (or train/ and test/, each holding images/ + masks/)"
        )
    root = Path(root)
    classes = read_class_names(root / CLASSES_FILE)
    splits = mask_folder_splits(root, len(classes))
    train: Dataset
    test: Dataset
    if "all" in splits:
        everything = splits["all"]
        if len(everything) < 2:
            raise DataError(
                f"maskfolder: {root} holds {len(everything)} image; a training pool and a test "
                "set need at least two"
            )
        order = np.random.default_rng(SPLIT_SEED).permutation(len(everything))
        n_test = max(1, round(TEST_FRACTION * len(everything)))
        test_idx, train_idx = np.sort(order[:n_test]), np.sort(order[n_test:])
        train, test = Subset(everything, train_idx.tolist()), Subset(everything, test_idx.tolist())
        files = [(everything.image_paths[i], everything.sizes[i]) for i in range(len(everything))]
    else:
        train, test = splits["train"], splits["test"]
        files = [(p, s) for d in (train, test) for p, s in zip(d.image_paths, d.sizes)]
    first_path, (width, height) = files[0]
    for path, size in files:
        if size != (width, height):
            raise DataError(
                f"maskfolder: {path} is {size[0]}x{size[1]} pixels but {first_path} is "
                f"{width}x{height}; batches stack images, so resize or crop all images and "
                "masks to one size first (masks with nearest-neighbour resampling)"
            )
    return DatasetBundle(
        name="maskfolder",
        train=train,
        train_eval=train,
        test=test,
        train_targets=None,
        test_targets=None,
        num_classes=len(classes),
        in_channels=3,
        image_size=(height, width),
        default_model="fcn-small",
        task="segmentation",
        class_names=classes,
    )
