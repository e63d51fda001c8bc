"""The original ImageNet-style ResNet-18 and VGG-16 (torchvision's architectures, random init) as
task models, for 224x224 inputs (Caltech101 and ImageNet in the paper)."""

from __future__ import annotations

import torch
from torch import nn

from .base import MODELS, TaskModel


class ResNetImageNet(TaskModel):
    """torchvision's ResNet-18: 7x7 stride-2 stem with max-pool, BasicBlocks [2, 2, 2, 2], global
    average pooling, linear head. ``stages`` holds the four residual stages (intermediate
    features for learning loss and the like)."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3) -> None:
        super().__init__()
        from torchvision.models import resnet18

        net = resnet18(weights=None, num_classes=num_classes)
        if in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.stages = nn.ModuleList([net.layer1, net.layer2, net.layer3, net.layer4])
        self.pool = net.avgpool
        self.feature_dim = net.fc.in_features
        self.classifier = net.fc

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return torch.flatten(self.pool(x), 1)


class VGG16(TaskModel):
    """torchvision's VGG-16 (configuration D, no BatchNorm): 13 conv3x3 layers in five blocks
    separated by max-pooling, 7x7 adaptive average pooling, two 4096-wide hidden layers with ReLU
    and dropout 0.5, linear head. ``embed`` is the output of the second hidden layer (what the
    last linear layer sees); ``blocks`` are the five conv blocks."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3) -> None:
        super().__init__()
        from torchvision.models import vgg16

        net = vgg16(weights=None, num_classes=num_classes)
        layers = list(net.features)
        if in_channels != 3:
            layers[0] = nn.Conv2d(in_channels, 64, 3, padding=1)
        blocks, current = [], []
        for layer in layers:
            current.append(layer)
            if isinstance(layer, nn.MaxPool2d):
                blocks.append(nn.Sequential(*current))
                current = []
        self.blocks = nn.ModuleList(blocks)
        self.pool = net.avgpool
        self.hidden = nn.Sequential(*list(net.classifier)[:-1])
        self.feature_dim = net.classifier[-1].in_features
        self.classifier = net.classifier[-1]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.hidden(torch.flatten(self.pool(x), 1))


@MODELS.register("resnet18")
def resnet18(num_classes: int = 1000, in_channels: int = 3) -> ResNetImageNet:
    return ResNetImageNet(num_classes=num_classes, in_channels=in_channels)


@MODELS.register("vgg16")
def vgg16(num_classes: int = 1000, in_channels: int = 3) -> VGG16:
    return VGG16(num_classes=num_classes, in_channels=in_channels)
