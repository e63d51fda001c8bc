"""Vision transformers (torchvision's ``VisionTransformer``, random init) as task models:
``vit-b-16`` for 224x224 inputs and ``vit-small-cifar`` for 32x32 ones.

The network is torchvision's own module (patch convolution, class token, encoder with positional
table and final LayerNorm) with its head split off: ``embed(x)`` is the class token's
representation after the final LayerNorm (what torchvision's head reads), ``classifier`` the
linear head. The per-sample gradient engine knows these exact modules (see
:mod:`gradnorm_al.pergrad.attention`), so scoring stays on its batched path.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
from torch import nn

from ..errors import ConfigError
from ..options import Range
from .base import MODELS, TaskModel


class ViT(TaskModel):
    """torchvision's ``VisionTransformer`` with ``heads`` made an identity and its head as
    ``classifier``; ``blocks`` are the encoder blocks, in order (their outputs are tokens
    [N, L, D]: ``token_features``, which ll4al pools over L). Parameter for parameter the
    torchvision network (with ``num_classes`` outputs and ``in_channels`` input channels).

    Its sequence length is fixed by ``image_size``: other input sizes raise ConfigError (set the
    model parameter ``image_size``, a multiple of ``patch_size``)."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        *,
        image_size: int,
        patch_size: int,
        num_layers: int,
        num_heads: int,
        hidden_dim: int,
        mlp_dim: int,
    ) -> None:
        super().__init__()
        from torchvision.models import VisionTransformer

        if image_size % patch_size:
            raise ConfigError(
                f"image_size {image_size} is not a multiple of the patch size {patch_size}"
            )
        net = VisionTransformer(
            image_size=image_size,
            patch_size=patch_size,
            num_layers=num_layers,
            num_heads=num_heads,
            hidden_dim=hidden_dim,
            mlp_dim=mlp_dim,
            num_classes=num_classes,
        )
        if in_channels != 3:
            conv = nn.Conv2d(in_channels, hidden_dim, patch_size, stride=patch_size)
            # torchvision's initialisation of the patch convolution
            fan_in = in_channels * patch_size * patch_size
            nn.init.trunc_normal_(conv.weight, std=math.sqrt(1 / fan_in))
            nn.init.zeros_(conv.bias)
            net.conv_proj = conv
        self.classifier = net.heads.head
        net.heads = nn.Identity()
        self.net = net
        self.blocks = net.encoder.layers
        self.token_features = True  # the blocks give [N, L, D], not feature maps [N, C, ...]
        self.feature_dim = hidden_dim
        self.image_size = image_size

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            raise ConfigError(
                f"this vision transformer takes {self.image_size}x{self.image_size} images, got "
                f"{x.shape[-2]}x{x.shape[-1]}; set the model parameter image_size (a labelling "
                f"project: create it with image_size {self.image_size})"
            )
        return self.net(x)


@MODELS.register("vit-b-16")
def vit_b_16(
    num_classes: int = 1000,
    in_channels: int = 3,
    image_size: Annotated[int, Range(16)] = 224,
) -> ViT:
    """ViT-B/16 (Dosovitskiy et al. 2021; torchvision's ``vit_b_16``): 16x16 patches, 12
    layers, 12 heads, width 768, MLP 3072; 86.6M parameters with 1000 classes."""
    return ViT(
        num_classes,
        in_channels,
        image_size=image_size,
        patch_size=16,
        num_layers=12,
        num_heads=12,
        hidden_dim=768,
        mlp_dim=3072,
    )


@MODELS.register("vit-small-cifar")
def vit_small_cifar(
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: Annotated[int, Range(4)] = 32,
    num_layers: Annotated[int, Range(1)] = 6,
) -> ViT:
    """A small ViT for 32x32 images: 4x4 patches (64 tokens and the class token), DeiT-Tiny's
    width (192, 3 heads of 64, MLP 768) and 6 layers: 2.7M parameters.

    Why: the width is the one that trains from scratch on CIFAR-10 in published small-ViT
    configurations (patch 4, width 192, 3 heads, MLP 768, 12 layers: about 82% test accuracy,
    5.4M parameters); half their depth halves the cost, so that a forward pass costs about a
    third of ``resnet18-cifar``'s (about 0.18 GMAC per image) and active-learning cycles stay
    practical on a CPU. ``num_layers`` restores the depth where compute allows."""
    return ViT(
        num_classes,
        in_channels,
        image_size=image_size,
        patch_size=4,
        num_layers=num_layers,
        num_heads=3,
        hidden_dim=192,
        mlp_dim=768,
    )
