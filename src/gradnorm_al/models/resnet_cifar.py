"""The CIFAR ResNet-18 of the paper's code: 3x3 stem, no max-pool, BasicBlocks [2, 2, 2, 2].

:class:`BasicBlock` also serves the 3-D ResNet (``dims=3``, :mod:`.resnet3d`) and DRN-D."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import MODELS, TaskModel

#: convolution and BatchNorm classes by the number of spatial dimensions
CONV = {2: nn.Conv2d, 3: nn.Conv3d}
BATCHNORM = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


class BasicBlock(nn.Module):
    """Two (dilated) conv3x3-BN layers with a residual connection (1x1 conv-BN shortcut when the
    width or the stride changes), ReLU after the first layer and after the sum. ``dims=3``: the
    same block with 3x3x3 Conv3d / BatchNorm3d (1x1x1 shortcut) for volumes [N, C, D, H, W]."""

    expansion = 1

    def __init__(
        self, c_in: int, c_out: int, stride: int = 1, *, dilation: int = 1, dims: int = 2
    ) -> None:
        super().__init__()
        conv, norm, d = CONV[dims], BATCHNORM[dims], dilation
        self.conv1 = conv(c_in, c_out, 3, stride=stride, padding=d, dilation=d, bias=False)
        self.bn1 = norm(c_out)
        self.conv2 = conv(c_out, c_out, 3, stride=1, padding=d, dilation=d, bias=False)
        self.bn2 = norm(c_out)
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                conv(c_in, c_out, 1, stride=stride, bias=False), norm(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCIFAR(TaskModel):
    """ResNet for 32x32 inputs; ``stages`` holds the four residual stages (feature taps)."""

    def __init__(
        self,
        num_blocks: tuple[int, ...] = (2, 2, 2, 2),
        num_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        stages = []
        c_in = 64
        for i, n in enumerate(num_blocks):
            c_out = 64 * 2**i
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(c_in, c_out, stride=1 if (i == 0 or j > 0) else 2))
                c_in = c_out
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.feature_dim = c_in
        self.classifier = nn.Linear(c_in, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        for stage in self.stages:
            out = stage(out)
        # global average pooling (the published code's avg_pool2d(out, 4) on a 4x4 map)
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)


@MODELS.register("resnet18-cifar")
def resnet18_cifar(num_classes: int = 10, in_channels: int = 3) -> ResNetCIFAR:
    return ResNetCIFAR((2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels)
