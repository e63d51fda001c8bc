"""Task models: the interface strategies rely on, and fidelity to the reference networks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradnorm_al import ConfigError, UnknownNameError, create_model
from gradnorm_al.models import MODELS, DenseTaskModel, TaskModel
from gradnorm_al.models.resnet_cifar import BasicBlock

SHAPES = {
    "smallcnn": (1, 8, 8),
    "resnet18-cifar": (3, 32, 32),
    "resnet18": (3, 64, 64),
    "vgg16": (3, 32, 32),
    "vit-small-cifar": (3, 32, 32),
    "vit-b-16": (3, 224, 224),
    # dense models: odd sizes, so that the upsampling back to the input size is tested
    "fcn-small": (1, 13, 11),
    "drn-d-22": (3, 27, 21),
    # volumes [C, D, H, W]: a small non-cubic one (the 32^3 forward is tested below)
    "cnn3d": (1, 16, 18, 20),
    "resnet3d": (1, 16, 18, 20),
}
DENSE = {"fcn-small", "drn-d-22"}
SLOW = {"vit-b-16"}  # 86.6M parameters at 224x224: ~8 s here


def test_the_contract_tests_cover_every_registered_model():
    assert set(SHAPES) == set(MODELS.names())


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name
        for name in sorted(set(SHAPES) - DENSE)
    ],
)
def test_every_classifier_offers_embed_and_a_linear_classifier(name):
    assert name in MODELS.names()
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, in_channels=SHAPES[name][0]).eval()
    assert isinstance(model, TaskModel) and isinstance(model.classifier, nn.Linear)
    assert model.dense is False
    x = torch.randn(2, *SHAPES[name])
    with torch.no_grad():
        feats = model.embed(x)
        logits = model(x)
    assert feats.shape == (2, model.feature_dim) and logits.shape == (2, 7)
    assert torch.allclose(model.classifier(feats), logits)
    # intermediate features for learning loss and the like
    assert len(getattr(model, "stages", getattr(model, "blocks", []))) >= 3


@pytest.mark.parametrize("name", sorted(DENSE))
def test_every_dense_model_offers_features_embed_and_a_1x1_classifier(name):
    torch.manual_seed(0)
    c, h, w = SHAPES[name]
    model = create_model(name, num_classes=7, in_channels=c).eval()
    assert isinstance(model, DenseTaskModel) and not isinstance(model, TaskModel)
    assert model.dense is True
    head = model.classifier
    assert isinstance(head, nn.Conv2d) and head.kernel_size == (1, 1)
    assert (head.in_channels, head.out_channels) == (model.feature_dim, 7)
    x = torch.randn(2, c, h, w)
    with torch.no_grad():
        fmap = model.features(x)
        feats = model.embed(x)
        logits = model(x)
    assert fmap.dim() == 4 and fmap.shape[:2] == (2, model.feature_dim)
    assert feats.shape == (2, model.feature_dim) and logits.shape == (2, 7, h, w)
    assert torch.allclose(feats, fmap.mean(dim=(2, 3)))
    upsampled = F.interpolate(head(fmap), size=(h, w), mode="bilinear", align_corners=False)
    assert torch.allclose(upsampled, logits)
    # samples do not interact in eval mode (per-sample gradients are defined)
    with torch.no_grad():
        assert torch.allclose(model(x[1:]), logits[1:], atol=1e-6)
    assert len(getattr(model, "stages", getattr(model, "blocks", []))) >= 3


def test_drn_d_22_has_the_published_size_and_the_d_design():
    # Published: 16.4M parameters for DRN-D-22 (README of github.com/fyu/drn, ImageNet table
    # "DRN-D-22 | 25.8% | 8.2% | 16.4M"), the backbone with its 1000-class 1x1-conv classifier.
    model = create_model("drn-d-22", num_classes=1000, in_channels=3)
    total = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for p in model.classifier.parameters())
    assert head == 512 * 1000 + 1000
    assert round(total / 1e6, 1) == 16.4
    assert total - head == 15_880_752  # the backbone (levels 1-8) alone
    # Cityscapes' 19 classes: the backbone plus a 512 x 19 1x1 convolution with bias
    seg = create_model("drn-d-22", num_classes=19, in_channels=3)
    assert sum(p.numel() for p in seg.parameters()) == 15_880_752 + 512 * 19 + 19

    levels = list(model.stages)
    assert len(levels) == 8
    # degridding: levels 1-2 and 7-8 are plain convolutions, 3-6 residual blocks [2, 2, 2, 2]
    blocks = [[m for m in lv if isinstance(m, BasicBlock)] for lv in levels]
    assert [len(b) for b in blocks] == [0, 0, 2, 2, 2, 2, 0, 0]
    convs = [[m for m in lv.modules() if isinstance(m, nn.Conv2d)] for lv in levels]
    assert [len(cs) for cs in convs[:2] + convs[6:]] == [2, 1, 1, 1]
    assert convs[0][0].kernel_size == (7, 7)
    dilations = [{cv.dilation[0] for cv in cs if cv.kernel_size == (3, 3)} for cs in convs]
    assert dilations == [{1}, {1}, {1}, {1}, {2}, {4}, {2}, {1}]
    assert all(cv.bias is None for cs in convs for cv in cs)
    widths = [cs[-1].out_channels for cs in convs]
    assert widths == [16, 32, 64, 128, 256, 512, 512, 512]
    # output stride 8
    with torch.no_grad():
        assert model.eval().features(torch.randn(1, 3, 64, 48)).shape == (1, 512, 8, 6)


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


@pytest.mark.usefixtures("one_thread")  # small networks: see conftest
def test_the_vision_transformers_are_torchvision_s_networks():
    from torchvision.models import VisionTransformer, vit_b_16

    # vit-b-16: torchvision's vit_b_16 parameter for parameter (86.6M with 1000 classes;
    # built without storage: only the shapes are compared)
    with torch.device("meta"):
        model = create_model("vit-b-16", num_classes=1000, in_channels=3)
        assert _parameters(model) == _parameters(vit_b_16(weights=None)) == 86_567_656
    assert len(model.blocks) == 12 and model.feature_dim == 768
    # vit-small-cifar computes torchvision's network of its configuration
    torch.manual_seed(0)
    small = create_model("vit-small-cifar", num_classes=5, in_channels=3).eval()
    torch.manual_seed(0)
    reference = VisionTransformer(
        image_size=32,
        patch_size=4,
        num_layers=6,
        num_heads=3,
        hidden_dim=192,
        mlp_dim=768,
        num_classes=5,
    ).eval()
    assert _parameters(small) == _parameters(reference)
    with torch.no_grad():
        for p in reference.heads.parameters():  # torchvision's head starts at zero
            p.normal_()
        small.classifier.load_state_dict(reference.heads.head.state_dict())
        x = torch.randn(2, 3, 32, 32)
        assert torch.allclose(small(x), reference(x), atol=1e-5)
        # embed: the class token after the final LayerNorm
        tokens = reference.encoder(
            torch.cat([reference.class_token.expand(2, -1, -1), reference._process_input(x)], 1)
        )
        assert torch.allclose(small.embed(x), tokens[:, 0], atol=1e-5)
    # one input channel; another image size by the model parameter, a wrong one refused
    gray = create_model("vit-small-cifar", num_classes=3, in_channels=1, image_size=28).eval()
    with torch.no_grad():
        assert gray(torch.randn(2, 1, 28, 28)).shape == (2, 3)
    with pytest.raises(ConfigError, match="image_size"):
        gray(torch.randn(2, 1, 32, 32))


def test_other_input_channels_and_unknown_names():
    model = create_model("resnet18", num_classes=3, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 48, 48)).shape == (2, 3)
    with pytest.raises(UnknownNameError, match="vgg16"):
        create_model("vgg-16", num_classes=3, in_channels=3)


def _parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_cnn3d_has_the_hand_counted_size():
    # three blocks of two 3x3x3 convolutions without bias (1 -> 32 -> 32, 32 -> 64 -> 64,
    # 64 -> 128 -> 128), a BatchNorm (weight + bias) after each, dense 128 -> 256, head 256 -> 10
    convs = 27 * (1 * 32 + 32 * 32 + 32 * 64 + 64 * 64 + 64 * 128 + 128 * 128)
    norms = 2 * (32 + 32 + 64 + 64 + 128 + 128)
    assert convs + norms + (128 * 256 + 256) + (256 * 10 + 10) == 894_442
    model = create_model("cnn3d", num_classes=10, in_channels=1)
    assert _parameters(model) == 894_442
    convs = [m for m in model.modules() if isinstance(m, nn.Conv3d)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64, 128, 128]
    assert all(c.kernel_size == (3, 3, 3) and c.bias is None for c in convs)
    assert sum(isinstance(m, nn.BatchNorm3d) for m in model.modules()) == 6
    assert sum(isinstance(m, nn.MaxPool3d) for m in model.modules()) == 3
    assert model.dropout.p == 0.5 and model.feature_dim == 256
    # width scales every channel count: 8 -> 16 -> 32 channels, dense 32 -> 256
    small = create_model("cnn3d", num_classes=4, in_channels=1, width=8)
    convs = 27 * (8 + 8 * 8 + 8 * 16 + 16 * 16 + 16 * 32 + 32 * 32)
    assert _parameters(small) == convs + 2 * (8 + 8 + 16 + 16 + 32 + 32) + 32 * 256 + 256 + 1028


def test_resnet3d_has_the_hand_counted_size():
    # stem 3x3x3 1 -> 16 + BN; one BasicBlock per stage, widths 16, 32, 64, 128; the last three
    # stages start with stride 2 and a 1x1x1 conv + BN shortcut; linear head 128 -> 10
    def block(c_in: int, c_out: int) -> int:
        shortcut = c_in * c_out + 2 * c_out if c_in != c_out else 0
        return 27 * c_in * c_out + 27 * c_out * c_out + 2 * 2 * c_out + shortcut

    stem = 27 * 16 + 2 * 16
    stages = block(16, 16) + block(16, 32) + block(32, 64) + block(64, 128)
    assert stem + stages + 128 * 10 + 10 == 898_650
    model = create_model("resnet3d", num_classes=10, in_channels=1)
    assert _parameters(model) == 898_650
    strides = [b.conv1.stride for stage in model.stages for b in stage]
    assert strides == [(1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2)]
    assert all(isinstance(b, BasicBlock) for stage in model.stages for b in stage)
    # ResNet-18's layout: two blocks per stage
    deeper = create_model("resnet3d", num_classes=10, in_channels=1, num_blocks=(2, 2, 2, 2))
    extra = block(16, 16) + block(32, 32) + block(64, 64) + block(128, 128)
    assert _parameters(deeper) == 898_650 + extra


@pytest.mark.parametrize("name", ["cnn3d", "resnet3d"])
def test_volume_models_take_32_cubed_subtomograms_and_refuse_images(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=6, in_channels=1).eval()
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        logits = model(x)
        assert logits.shape == (2, 6) and model.embed(x).shape == (2, model.feature_dim)
        # samples do not interact in eval mode; another cube size (>= 16) works too
        assert torch.allclose(model(x[1:]), logits[1:], atol=1e-5)
        assert model(torch.randn(3, 1, 16, 16, 16)).shape == (3, 6)
    # an image batch [N, C, H, W] would be read by Conv3d as one unbatched volume: refused
    with pytest.raises(ConfigError, match=r"volumes \[N, C, D, H, W\].*\(1, 1, 32, 32\)"):
        model(torch.randn(1, 1, 32, 32))
