"""Task models behind one registry: ``create_model(name, num_classes=..., in_channels=...)``."""

from . import drn, fcn, imagenet_models, resnet_cifar, smallcnn  # noqa: F401  (register the models)
from .base import MODELS, DenseTaskModel, TaskModel, create_model

__all__ = ["MODELS", "DenseTaskModel", "TaskModel", "create_model"]
