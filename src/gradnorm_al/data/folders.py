"""Image-file datasets read lazily from folders: Caltech-101, ImageNet and the user's own tree.

All three give square crops normalised with the ImageNet statistics: the training pool gets
``RandomResizedCrop(224)`` and a horizontal flip, ``train_eval`` and ``test`` get ``Resize(256)``
then ``CenterCrop(224)`` (the standard ImageNet evaluation). Images are decoded one at a time when
an item is read, never all into memory, and converted to RGB (Caltech-101 has greyscale JPEGs,
ImageNet greyscale and CMYK ones).

Layouts, ``root`` being ``--data-root``:

``caltech101``
    torchvision's ``root/caltech101/101_ObjectCategories/<category>/image_XXXX.jpg`` (also accepted:
    ``root/caltech-101/101_ObjectCategories``, ``root/101_ObjectCategories``, or ``root`` being
    that folder). As in torchvision, categories are the sorted folder names less
    ``BACKGROUND_Google``: 101 classes. Caltech-101 has no official train/test split and the paper
    does not publish its own, so a fixed one is made: see :func:`stratified_split` (80/20, seed 0).
``imagenet``
    ``root/imagenet/{train,val}/<wnid>/*.JPEG`` or ``root/{train,val}/<wnid>/*.JPEG``: the usual
    prepared layout, which is also what torchvision's ``ImageNet`` leaves in its root. Where a split
    folder is missing but the official archive lies there (``ILSVRC2012_img_train.tar``,
    ``ILSVRC2012_img_val.tar``; the validation one also needs ``ILSVRC2012_devkit_t12.tar.gz``),
    torchvision's archive parsers verify the archives' official md5 and unpack them into that
    layout. torchvision's ``meta.bin`` is never read: it is a pickle without an official checksum,
    and the labels (index of the wnid in sorted order, as in torchvision) do not need it.
``imagefolder``
    the user's own images: ``root/train/<class>/*`` and ``root/test/<class>/*`` (``root/val`` if
    there is no ``test``), any image size; classes are the sorted folder names. Crops are
    :data:`IMAGE_SIZE` (224) pixels unless ``load_imagefolder(..., image_size=S)`` is called
    directly (evaluation then resizes to ``round(S * 256 / 224)`` before the centre crop).

In every tree, folders whose name starts with ``.`` are ignored, and so are files without an image
extension (torchvision's ``IMG_EXTENSIONS``); class folders may hold sub-folders.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from ..errors import DataError
from .base import DATASETS, DatasetBundle
from .vision import ToNormalisedTensor

#: crop size of all three datasets (the side of the square images the models see)
IMAGE_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Caltech-101's fixed split: per class, this fraction (rounded) of the images is the test set
CALTECH_TEST_FRACTION = 0.2
CALTECH_SPLIT_SEED = 0
CALTECH_FOLDER = "101_ObjectCategories"
CALTECH_BACKGROUND = "BACKGROUND_Google"  # clutter images, not a class (torchvision drops it too)


# ---------------------------------------------------------------------------------------------
# the lazy dataset


def load_rgb(path: str) -> Any:
    """Decode the image file at ``path`` into an RGB PIL image; :class:`DataError` if unreadable."""
    from PIL import Image

    try:
        with open(path, "rb") as f:  # closed at once: no file handles left to the garbage collector
            return Image.open(f).convert("RGB")  # convert() decodes; greyscale/CMYK/palette -> RGB
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        detail = " ".join(str(err).split())[:200]
        raise DataError(
            f"cannot read image {path} ({type(err).__name__}: {detail}); replace or remove the file"
        ) from err


class ImageFiles(Dataset):
    """Images read from files when indexed: item ``i`` is ``(transform(RGB image i), label i)``.

    Paths are kept relative to ``root`` in one numpy bytes array rather than a list of Python
    strings: about 40 bytes per ImageNet image, and no per-item objects whose reference counts
    would make DataLoader worker processes copy the list.
    """

    def __init__(
        self,
        root: str | Path,
        paths: Sequence[str],
        targets: Sequence[int] | np.ndarray,
        transform: Callable[[Any], Any],
    ) -> None:
        self.root = str(root)
        self._paths = np.array([os.fsencode(p) for p in paths], dtype=np.bytes_)
        self.targets = np.asarray(targets, dtype=np.int64)
        if len(self._paths) != len(self.targets):
            raise DataError(f"{root}: {len(self._paths)} paths but {len(self.targets)} labels")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def path(self, index: int) -> str:
        """The full path of image ``index``."""
        return os.path.join(self.root, os.fsdecode(self._paths[index]))

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.transform(load_rgb(self.path(index))), int(self.targets[index])

    def with_transform(self, transform: Callable[[Any], Any]) -> ImageFiles:
        """The same samples in the same order (shared arrays), with another transform."""
        view = copy.copy(self)
        view.transform = transform
        return view

    def subset(self, indices: np.ndarray) -> ImageFiles:
        """Samples ``indices`` (in that order) as a dataset of their own."""
        view = copy.copy(self)
        view._paths = self._paths[indices]
        view.targets = self.targets[indices]
        return view

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={self.root!r}, n={len(self)})"


def crop_transforms(
    image_size: int = IMAGE_SIZE,
) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    """(training transform, evaluation transform) for ImageNet-style crops of side ``image_size``.

    Training: ``RandomResizedCrop(image_size)`` (scale 0.08-1, ratio 3/4-4/3), horizontal flip.
    Evaluation: ``Resize(round(image_size * 256 / 224))`` of the shorter side, centre crop.
    Both end in ImageNet mean/std normalisation.
    """
    from torchvision import transforms as T

    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise DataError(f"image_size must be a positive integer, got {image_size!r}")
    to_tensor = ToNormalisedTensor(IMAGENET_MEAN, IMAGENET_STD)
    train = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), to_tensor])
    resize = round(image_size * 256 / 224)
    evaluate = T.Compose([T.Resize(resize), T.CenterCrop(image_size), to_tensor])
    return train, evaluate


# ---------------------------------------------------------------------------------------------
# listing folders


def class_folders(directory: Path, exclude: Sequence[str] = ()) -> list[str]:
    """Sorted names of the sub-folders of ``directory`` (hidden ones and ``exclude`` left out)."""
    try:
        entries = list(os.scandir(directory))
    except OSError as err:
        raise DataError(f"cannot list {directory} ({err.strerror or err})") from err
    return sorted(
        e.name
        for e in entries
        if e.is_dir() and not e.name.startswith(".") and e.name not in exclude
    )


def list_images(directory: Path, classes: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """(paths relative to ``directory``, labels): every image under ``directory/<classes[k]>``.

    Label ``k`` for ``classes[k]``; classes in the given order, files sorted by path within each
    (torchvision's ``make_dataset``, so the order and labels are those of its ``ImageFolder``).
    Hidden sub-folders and files are skipped. :class:`DataError` if a class folder holds no image.
    """
    from torchvision.datasets.folder import IMG_EXTENSIONS

    base = str(directory)
    paths: list[str] = []
    labels: list[int] = []
    empty = []
    for k, name in enumerate(classes):
        before = len(paths)
        walked = []
        for folder, subfolders, files in os.walk(os.path.join(base, name), followlinks=True):
            subfolders[:] = [s for s in subfolders if not s.startswith(".")]  # prune hidden ones
            walked.append((folder, files))
        for folder, files in sorted(walked, key=lambda entry: entry[0]):
            rel = os.path.relpath(folder, base)
            paths.extend(
                os.path.join(rel, f)
                for f in sorted(files)
                if f.lower().endswith(IMG_EXTENSIONS) and not f.startswith(".")
            )
        labels.extend([k] * (len(paths) - before))
        if len(paths) == before:
            empty.append(name)
    if empty:
        shown = ", ".join(empty[:10]) + (f" and {len(empty) - 10} more" if len(empty) > 10 else "")
        raise DataError(
            f"{directory}: no image files in class folder(s) {shown} (image extensions: "
            f"{', '.join(IMG_EXTENSIONS)}); add images or remove the folder(s)"
        )
    return paths, np.asarray(labels, dtype=np.int64)


def _check_same_classes(
    what: str, first: tuple[str, list[str]], second: tuple[str, list[str]]
) -> None:
    """:class:`DataError` naming the differences unless two class lists are equal."""
    (name_a, a), (name_b, b) = first, second
    if a == b:
        return
    only_a = sorted(set(a) - set(b))
    only_b = sorted(set(b) - set(a))

    def shown(names: list[str]) -> str:
        return ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")

    parts = []
    if only_a:
        parts.append(f"only in {name_a}: {shown(only_a)}")
    if only_b:
        parts.append(f"only in {name_b}: {shown(only_b)}")
    raise DataError(
        f"{what}: the class folders of {name_a} ({len(a)}) and {name_b} ({len(b)}) differ "
        f"({'; '.join(parts)}); both need the same class folders"
    )


def _need_root(name: str, root: Path | None, expected: str) -> Path:
    if root is None:
        raise DataError(f"{name} needs --data-root DIR (the folder holding {expected})")
    return root


def _bundle(
    name: str,
    train_eval: ImageFiles,
    test: ImageFiles,
    num_classes: int,
    image_size: int,
    default_model: str,
    train_transform: Callable[[Any], Any],
) -> DatasetBundle:
    return DatasetBundle(
        name=name,
        train=train_eval.with_transform(train_transform),
        train_eval=train_eval,
        test=test,
        train_targets=train_eval.targets,
        test_targets=test.targets,
        num_classes=num_classes,
        in_channels=3,
        image_size=(image_size, image_size),
        default_model=default_model,
    )


# ---------------------------------------------------------------------------------------------
# Caltech-101


def stratified_split(
    targets: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """A seeded stratified split of ``targets`` [N]: (training indices, test indices), both sorted.

    For each class ``c`` in increasing order, its ``n_c`` members (in index order) are permuted by
    ``np.random.RandomState(seed)`` (one stream for all classes; the legacy generator, whose stream
    NumPy keeps fixed across versions) and the first ``round(test_fraction * n_c)`` go to the test
    set, clipped to ``[1, n_c - 1]`` so that a class of two or more images is in both sets; a class
    with a single image stays in training.
    """
    targets = np.asarray(targets, dtype=np.int64)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.RandomState(seed)
    test_parts = []
    for c in np.unique(targets):
        members = np.flatnonzero(targets == c)
        n = len(members)
        n_test = 0 if n < 2 else min(max(round(test_fraction * n), 1), n - 1)
        test_parts.append(members[rng.permutation(n)[:n_test]])
    is_test = np.zeros(len(targets), dtype=bool)
    if test_parts:
        is_test[np.concatenate(test_parts)] = True
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def _caltech_folder(root: Path) -> Path | None:
    """The ``101_ObjectCategories`` folder under ``root`` (see the module docstring), or None."""
    candidates = [
        root / "caltech101" / CALTECH_FOLDER,
        root / "caltech-101" / CALTECH_FOLDER,
        root / CALTECH_FOLDER,
    ]
    if root.name == CALTECH_FOLDER:  # root pointing into the folder itself, a common slip
        candidates.append(root)
    return next((c for c in candidates if c.is_dir()), None)


def caltech101_samples(folder: Path) -> tuple[list[str], list[str], np.ndarray]:
    """(categories, image paths relative to ``folder``, labels) of a ``101_ObjectCategories``.

    Categories and labels are torchvision's (sorted folder names less ``BACKGROUND_Google``), and so
    is the order of the images when they are numbered ``image_0001.jpg`` ... without gaps.
    """
    categories = class_folders(folder, exclude=(CALTECH_BACKGROUND,))
    if not categories:
        raise DataError(f"caltech101: no category folders in {folder}")
    paths, labels = list_images(folder, categories)
    return categories, paths, labels


def _download_caltech101(root: Path) -> None:
    """torchvision's download (the zip's official md5 is verified) into ``root/caltech101``."""
    import torchvision.datasets

    try:
        torchvision.datasets.Caltech101(str(root), download=True)
    except Exception as err:  # network, checksum, extraction or disk errors all mean: no data
        detail = " ".join(str(err).split())[:300]
        raise DataError(
            f"caltech101: download into {root} failed ({type(err).__name__}: {detail}); without "
            f"network access, unpack the official caltech-101.zip so that {root}/caltech101/"
            f"{CALTECH_FOLDER}/<category>/image_XXXX.jpg exist, and drop --download"
        ) from err


@DATASETS.register("caltech101")
def load_caltech101(root: Path | None = None, download: bool = False) -> DatasetBundle:
    """Caltech-101: 8,677 images of 101 object categories, a fixed stratified 80/20 split."""
    expected = f"caltech101/{CALTECH_FOLDER}/<category>/image_XXXX.jpg"
    root = _need_root("caltech101", root, expected)
    folder = _caltech_folder(root)
    if folder is None and download:
        _download_caltech101(root)
        folder = _caltech_folder(root)
    if folder is None:
        raise DataError(
            f"caltech101: {CALTECH_FOLDER} not found in {root} (expected {root}/{expected}); pass "
            f"--download to fetch it into {root}, or unpack the official caltech-101.zip there"
        )
    categories, paths, labels = caltech101_samples(folder)
    train_idx, test_idx = stratified_split(labels, CALTECH_TEST_FRACTION, CALTECH_SPLIT_SEED)
    train_transform, eval_transform = crop_transforms(IMAGE_SIZE)
    everything = ImageFiles(folder, paths, labels, eval_transform)
    return _bundle(
        "caltech101",
        everything.subset(train_idx),
        everything.subset(test_idx),
        num_classes=len(categories),
        image_size=IMAGE_SIZE,
        default_model="resnet18",
        train_transform=train_transform,
    )


# ---------------------------------------------------------------------------------------------
# ImageNet

IMAGENET_ARCHIVES = {  # names only: the md5s are torchvision's (imagenet.ARCHIVE_META)
    "train": "ILSVRC2012_img_train.tar",
    "val": "ILSVRC2012_img_val.tar",
    "devkit": "ILSVRC2012_devkit_t12.tar.gz",
}


def _imagenet_folder(root: Path) -> Path | None:
    """``root/imagenet`` or ``root``: the first with ``train``, ``val`` or an official archive."""
    for folder in (root / "imagenet", root):
        if any((folder / split).is_dir() for split in ("train", "val")) or any(
            (folder / name).is_file() for name in IMAGENET_ARCHIVES.values()
        ):
            return folder
    return None


def _devkit_val_wnids(folder: Path) -> list[str]:
    """The wnid of each validation image (in file-name order), from the md5-verified devkit."""
    from torchvision.datasets import imagenet as tv_imagenet

    devkit = folder / IMAGENET_ARCHIVES["devkit"]
    if not devkit.is_file():
        raise DataError(
            f"imagenet: {folder}/val is missing and sorting {IMAGENET_ARCHIVES['val']} into it "
            f"needs {devkit}; place the official devkit there, or a prepared val/<wnid>/ folder"
        )
    from torchvision.datasets.utils import check_integrity

    # torchvision checks again below, but its message would name the scratch folder
    if not check_integrity(str(devkit), tv_imagenet.ARCHIVE_META["devkit"][1]):
        raise DataError(
            f"imagenet: {devkit} is corrupted (its md5 is not the official one); replace it with "
            f"the official devkit"
        )
    try:
        with tempfile.TemporaryDirectory() as tmp:
            # verifies the devkit's official md5 before extracting, then writes tmp/meta.bin, read
            # straight back: a pickle made here from the verified archive, never the user's meta.bin
            tv_imagenet.parse_devkit_archive(tmp, file=str(devkit))
            return list(tv_imagenet.load_meta_file(tmp)[1])
    except Exception as err:  # md5 mismatch ("not present or corrupted"), bad archive
        detail = " ".join(str(err).split())[:300]
        raise DataError(
            f"imagenet: cannot read {devkit} ({type(err).__name__}: {detail}); replace it with "
            f"the official devkit"
        ) from err


def _unpack_imagenet(folder: Path, split: str) -> None:
    """Make ``folder/split/<wnid>/`` from the official archive with torchvision's parsers.

    The archive's official md5 is verified first. Unpacking goes to a scratch folder renamed at the
    end, so an interrupted run never leaves a partial split folder that would later be read.
    """
    from torchvision.datasets import imagenet as tv_imagenet

    scratch = f".{split}.unpacking"
    shutil.rmtree(folder / scratch, ignore_errors=True)  # left by an interrupted run
    wnids = _devkit_val_wnids(folder) if split == "val" else None
    try:
        if split == "train":
            tv_imagenet.parse_train_archive(str(folder), folder=scratch)
        else:
            tv_imagenet.parse_val_archive(str(folder), wnids=wnids, folder=scratch)
    except Exception as err:  # md5 mismatch ("not present or corrupted"), bad tar, disk full
        shutil.rmtree(folder / scratch, ignore_errors=True)
        detail = " ".join(str(err).split())[:300]
        raise DataError(
            f"imagenet: cannot unpack {folder / IMAGENET_ARCHIVES[split]} "
            f"({type(err).__name__}: {detail}); replace it with the official archive"
        ) from err
    os.replace(folder / scratch, folder / split)


@DATASETS.register("imagenet")
def load_imagenet(root: Path | None = None, download: bool = False) -> DatasetBundle:
    """ImageNet (ILSVRC 2012): 1,281,167 training images, the 50,000 validation images as test set.

    ``num_classes`` is the number of wnid folders (1000 for the full dataset); train and val must
    hold the same ones. ImageNet cannot be downloaded automatically (``download`` is ignored).
    """
    expected = "imagenet/train/<wnid>/*.JPEG and imagenet/val/<wnid>/*.JPEG"
    root = _need_root("imagenet", root, expected)
    folder = _imagenet_folder(root)
    if folder is None:
        raise DataError(
            f"imagenet: no ImageNet found in {root} (expected {root}/{expected}, or train/ and "
            f"val/ directly in {root}, or the official ILSVRC2012 archives there); ImageNet cannot "
            f"be downloaded automatically: get it from image-net.org"
        )
    for split in ("train", "val"):
        if not (folder / split).is_dir():
            if (folder / IMAGENET_ARCHIVES[split]).is_file():
                _unpack_imagenet(folder, split)
            else:
                raise DataError(
                    f"imagenet: {folder / split} not found (expected {split}/<wnid>/*.JPEG, or "
                    f"the official {IMAGENET_ARCHIVES[split]} in {folder} to unpack it from)"
                )
    train_classes = class_folders(folder / "train")
    val_classes = class_folders(folder / "val")
    if not train_classes:
        raise DataError(f"imagenet: no class (wnid) folders in {folder / 'train'}")
    if not val_classes:
        raise DataError(
            f"imagenet: no class (wnid) folders in {folder / 'val'}; the validation images must be "
            f"sorted into val/<wnid>/ (remove val/ and put the official "
            f"{IMAGENET_ARCHIVES['val']} and {IMAGENET_ARCHIVES['devkit']} in {folder} to have "
            f"them unpacked and sorted)"
        )
    _check_same_classes("imagenet", ("train", train_classes), ("val", val_classes))
    train_transform, eval_transform = crop_transforms(IMAGE_SIZE)
    train_paths, train_labels = list_images(folder / "train", train_classes)
    val_paths, val_labels = list_images(folder / "val", val_classes)
    return _bundle(
        "imagenet",
        ImageFiles(folder / "train", train_paths, train_labels, eval_transform),
        ImageFiles(folder / "val", val_paths, val_labels, eval_transform),
        num_classes=len(train_classes),
        image_size=IMAGE_SIZE,
        default_model="vgg16",
        train_transform=train_transform,
    )


# ---------------------------------------------------------------------------------------------
# the user's own ImageFolder tree


@DATASETS.register("imagefolder")
def load_imagefolder(
    root: Path | None = None, download: bool = False, *, image_size: int = IMAGE_SIZE
) -> DatasetBundle:
    """Own images: ``root/train/<class>/*`` is the pool, ``root/test/<class>/*`` the test set.

    ``root/val`` stands in for a missing ``root/test``. Classes are the sorted folder names, the
    same in both. Nothing is downloaded (``download`` is ignored).
    """
    expected = "train/<class>/<images> and test/<class>/<images>"
    root = _need_root("imagefolder", root, expected)
    train_dir = root / "train"
    test_dir = root / "test" if (root / "test").is_dir() else root / "val"
    missing = [str(d) for d in (train_dir, test_dir) if not d.is_dir()]
    if missing:
        raise DataError(
            f"imagefolder: {' and '.join(missing)} not found; --data-root must be a folder "
            f"holding {expected} (val/ may replace test/)"
        )
    classes = {}
    for d in (train_dir, test_dir):
        classes[d.name] = class_folders(d)
        if not classes[d.name]:
            raise DataError(
                f"imagefolder: no class folders in {d}; put each class's images in {d}/<class>/"
            )
    _check_same_classes("imagefolder", *classes.items())
    train_transform, eval_transform = crop_transforms(image_size)
    names = classes["train"]
    train_paths, train_labels = list_images(train_dir, names)
    test_paths, test_labels = list_images(test_dir, names)
    return _bundle(
        "imagefolder",
        ImageFiles(train_dir, train_paths, train_labels, eval_transform),
        ImageFiles(test_dir, test_paths, test_labels, eval_transform),
        num_classes=len(names),
        image_size=image_size,
        default_model="resnet18",
        train_transform=train_transform,
    )
