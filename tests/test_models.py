"""Task models: the interface strategies rely on, and fidelity to the reference networks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradnorm_al import UnknownNameError, create_model
from gradnorm_al.models import MODELS, TaskModel

SHAPES = {
    "smallcnn": (1, 8, 8),
    "resnet18-cifar": (3, 32, 32),
    "resnet18": (3, 64, 64),
    "vgg16": (3, 32, 32),
}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_every_model_offers_embed_and_a_linear_classifier(name):
    assert name in MODELS.names()
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, in_channels=SHAPES[name][0]).eval()
    assert isinstance(model, TaskModel) and isinstance(model.classifier, nn.Linear)
    x = torch.randn(2, *SHAPES[name])
    with torch.no_grad():
        feats = model.embed(x)
        logits = model(x)
    assert feats.shape == (2, model.feature_dim) and logits.shape == (2, 7)
    assert torch.allclose(model.classifier(feats), logits)
    # intermediate features for learning loss and the like
    assert len(getattr(model, "stages", getattr(model, "blocks", []))) >= 3


def test_resnet18_and_vgg16_compute_torchvision_s_networks():
    from torchvision.models import resnet18, vgg16

    for ours, theirs, size in (("resnet18", resnet18, 64), ("vgg16", vgg16, 32)):
        torch.manual_seed(0)
        model = create_model(ours, num_classes=5, in_channels=3).eval()
        torch.manual_seed(0)
        reference = theirs(weights=None, num_classes=5).eval()
        assert sum(p.numel() for p in model.parameters()) == sum(
            p.numel() for p in reference.parameters()
        )
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            assert torch.allclose(model(x), reference(x), atol=1e-6)


def test_other_input_channels_and_unknown_names():
    model = create_model("resnet18", num_classes=3, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 48, 48)).shape == (2, 3)
    with pytest.raises(UnknownNameError, match="vgg16"):
        create_model("vgg-16", num_classes=3, in_channels=3)
