"""A 3-D CNN for cryo-ET subtomograms [N, 1, D, H, W] (32^3 in the field's benchmarks).

It follows DSRF3D-v2 (Che, Lin, Zeng, Elmaaroufi, Galeotti & Xu, "Improved deep learning-based
macromolecules structure classification from electron cryo-tomograms", Machine Vision and
Applications 2018; the successor of DSRF3D in Xu et al., Bioinformatics 2017, both from the
group of the paper's cryo-ET experiments): a VGG-style stack of three blocks, each two
3x3x3 convolutions (``width``, 2 ``width``, 4 ``width`` channels: 32, 64, 128 published) followed
by 2x2x2 max-pooling, every convolution followed by BatchNorm and ReLU, then fully connected
layers with dropout and a softmax classifier. The published layer layout was read from the
authors' Keras code (xulabs/projects, ``improved_classification/subdivide.py``).

Changed from the published network, so that it takes any volume of at least 8 voxels per side
(not only 32^3) and stays small enough for a CPU:

* global average pooling (``AdaptiveAvgPool3d(1)``) over the last block's map instead of
  flattening it (on 32^3 the flattened 4x4x4x128 = 8,192 features would feed an 8.4M-parameter
  first dense layer, ten times the rest of the network);
* one hidden dense layer of ``hidden`` (256) units with ReLU and dropout ``dropout`` (0.5)
  instead of two of 1,024 units with dropout 0.7 each;
* convolutions without bias (each is followed by BatchNorm, which has its own shift).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .base import MODELS, TaskModel


def _conv_bn_relu3d(c_in: int, c_out: int) -> list[nn.Module]:
    return [
        nn.Conv3d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm3d(c_out),
        nn.ReLU(inplace=True),
    ]


def check_volumes(model: nn.Module, x: torch.Tensor) -> None:
    """ConfigError unless ``x`` is a batch of volumes [N, C, D, H, W] (a 2-D batch [N, C, H, W]
    would be read by Conv3d as one unbatched volume, silently)."""
    if x.dim() != 5:
        raise ConfigError(
            f"{type(model).__name__} takes volumes [N, C, D, H, W], got a batch of shape "
            f"{tuple(x.shape)}; use a 3-D dataset, or a 2-D model for images"
        )


class CNN3D(TaskModel):
    """DSRF3D-v2-style 3-D CNN (see the module docs); ``blocks`` holds the three conv blocks
    (feature taps), ``embed`` ends at the hidden dense layer (after its dropout)."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        width: int = 32,
        hidden: int = 256,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        widths = [width, 2 * width, 4 * width]
        blocks = []
        c_in = in_channels
        for c in widths:
            blocks.append(
                nn.Sequential(*_conv_bn_relu3d(c_in, c), *_conv_bn_relu3d(c, c), nn.MaxPool3d(2))
            )
            c_in = c
        self.blocks = nn.ModuleList(blocks)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(widths[-1], hidden)
        self.dropout = nn.Dropout(dropout)
        self.feature_dim = hidden
        self.classifier = nn.Linear(hidden, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        check_volumes(self, x)
        for block in self.blocks:
            x = block(x)
        x = torch.flatten(self.pool(x), 1)
        return self.dropout(torch.relu(self.fc(x)))


@MODELS.register("cnn3d")
def cnn3d(
    num_classes: int = 10,
    in_channels: int = 1,
    width: int = 32,
    hidden: int = 256,
    dropout: float = 0.5,
) -> CNN3D:
    return CNN3D(num_classes, in_channels, width=width, hidden=hidden, dropout=dropout)
