"""Task models behind one registry: ``create_model(name, num_classes=..., in_channels=...)``."""

from . import (  # noqa: F401  (register the models)
    cnn3d,
    drn,
    fcn,
    imagenet_models,
    resnet3d,
    resnet_cifar,
    smallcnn,
    vit,
)
from .base import MODELS, DenseTaskModel, TaskModel, create_model

#: the registered per-pixel (segmentation) models
SEGMENTATION_MODELS = ("fcn-small", "drn-d-22")
#: the registered models for volumes [N, C, D, H, W] (3-D classification, e.g. subtomograms)
VOLUME_MODELS = ("cnn3d", "resnet3d")

__all__ = [
    "MODELS",
    "SEGMENTATION_MODELS",
    "VOLUME_MODELS",
    "DenseTaskModel",
    "TaskModel",
    "create_model",
]
