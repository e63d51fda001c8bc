"""A small fully convolutional segmentation network for the CPU."""

from __future__ import annotations

import torch
from torch import nn

from .base import MODELS, DenseTaskModel


def _block(c_in: int, c_out: int, *, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class FCNSmall(DenseTaskModel):
    """Four conv3x3-BN-ReLU blocks: full resolution, stride 2, dilation 2 (a wider view without
    more downsampling), then an undilated one (against gridding); a 1x1 convolution to the
    classes and bilinear upsampling back to the input size. Output stride 2; any input >= 2x2.
    ``blocks`` is a ModuleList (feature taps)."""

    def __init__(self, num_classes: int = 2, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [
                _block(in_channels, width),
                _block(width, 2 * width, stride=2),
                _block(2 * width, 2 * width, dilation=2),
                _block(2 * width, 4 * width),
            ]
        )
        self.feature_dim = 4 * width
        self.classifier = nn.Conv2d(self.feature_dim, num_classes, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


@MODELS.register("fcn-small")
def fcn_small(num_classes: int = 2, in_channels: int = 1, width: int = 16) -> FCNSmall:
    return FCNSmall(num_classes=num_classes, in_channels=in_channels, width=width)
