"""A small BatchNorm CNN for small grey images (8x8 digits, 28x28 MNIST / Fashion-MNIST)."""

from __future__ import annotations

import torch
from torch import nn

from .base import MODELS, TaskModel


def _conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class SmallCNN(TaskModel):
    """Three conv blocks (conv3x3-BN-ReLU, the first two followed by 2x2 max-pooling) and a linear
    head on globally average-pooled features. Works for any input size >= 4x4.

    ``blocks`` is a ModuleList so that methods needing intermediate features can hook each block.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [
                nn.Sequential(_conv_bn_relu(in_channels, width), nn.MaxPool2d(2)),
                nn.Sequential(_conv_bn_relu(width, 2 * width), nn.MaxPool2d(2)),
                _conv_bn_relu(2 * width, 4 * width),
            ]
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = 4 * width
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return torch.flatten(self.pool(x), 1)


@MODELS.register("smallcnn")
def smallcnn(num_classes: int = 10, in_channels: int = 1, width: int = 32) -> SmallCNN:
    return SmallCNN(num_classes=num_classes, in_channels=in_channels, width=width)
