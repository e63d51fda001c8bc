"""Joint augmentation of a training batch whose labels move with the pixels (segmentation).

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
