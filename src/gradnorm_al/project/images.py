"""The project's images: listing the folder once at ``init``, and reading them as tensors.

Items are the files under the images folder, recursively, with an image extension
(torchvision's ``IMG_EXTENSIONS``), hidden files and folders left out, in the sorted order of
their '/'-separated relative paths. Each is decoded once at ``init``: a file Pillow cannot read
refuses the whole ``init`` with one error naming every such file (nothing is skipped silently).

Models see every image resized to ``image_size`` x ``image_size`` (the whole image, its aspect
ratio not kept), in RGB, normalised with the ImageNet mean and std (what pretrained torchvision
weights expect). Training uses no augmentation.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..data.folders import IMAGENET_MEAN, IMAGENET_STD, ImageFiles, load_rgb
from ..data.vision import ToNormalisedTensor
from ..errors import DataError

#: unreadable files named in the error before "and N more"
SHOWN_UNREADABLE = 20


def list_image_files(folder: Path, exclude: Path | None = None) -> list[str]:
    """Sorted '/'-separated paths, relative to ``folder``, of its image files (``exclude``: a
    folder inside it left out, the project's own)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    if not folder.is_dir():
        raise DataError(f"images folder {folder} not found (or not a folder)")
    skip = os.path.realpath(exclude) if exclude is not None else None
    paths = []
    for root, subfolders, files in os.walk(folder, followlinks=True):
        subfolders[:] = [
            s
            for s in subfolders
            if not s.startswith(".") and os.path.realpath(os.path.join(root, s)) != skip
        ]
        rel = Path(os.path.relpath(root, folder))
        paths.extend(
            (rel / f).as_posix().removeprefix("./")
            for f in files
            if f.lower().endswith(IMG_EXTENSIONS) and not f.startswith(".")
        )
    return sorted(paths)


def check_readable(folder: Path, paths: Sequence[str], progress: bool = False) -> None:
    """Decode every image; :class:`DataError` naming each file Pillow cannot read."""
    bad = []
    for path in tqdm(paths, desc="check images", unit="image", disable=not progress):
        try:
            load_rgb(str(folder / path))
        except DataError as err:
            reason = str(err.__cause__ or err).split("\n")[0][:120]
            bad.append(f"{path} ({type(err.__cause__).__name__}: {reason})")
    if bad:
        shown = "; ".join(bad[:SHOWN_UNREADABLE])
        more = f"; and {len(bad) - SHOWN_UNREADABLE} more" if len(bad) > SHOWN_UNREADABLE else ""
        raise DataError(
            f"{len(bad)} file(s) under {folder} cannot be read as images: {shown}{more}; "
            "replace or remove them, then run init again"
        )


def image_transform(image_size: int) -> Callable[[object], object]:
    """RGB PIL image -> float32 tensor [3, image_size, image_size], ImageNet-normalised."""
    from torchvision import transforms as T

    return T.Compose(
        [T.Resize((image_size, image_size)), ToNormalisedTensor(IMAGENET_MEAN, IMAGENET_STD)]
    )


def image_dataset(
    folder: Path, paths: Sequence[str], targets: Sequence[int] | np.ndarray, image_size: int
) -> ImageFiles:
    """The images ``paths`` (relative to ``folder``) as ``(tensor, target)`` items, read lazily;
    ``targets`` -1 where unknown (the learner reads only the labels it was given)."""
    return ImageFiles(folder, list(paths), targets, image_transform(image_size))
