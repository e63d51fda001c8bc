"""DRN-D-22, the dilated residual network of Yu, Koltun & Funkhouser, "Dilated Residual Networks"
(CVPR 2017), for semantic segmentation: the network the GradNorm paper uses on Cityscapes.

Written from the paper's description (variant D, "degridding"); widths, layer counts and
dilations are those of the authors' ``drn_d_22``. Eight levels, output stride 8:

====== ============================================= ======== ====== ========
level  what                                          channels stride dilation
====== ============================================= ======== ====== ========
1      conv7x7-BN-ReLU, then conv3x3-BN-ReLU          16       1      1
2      conv3x3-BN-ReLU                                32       2      1
3      2 residual BasicBlocks                         64       2      1
4      2 residual BasicBlocks                         128      2      1
5      2 residual BasicBlocks                         256      1      2
6      2 residual BasicBlocks                         512      1      4
7      conv3x3-BN-ReLU (no residual connection)       512      1      2
8      conv3x3-BN-ReLU (no residual connection)       512      1      1
====== ============================================= ======== ====== ========

Variant D replaces the first levels' max-pooling residual blocks by plain convolutions, and the
last two levels without residual connections remove the gridding artefacts of the dilations.
Every convolution is bias-free and followed by BatchNorm; a block whose width or stride changes
gets a 1x1 convolution + BatchNorm on its shortcut. For segmentation the backbone is followed by
a 1x1 convolution (with bias) to the classes and bilinear upsampling back to the input size.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import MODELS, DenseTaskModel
from .resnet_cifar import BasicBlock

#: level widths of DRN-D-22
DRN_D_CHANNELS = (16, 32, 64, 128, 256, 512, 512, 512)
#: convolutions (levels 1, 2, 7, 8) or BasicBlocks (levels 3-6) per level of DRN-D-22
DRN_D_22_LAYERS = (1, 1, 2, 2, 2, 2, 1, 1)


def _conv_bn_relu(c_in: int, c_out: int, *, stride: int = 1, dilation: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]


class DRNSeg(DenseTaskModel):
    """DRN-D for segmentation (see the module docstring). ``stages`` holds the eight levels
    (feature taps); ``features(x)`` is the output of level 8, [N, 512, ceil(H/8), ceil(W/8)]."""

    def __init__(
        self,
        layers: tuple[int, ...] = DRN_D_22_LAYERS,
        num_classes: int = 19,
        in_channels: int = 3,
        channels: tuple[int, ...] = DRN_D_CHANNELS,
    ) -> None:
        super().__init__()
        if len(layers) != 8 or len(channels) != 8:
            raise ValueError("DRN-D has eight levels: give eight layer counts and eight widths")
        c = channels

        def convs(c_in: int, c_out: int, n: int, stride: int = 1, dilation: int = 1) -> list:
            mods = []
            for i in range(n):
                mods += _conv_bn_relu(
                    c_in if i == 0 else c_out,
                    c_out,
                    stride=stride if i == 0 else 1,
                    dilation=dilation,
                )
            return mods

        def blocks(c_in: int, c_out: int, n: int, stride: int = 1, dilation: int = 1) -> list:
            return [
                BasicBlock(
                    c_in if i == 0 else c_out,
                    c_out,
                    stride=stride if i == 0 else 1,
                    dilation=dilation,
                )
                for i in range(n)
            ]

        stem = [
            nn.Conv2d(in_channels, c[0], 7, padding=3, bias=False),
            nn.BatchNorm2d(c[0]),
            nn.ReLU(inplace=True),
        ]
        levels = [
            stem + convs(c[0], c[0], layers[0]),
            convs(c[0], c[1], layers[1], stride=2),
            blocks(c[1], c[2], layers[2], stride=2),
            blocks(c[2], c[3], layers[3], stride=2),
            blocks(c[3], c[4], layers[4], dilation=2),
            blocks(c[4], c[5], layers[5], dilation=4),
            convs(c[5], c[6], layers[6], dilation=2),
            convs(c[6], c[7], layers[7]),
        ]
        self.stages = nn.ModuleList(nn.Sequential(*level) for level in levels)
        self.feature_dim = c[7]
        self.classifier = nn.Conv2d(c[7], num_classes, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m is not self.classifier:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return x


@MODELS.register("drn-d-22")
def drn_d_22(num_classes: int = 19, in_channels: int = 3) -> DRNSeg:
    return DRNSeg(DRN_D_22_LAYERS, num_classes=num_classes, in_channels=in_channels)
