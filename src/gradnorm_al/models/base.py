"""The model registry and the small interface every task model offers."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import Registry

ModelFactory = Callable[..., nn.Module]
MODELS: Registry[ModelFactory] = Registry("model")


class TaskModel(nn.Module):
    """A classifier split into a feature extractor and a linear head.

    ``embed(x)`` returns the penultimate-layer features [N, feature_dim] (what diversity strategies
    use); ``forward(x)`` returns logits [N, num_classes] = ``classifier(embed(x))``.
    """

    #: logits are [N, num_classes] (see :class:`DenseTaskModel` for [N, C, H, W])
    dense = False
    feature_dim: int
    classifier: nn.Linear

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


class DenseTaskModel(nn.Module):
    """A dense (per-pixel) predictor: a fully convolutional backbone, a 1x1 convolution to the
    classes and bilinear upsampling back to the input size.

    ``features(x)`` returns the backbone's feature map [N, feature_dim, h, w];
    ``forward(x)`` returns logits [N, num_classes, H, W] for an input [N, C_in, H, W], the
    bilinear upsampling (``align_corners=False``) of ``classifier(features(x))``;
    ``embed(x)`` returns the feature map averaged over its positions, [N, feature_dim] (what
    diversity strategies use, as for :class:`TaskModel`).
    """

    dense = True
    feature_dim: int
    classifier: nn.Conv2d

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(self.features(x))
        return F.interpolate(logits, size=x.shape[2:], mode="bilinear", align_corners=False)


def create_model(name: str, *, num_classes: int, in_channels: int, **kwargs) -> nn.Module:
    """Build the model registered as ``name`` (raises UnknownNameError listing known names)."""
    return MODELS.get(name)(num_classes=num_classes, in_channels=in_channels, **kwargs)
