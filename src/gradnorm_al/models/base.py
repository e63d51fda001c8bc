"""The model registry and the small interface every task model offers."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..registry import Registry

ModelFactory = Callable[..., nn.Module]
MODELS: Registry[ModelFactory] = Registry("model")


class TaskModel(nn.Module):
    """A classifier split into a feature extractor and a linear head.

    ``embed(x)`` returns the penultimate-layer features [N, feature_dim] (what diversity strategies
    use); ``forward(x)`` returns logits [N, num_classes] = ``classifier(embed(x))``.
    """

    feature_dim: int
    classifier: nn.Linear

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


def create_model(name: str, *, num_classes: int, in_channels: int, **kwargs) -> nn.Module:
    """Build the model registered as ``name`` (raises UnknownNameError listing known names)."""
    return MODELS.get(name)(num_classes=num_classes, in_channels=in_channels, **kwargs)
