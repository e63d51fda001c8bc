"""A small 3-D ResNet for subtomograms [N, 1, D, H, W]: the 3-D ResNets of Hara, Kataoka & Satoh
(CVPR 2018, "Can Spatiotemporal 3D CNNs Retrace the Historical Footsteps of 2D CNNs and
ImageNet?": ResNet-10/18 with 3x3x3 BasicBlocks) laid out like the CIFAR ResNet of the paper's
code for small inputs: a 3x3x3 stride-1 stem without max-pooling, four stages of
:class:`~gradnorm_al.models.resnet_cifar.BasicBlock` (``dims=3``) with widths ``width`` x
(1, 2, 4, 8) (16, 32, 64, 128 by default: a quarter of ResNet's, for a CPU), the last three
starting with stride 2 (32^3 -> 4^3), global average pooling and a linear head. ``num_blocks``
(1, 1, 1, 1) is ResNet-10; (2, 2, 2, 2) is ResNet-18. Any input of at least 1 voxel per side.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import MODELS, TaskModel
from .cnn3d import check_volumes
from .resnet_cifar import BasicBlock


class ResNet3D(TaskModel):
    """``stages`` holds the four residual stages (feature taps)."""

    def __init__(
        self,
        num_blocks: tuple[int, ...] = (1, 1, 1, 1),
        num_classes: int = 10,
        in_channels: int = 1,
        width: int = 16,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm3d(width)
        stages = []
        c_in = width
        for i, n in enumerate(num_blocks):
            c_out = width * 2**i
            blocks = [
                BasicBlock(c_in if j == 0 else c_out, c_out, 2 if (i > 0 and j == 0) else 1, dims=3)
                for j in range(n)
            ]
            c_in = c_out
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.feature_dim = c_in
        self.classifier = nn.Linear(c_in, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        check_volumes(self, x)
        out = F.relu(self.bn1(self.conv1(x)))
        for stage in self.stages:
            out = stage(out)
        return torch.flatten(F.adaptive_avg_pool3d(out, 1), 1)


@MODELS.register("resnet3d")
def resnet3d(
    num_classes: int = 10,
    in_channels: int = 1,
    width: int = 16,
    num_blocks: tuple[int, ...] = (1, 1, 1, 1),
) -> ResNet3D:
    return ResNet3D(
        tuple(num_blocks), num_classes=num_classes, in_channels=in_channels, width=width
    )
