"""Augmentation of training batches: joint for labels that move with the pixels
(segmentation), shifts and flips of classification images (the ``augment`` option).

A dense label (a mask) must be cropped and flipped exactly like its image. The learner holds the
labels (they reach training only through ``ActiveLearner.update``), so the augmentation is
applied to the batch ``(inputs, labels)`` in the training loop, not to a dataset's items:
``augment(inputs, labels, generator) -> (inputs, labels)``, with the training loop's seeded
generator, so a trial is reproducible.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError


class RandomCropFlip:
    """A random ``crop`` (height, width) of each sample of the batch, the same window for its
    image [C, H, W] and mask [H, W], and a horizontal flip of both with probability 1/2
    (``flip``). An image smaller than the crop is padded first: inputs with 0, masks with
    ``ignore_index`` (padding is never a class). ``crop=None`` keeps the size (flips only).
    """

    def __init__(
        self, crop: tuple[int, int] | int | None = None, flip: bool = True, ignore_index: int = 255
    ) -> None:
        if isinstance(crop, int) and not isinstance(crop, bool):
            crop = (crop, crop)
        if crop is not None and (
            len(crop) != 2
            or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in crop)
        ):
            raise ConfigError(
                f"crop must be a size (height, width) of positive integers, got {crop!r}"
            )
        self.crop = None if crop is None else (int(crop[0]), int(crop[1]))
        self.flip, self.ignore_index = bool(flip), int(ignore_index)

    def __repr__(self) -> str:
        return (
            f"RandomCropFlip(crop={self.crop}, flip={self.flip}, ignore_index={self.ignore_index})"
        )

    def __call__(
        self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() != 4 or y.dim() != 3 or x.shape[0] != y.shape[0] or x.shape[2:] != y.shape[1:]:
            raise ValueError(
                f"RandomCropFlip needs inputs [N, C, H, W] and masks [N, H, W] of the same size, "
                f"got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        if self.crop is not None:
            x, y = self._crop(x, y, generator)
        if self.flip:
            flip = torch.rand(x.shape[0], generator=generator) < 0.5
            if bool(flip.any()):
                x, y = x.clone(), y.clone()
                x[flip] = x[flip].flip(-1)
                y[flip] = y[flip].flip(-1)
        return x, y

    def _crop(
        self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.crop is not None
        ch, cw = self.crop
        h, w = x.shape[2:]
        pad_h, pad_w = max(ch - h, 0), max(cw - w, 0)
        if pad_h or pad_w:  # right and bottom: the image keeps its origin
            x = F.pad(x, (0, pad_w, 0, pad_h), value=0.0)
            y = F.pad(y, (0, pad_w, 0, pad_h), value=self.ignore_index)
            h, w = x.shape[2:]
        tops = torch.randint(0, h - ch + 1, (x.shape[0],), generator=generator).tolist()
        lefts = torch.randint(0, w - cw + 1, (x.shape[0],), generator=generator).tolist()
        xs = [x[i, :, t : t + ch, s : s + cw] for i, (t, s) in enumerate(zip(tops, lefts))]
        ys = [y[i, t : t + ch, s : s + cw] for i, (t, s) in enumerate(zip(tops, lefts))]
        return torch.stack(xs), torch.stack(ys)


#: the ``augment`` option of a run: the dataset's own training augmentation, none, or random
#: shifts (``crop``) and also horizontal flips (``crop-flip``) of classification images
AUGMENTATIONS = ("dataset", "none", "crop", "crop-flip")


class PadCropFlip:
    """Random shifts of classification images [N, C, H, W]: each image is padded by ``padding``
    pixels on every side, repeating its border pixels (what a shifted photograph or a digit on a
    plain background would show; the padding never adds an edge), and a random window of the
    original size is cut out; then, with ``flip``, flipped horizontally with probability 1/2.
    The labels [N] pass through unchanged. The batch-level equivalent of torchvision's
    ``RandomCrop(size, padding)`` + ``RandomHorizontalFlip()``, applied by the training loop with
    its seeded generator (see :mod:`gradnorm_al.data.augment`)."""

    def __init__(self, padding: int, flip: bool = True) -> None:
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise ConfigError(f"padding must be a non-negative integer, got {padding!r}")
        self.padding, self.flip = padding, bool(flip)

    def __repr__(self) -> str:
        return f"PadCropFlip(padding={self.padding}, flip={self.flip})"

    def __call__(
        self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() != 4 or y.shape[:1] != x.shape[:1]:
            raise ValueError(
                f"PadCropFlip needs images [N, C, H, W] and one label per image, got "
                f"{tuple(x.shape)} and {tuple(y.shape)}"
            )
        n, _, h, w = x.shape
        p = self.padding
        if p:
            padded = F.pad(x, (p, p, p, p), mode="replicate")
            tops = torch.randint(0, 2 * p + 1, (n,), generator=generator).tolist()
            lefts = torch.randint(0, 2 * p + 1, (n,), generator=generator).tolist()
            x = torch.stack(
                [padded[i, :, t : t + h, s : s + w] for i, (t, s) in enumerate(zip(tops, lefts))]
            )
        if self.flip:
            flip = torch.rand(n, generator=generator) < 0.5
            if bool(flip.any()):
                x = x.clone()
                x[flip] = x[flip].flip(-1)
        return x, y


def training_augmentation(bundle, choice: str):
    """(training view of the pool, batch augmentation) of a dataset for the ``augment`` option:
    ``dataset`` keeps the dataset's own; ``none`` trains on the evaluation view; ``crop`` and
    ``crop-flip`` add :class:`PadCropFlip` (padding 1/8 of the image side, as CIFAR's 4 of 32) to
    the evaluation view of a classification dataset of images."""
    if choice not in AUGMENTATIONS:
        raise ConfigError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got {choice!r}")
    if choice == "dataset":
        return bundle.train, bundle.augment
    if choice == "none":
        return bundle.train_eval, None
    if bundle.dense or len(bundle.image_size) != 2:
        kind = bundle.task if bundle.dense else f"{len(bundle.image_size)}-D"
        raise ConfigError(
            f"augment {choice} shifts 2-D classification images; dataset {bundle.name} is "
            f"{kind}: use augment dataset or none"
        )
    side = min(bundle.image_size)
    return bundle.train_eval, PadCropFlip(max(1, side // 8), flip=choice == "crop-flip")
