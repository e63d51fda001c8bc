"""Task models behind one registry: ``create_model(name, num_classes=..., in_channels=...)``."""

from . import drn, fcn, imagenet_models, resnet_cifar, smallcnn  # noqa: F401  (register the models)
from .base import MODELS, DenseTaskModel, TaskModel, create_model

#: the registered per-pixel (segmentation) models
SEGMENTATION_MODELS = ("fcn-small", "drn-d-22")

__all__ = ["MODELS", "SEGMENTATION_MODELS", "DenseTaskModel", "TaskModel", "create_model"]
