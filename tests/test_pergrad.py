"""The per-sample gradient-norm engine against one backward pass per sample (float64, 1e-12 of
the scale of the whole result)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import TwoHeads, assert_close_to_scale, randomise_bn
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gradnorm_al.models import create_model
from gradnorm_al.pergrad import (
    FallbackWarning,
    per_sample_grad_norms,
    per_sample_grad_norms_loop,
)
from gradnorm_al.pergrad import layers as layer_rules
from gradnorm_al.strategies import entropy_loss

NORMS = ["tensor-sum", "l2", "per-tensor"]


# float64 agreement with the loop, against the scale of the whole result (conftest's
# assert_close_to_scale): a column that is zero in exact arithmetic is rounding noise
EXACT = 1e-12


def _assert_exact(
    model, x, *, norms=NORMS, loss_fn=entropy_loss, chunk_size=None, warn=False, rel=EXACT
):
    per_tensor = per_sample_grad_norms_loop(model, x, loss_fn, norm="per-tensor")
    refs = {
        "per-tensor": per_tensor,
        "tensor-sum": per_tensor.sum(1),
        "l2": per_tensor.pow(2).sum(1).sqrt(),
    }
    for norm in norms:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ours = per_sample_grad_norms(model, x, loss_fn, norm=norm, chunk_size=chunk_size)
        assert any(issubclass(w.category, FallbackWarning) for w in caught) == warn, [
            str(w.message) for w in caught
        ]
        ref = refs[norm]
        assert ours.shape == ref.shape and ours.dtype == torch.float64
        assert_close_to_scale(ours, ref, rel=rel, msg=norm)
        assert ref.sum() > 0


class Head(nn.Module):
    """body -> flatten -> linear classifier (the body's output shape decides the head size)."""

    def __init__(self, body: nn.Module, example: torch.Tensor, num_classes: int = 4) -> None:
        super().__init__()
        self.body = body
        with torch.no_grad():
            width = body.eval()(example).flatten(1).shape[1]
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(self.body(x).flatten(1))


def _net(body: nn.Module, shape: tuple[int, ...], n: int = 5, seed: int = 0):
    torch.manual_seed(seed)
    x = torch.randn(n, *shape, dtype=torch.float64)
    model = Head(body.double(), x[:2]).double()
    return randomise_bn(model, seed).double(), x


LAYER_CASES = {
    "linear": (lambda: nn.Sequential(nn.Linear(6, 7), nn.Tanh()), (6,)),
    "linear-leading-dims": (lambda: nn.Sequential(nn.Linear(6, 5), nn.Tanh()), (4, 6)),
    "linear-no-bias": (lambda: nn.Linear(6, 5, bias=False), (3, 6)),
    "conv1d": (
        lambda: nn.Sequential(
            nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2), nn.Tanh()
        ),
        (4, 11),
    ),
    "conv2d": (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU()),
        (3, 7, 7),
    ),
    "conv2d-channels-over-columns": (  # the channels-last im2col (C_in >= output width)
        lambda: nn.Sequential(
            nn.Conv2d(6, 4, 3, stride=2, padding=2, dilation=2), nn.Tanh(), nn.Conv2d(4, 3, 2)
        ),
        (6, 5, 5),
    ),
    "conv2d-kernel-rows": (  # channels-last, stride 1 along the height: kernel-row im2col
        lambda: nn.Sequential(
            nn.Conv2d(6, 5, (3, 2), stride=(1, 2), padding=(2, 1), dilation=(2, 2)),
            nn.BatchNorm2d(5),
            nn.Tanh(),
            nn.Conv2d(5, 3, 3, padding=1),
        ),
        (6, 6, 7),
    ),
    "conv2d-dilated-grouped": (
        lambda: nn.Conv2d(4, 6, (3, 2), stride=(1, 2), padding=(2, 1), dilation=(2, 1), groups=2),
        (4, 6, 6),
    ),
    "conv2d-reflect-same": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, 4, padding="same", padding_mode="reflect"),
            nn.Tanh(),
            nn.Conv2d(3, 3, 2, padding="same"),
            nn.Conv2d(3, 2, 3, padding="valid"),
        ),
        (2, 6, 6),
    ),
    "conv3d": (
        lambda: nn.Sequential(nn.Conv3d(2, 3, 3, stride=(1, 2, 2), padding=1), nn.Tanh()),
        (2, 4, 5, 5),
    ),
    "conv3d-strided-dilated-grouped": (
        lambda: nn.Sequential(
            nn.Conv3d(
                4, 6, (3, 2, 3), stride=(2, 1, 2), padding=(2, 1, 0), dilation=(2, 1, 1), groups=2
            ),
            nn.Tanh(),
            nn.Conv3d(6, 3, 2, padding="same", padding_mode="replicate"),
        ),
        (4, 7, 6, 7),
    ),
    "conv3d-batchnorm3d-pools": (  # eval-mode BatchNorm3d and every 3-D pooling in between
        lambda: nn.Sequential(
            nn.Conv3d(2, 4, 3, padding=1, bias=False),
            nn.BatchNorm3d(4),
            nn.ReLU(inplace=True),
            nn.MaxPool3d(2),
            nn.Conv3d(4, 5, 2, padding=1),
            nn.BatchNorm3d(5),
            nn.Tanh(),
            nn.AvgPool3d(2, stride=1),
            nn.AdaptiveAvgPool3d(2),
        ),
        (2, 6, 7, 6),
    ),
    "conv-transpose2d": (
        lambda: nn.Sequential(
            nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2), nn.Tanh()
        ),
        (4, 3, 3),
    ),
    "conv-transpose1d": (lambda: nn.ConvTranspose1d(3, 2, 4, stride=3, dilation=2), (3, 5)),
    "batchnorm1d-2d-input": (
        lambda: nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh()),
        (6,),
    ),
    "batchnorm1d-3d-input": (
        lambda: nn.Sequential(nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4), nn.ReLU()),
        (3, 6),
    ),
    "batchnorm2d-inplace-relu": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(inplace=True)
        ),
        (2, 6, 6),
    ),
    "batchnorm2d-one-channel-one-pixel": (  # a [N, 1, 1, 1] BatchNorm (found by hypothesis)
        lambda: nn.Sequential(
            nn.Conv2d(1, 1, 3, dilation=2, bias=False), nn.BatchNorm2d(1), nn.Tanh()
        ),
        (1, 5, 5),
    ),
    "batchnorm3d": (
        lambda: nn.Sequential(nn.Conv3d(1, 2, 2), nn.BatchNorm3d(2), nn.Tanh()),
        (1, 3, 3, 3),
    ),
    "layernorm": (lambda: nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Tanh()), (3, 5)),
    "layernorm-2d-no-bias": (
        lambda: nn.Sequential(nn.Conv2d(2, 3, 1), nn.LayerNorm([3, 4, 4], bias=False)),
        (2, 4, 4),
    ),
    "groupnorm": (
        lambda: nn.Sequential(nn.Conv2d(2, 6, 3), nn.GroupNorm(3, 6), nn.Tanh()),
        (2, 5, 5),
    ),
}


@pytest.mark.parametrize("case", sorted(LAYER_CASES))
@pytest.mark.parametrize("method", [None, "ghost", "materialize", "im2col", "grouped"])
def test_every_layer_matches_the_loop(case, method, monkeypatch):
    monkeypatch.setattr(layer_rules, "FORCE_METHOD", method)
    make, shape = LAYER_CASES[case]
    model, x = _net(make(), shape)
    _assert_exact(model, x)


CONV_CASES = sorted(c for c in LAYER_CASES if c.startswith("conv"))


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("method", [None, "im2col", "grouped"])
def test_blocks_of_one_sample_and_the_default_grouped_switch(case, method, monkeypatch):
    """Blocks of one sample (BLOCK_BYTES=1), and with IM2COL_BYTES=0 the default picks the
    grouped convolution backward wherever it would otherwise build an im2col."""
    monkeypatch.setattr(layer_rules, "FORCE_METHOD", method)
    monkeypatch.setattr(layer_rules, "BLOCK_BYTES", 1)
    monkeypatch.setattr(layer_rules, "IM2COL_BYTES", 0)
    make, shape = LAYER_CASES[case]
    model, x = _net(make(), shape)
    _assert_exact(model, x)


CONV3D_CASES = sorted(c for c in LAYER_CASES if c.startswith("conv3d"))


@pytest.mark.parametrize("case", CONV3D_CASES)
@pytest.mark.parametrize("slab_positions, block_bytes", [(1, 1), (20, 2**26)])
def test_3d_convolutions_in_slabs_of_depth_planes(case, slab_positions, block_bytes, monkeypatch):
    """Per-sample weight gradients of 3-D convolutions summed over slabs of output depth planes:
    one plane per slab (SLAB_POSITIONS=1) in blocks of one sample, and slabs of several planes
    with a short last one, all samples in one block."""
    monkeypatch.setattr(layer_rules, "SLAB_POSITIONS", slab_positions)
    monkeypatch.setattr(layer_rules, "VOLUME_BLOCK_BYTES", block_bytes)
    calls = []
    folded = layer_rules._folded_weight_grads
    monkeypatch.setattr(
        layer_rules, "_folded_weight_grads", lambda *a: calls.append(1) or folded(*a)
    )
    make, shape = LAYER_CASES[case]
    model, x = _net(make(), shape)
    _assert_exact(model, x)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv3d)]
    assert len(calls) > len(convs) * len(NORMS)  # some convolution was split


class Tokens(nn.Module):
    """Embedding with repeated tokens and a padding index, mean-pooled into a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4, padding_idx=0)
        self.norm = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, idx):
        return self.fc(self.norm(self.emb(idx)).mean(dim=1))


def test_embedding_with_repeated_indices_and_padding():
    torch.manual_seed(0)
    model = Tokens().double()
    idx = torch.tensor([[1, 1, 2, 0], [3, 0, 0, 3], [6, 5, 4, 3], [2, 2, 2, 2]])
    _assert_exact(model, idx)


@pytest.mark.parametrize(
    "name, shape",
    [
        ("smallcnn", (1, 10, 10)),
        ("resnet18-cifar", (3, 8, 8)),
        ("resnet18", (3, 32, 32)),
        pytest.param("vgg16", (3, 32, 32), marks=pytest.mark.slow),
    ],
)
def test_package_models(name, shape):
    torch.manual_seed(0)
    model = randomise_bn(create_model(name, num_classes=10, in_channels=shape[0])).double()
    if name == "vgg16":
        # 138M parameters: two samples in float32 against the float32 loop, the per-tensor norms
        # alone (chunking, float64 exactness and the reductions are checked on every other model)
        model, x = model.float(), torch.randn(2, *shape)
        _assert_exact(model, x, chunk_size=2, norms=["per-tensor"], rel=1e-5)
        return
    x = torch.randn(3, *shape, dtype=torch.float64)
    _assert_exact(model, x, chunk_size=2)


@pytest.mark.parametrize("name", ["cnn3d", "resnet3d"])
def test_volume_models(name, monkeypatch):
    # Conv3d (strided, 1x1x1 shortcuts), eval-mode BatchNorm3d (a first-layer one too), max and
    # adaptive average pooling, on the batched path. The first layers see 17 x 16 x 16 = 4352
    # output positions, more than SLAB_POSITIONS: their weight gradients are summed over slabs.
    calls = []
    folded = layer_rules._folded_weight_grads
    monkeypatch.setattr(
        layer_rules, "_folded_weight_grads", lambda *a: calls.append(a[2].shape) or folded(*a)
    )
    torch.manual_seed(0)
    model = randomise_bn(create_model(name, num_classes=5, in_channels=1)).double()
    x = torch.randn(3, 1, 17, 16, 16, dtype=torch.float64)
    _assert_exact(model, x, chunk_size=2, norms=["per-tensor"])
    # slabs of 4096 // (16 x 16) = 16 planes and 1 plane; no full-depth call for those layers
    depths = {tuple(shape[2:]) for shape in calls}
    assert {(16, 16, 16), (1, 16, 16)} <= depths and (17, 16, 16) not in depths


def dense_entropy(logits: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N]: per-pixel entropy (from log_softmax), averaged over each image."""
    log_p = F.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p).sum(dim=1).mean(dim=(1, 2))


@pytest.mark.parametrize(
    "name, shape, n",
    [("fcn-small", (1, 12, 10), 4), ("drn-d-22", (3, 32, 32), 3)],
)
def test_segmentation_models_with_the_dense_entropy_loss(name, shape, n):
    # dilated convolutions, strided ones, 1x1 shortcuts, eval-mode BatchNorm and a bilinear
    # upsampling: the batched engine against one backward per image, on the batched path (no
    # fallback warning), chunks of 2 and the whole batch
    torch.manual_seed(0)
    model = randomise_bn(create_model(name, num_classes=5, in_channels=shape[0])).double()
    x = torch.randn(n, *shape, dtype=torch.float64)
    torch.testing.assert_close(dense_entropy(model(x)), entropy_loss(model(x)))
    _assert_exact(model, x, loss_fn=dense_entropy, chunk_size=2)
    _assert_exact(model, x, loss_fn=dense_entropy, norms=["l2"])


@pytest.mark.parametrize(
    "name, shape, n",
    [("fcn-small", (1, 12, 10), 4), ("drn-d-22", (3, 32, 32), 3)],
)
def test_segmentation_models_with_the_true_mask_loss_and_ignored_pixels(name, shape, n):
    # the true-label loss of a segmentation image: its mean pixel cross-entropy over the pixels
    # that are not the ignore index; one image has no valid pixel at all (loss and gradient 0)
    from gradnorm_al.tasks import SegmentationTask

    task = SegmentationTask(5, ignore_index=255)
    torch.manual_seed(0)
    model = randomise_bn(create_model(name, num_classes=5, in_channels=shape[0])).double().eval()
    x = torch.randn(n, *shape, dtype=torch.float64)
    masks = torch.randint(0, 5, (n, *shape[1:]))
    masks[torch.rand(masks.shape) < 0.3] = 255
    masks[-1] = 255
    params = [p for p in model.parameters() if p.requires_grad]
    ref = []
    for i in range(n):  # one backward per image
        loss = task.per_sample_loss(model(x[i : i + 1]), masks[i : i + 1]).sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        ref.append(sum(g.pow(2).sum() for g in grads if g is not None).sqrt())
    ours = per_sample_grad_norms(
        model, x, lambda logits: task.per_sample_loss(logits, masks), norm="l2", chunk_size=n
    )
    assert_close_to_scale(ours, torch.stack(ref), rel=EXACT)
    assert ours[-1] == 0 and (ours[:-1] > 0).all()


def test_unused_head_tuple_output_and_frozen_parameters():
    torch.manual_seed(0)
    model = randomise_bn(TwoHeads()).double()
    model.body[0].bias.requires_grad_(False)
    x = torch.randn(6, 12, dtype=torch.float64)
    _assert_exact(model, x)
    per = per_sample_grad_norms(model, x, entropy_loss, norm="per-tensor")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert per.shape == (6, len(names))
    assert (per[:, [i for i, n in enumerate(names) if n.startswith("unused")]] == 0).all()


class DictOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return {"aux": x.mean(), "logits": F.relu(self.bn(self.conv(x)), inplace=True).flatten(1)}


def test_dict_output_and_functional_inplace_relu():
    torch.manual_seed(0)
    model = randomise_bn(DictOut()).double()
    _assert_exact(model, torch.randn(4, 1, 4, 4, dtype=torch.float64))


class Scale(nn.Module):
    """A module with its own parameter and no batched rule: the per-module fallback."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.linspace(0.5, 1.5, c))
        self.inner = nn.Linear(c, c)  # a child with a rule inside the fallback module

    def forward(self, x):
        return self.inner(x) * self.s + x.pow(2) * self.s.pow(2)


def test_per_module_fallback_is_exact_and_warns():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), Scale(6), nn.PReLU(6), nn.Linear(6, 3)).double()
    _assert_exact(model, torch.randn(5, 5, dtype=torch.float64), warn=True)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight  # tied

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        return self.a(torch.tanh(self.a(x)))


class Outside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h) + F.linear(h, self.a.weight)  # a.weight also used outside its module


class Unvisited(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        return F.linear(x, self.a.weight, self.a.bias)  # the module itself never runs


class OutsideNoRule(nn.Module):
    """A parameter of a module without a rule (PReLU) also used outside it: the per-module
    fallback alone would miss that use (20% off before the engine checked for it)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.act = nn.PReLU(4)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        return self.b(self.act(self.a(x)) * self.act.weight)


@pytest.mark.parametrize("cls", [Tied, Twice, Outside, Unvisited, OutsideNoRule])
def test_shared_and_outside_parameters_fall_back_exactly(cls):
    torch.manual_seed(0)
    _assert_exact(cls().double(), torch.randn(5, 4, dtype=torch.float64), warn=True)


def test_batchnorm_without_running_statistics_falls_back_to_per_sample_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 2),
        nn.BatchNorm2d(2, track_running_stats=False),
        nn.Flatten(),
        nn.Linear(18, 3),
    ).double()
    _assert_exact(model, torch.randn(4, 1, 4, 4, dtype=torch.float64), warn=True)


def test_chunking_is_invisible_and_bounds_the_batch():
    seen = []

    class Spy(nn.Module):
        def forward(self, x):
            seen.append(x.shape[0])
            return x

    torch.manual_seed(0)
    model = nn.Sequential(
        Spy(), nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 4)
    ).double()
    randomise_bn(model)
    x = torch.randn(7, 1, 4, 4, dtype=torch.float64)
    full = per_sample_grad_norms(model, x, entropy_loss, chunk_size=7)
    for chunk in (1, 3):
        seen.clear()
        assert_close_to_scale(
            per_sample_grad_norms(model, x, entropy_loss, chunk_size=chunk), full, rel=1e-12
        )
        assert max(seen) <= chunk
    assert per_sample_grad_norms(model, x[:0], entropy_loss).shape == (0,)


def test_batchnorm_backward_is_fused_except_for_a_first_layer(monkeypatch):
    """A BatchNorm whose input needs a gradient runs the engine's fused backward (input gradient
    and per-sample sums from one call); a first-layer BatchNorm (its input needs none) and one
    with a frozen weight keep exact results; the module's own forward is back afterwards."""
    from gradnorm_al.pergrad import engine

    fused = []
    backward = engine._FusedBatchNorm.backward

    def spy(ctx, grad):
        fused.append(ctx.module)
        return backward(ctx, grad)

    monkeypatch.setattr(engine._FusedBatchNorm, "backward", staticmethod(spy))
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.BatchNorm2d(2),  # first layer: plain path
        nn.Conv2d(2, 3, 3, bias=False),
        nn.BatchNorm2d(3),  # fused
        nn.ReLU(inplace=True),
        nn.Conv2d(3, 4, 2),
        nn.BatchNorm2d(4),  # fused, weight frozen
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 5),
    ).double()
    randomise_bn(model)
    model[5].weight.requires_grad_(False)
    _assert_exact(model, torch.randn(6, 2, 6, 6, dtype=torch.float64))
    assert fused and set(fused) == {model[2], model[5]}
    assert all("forward" not in vars(m) for m in model.modules())


FIRST_LAYER_CASES = {
    # a first-layer convolution read only by a BatchNorm: its rule takes the BatchNorm's output
    # gradient and the per-channel scale (every route of conv_rule)
    "conv2d-bias-channels-first": (nn.Conv2d(2, 4, 3, padding=1), (2, 6, 6)),
    "conv2d-channels-last": (nn.Conv2d(5, 3, 3, stride=2), (5, 5, 5)),
    "conv2d-kernel-rows": (nn.Conv2d(6, 3, (3, 2), padding=1, dilation=(2, 1)), (6, 5, 4)),
    "conv2d-grouped": (nn.Conv2d(4, 6, 3, groups=2), (4, 5, 5)),
    "conv-transpose2d-grouped": (nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2), (4, 3, 3)),
    "conv1d": (nn.Conv1d(3, 4, 3, padding=1), (3, 7)),
    "conv3d": (nn.Conv3d(2, 3, 2), (2, 3, 4, 4)),
}


def _spy_batchnorm_input_grads(monkeypatch) -> list[tuple[int, bool]]:
    """(channels, input gradient asked for) of every fused BatchNorm backward."""
    from gradnorm_al.pergrad import engine

    seen = []
    backward = engine.batchnorm_backward

    def spy(module, a, g, input_grad):
        seen.append((module.num_features, input_grad))
        return backward(module, a, g, input_grad)

    monkeypatch.setattr(engine, "batchnorm_backward", spy)
    return seen


@pytest.mark.parametrize("case", sorted(FIRST_LAYER_CASES))
@pytest.mark.parametrize("method", [None, "ghost", "materialize", "im2col", "grouped"])
def test_a_first_layer_convolution_takes_the_gradient_of_the_batchnorm_it_feeds(
    case, method, monkeypatch
):
    """No input gradient is formed for a BatchNorm whose input is a first-layer convolution's
    output read by nothing else; the convolution's norms stay exact on every route."""
    monkeypatch.setattr(layer_rules, "FORCE_METHOD", method)
    seen = _spy_batchnorm_input_grads(monkeypatch)
    conv, shape = FIRST_LAYER_CASES[case]
    channels = conv.out_channels
    norm = {3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[len(shape) + 1](channels)
    model, x = _net(nn.Sequential(copy.deepcopy(conv), norm, nn.Tanh()), shape)
    _assert_exact(model, x)
    assert seen and set(seen) == {(channels, False)}


def test_a_first_layer_convolution_before_a_batchnorm_with_a_frozen_weight(monkeypatch):
    seen = _spy_batchnorm_input_grads(monkeypatch)
    model, x = _net(nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Tanh()), (2, 5, 5))
    model.body[1].weight.requires_grad_(False)
    _assert_exact(model, x)
    assert seen == [(3, False)] * len(NORMS)


class ConvReadTwice(nn.Module):
    """The first convolution's output is read by its BatchNorm and by something else."""

    def __init__(self, other: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.bn2 = nn.BatchNorm2d(3)
        self.other = other

    def forward(self, x):
        h = self.conv(x)
        if self.other == "inplace-relu":  # the BatchNorm reads the ReLU's output
            return self.bn(F.relu(h, inplace=True)).tanh()
        y = self.bn(h).tanh()
        if self.other == "residual":
            return y + h[:, :1]
        return y * self.bn2(h)  # "second-batchnorm"


@pytest.mark.parametrize("other", ["residual", "inplace-relu", "second-batchnorm"])
def test_a_first_layer_output_read_twice_keeps_the_batchnorm_input_gradient(other, monkeypatch):
    seen = _spy_batchnorm_input_grads(monkeypatch)
    torch.manual_seed(0)
    body = randomise_bn(ConvReadTwice(other)).double()
    model, x = _net(body, (2, 4, 4))
    _assert_exact(model, x)
    assert seen and all(input_grad for _, input_grad in seen)


def test_an_instance_level_forward_gets_the_exact_fallback():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    patched = model[2]
    patched.forward = lambda x: F.linear(2.0 * x, patched.weight, patched.bias)
    _assert_exact(model, torch.randn(5, 4, dtype=torch.float64), warn=True)


def test_model_is_restored_even_when_the_loss_fails():
    torch.manual_seed(0)
    model = randomise_bn(create_model("smallcnn", num_classes=10, in_channels=1))
    model.train()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    state = copy.deepcopy(model.state_dict())

    def bad_loss(z):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        per_sample_grad_norms(model, torch.randn(3, 1, 8, 8), bad_loss)
    per_sample_grad_norms(model, torch.randn(3, 1, 8, 8), entropy_loss)
    assert all(m.training for m in model.modules())
    assert all(not m._forward_hooks for m in model.modules())
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_a_wrong_loss_shape_is_reported():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="one loss per sample"):
        per_sample_grad_norms(model, torch.randn(4, 3), lambda z: z.sum())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("length", [1000, 70_000])  # one pass / blocks of 4096
def test_squared_norms_accumulate_low_precision_in_float32(dtype, length):
    t = torch.randn(3, length, generator=torch.Generator().manual_seed(0)).to(dtype)
    exact = t.double().square().sum(dim=1)  # the same (exactly representable) values
    ours = layer_rules.squared_norms(t)
    assert ours.dtype == torch.float64
    assert_close_to_scale(ours, exact, rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_low_precision_models_are_close_to_float64(dtype):
    torch.manual_seed(0)
    model = randomise_bn(create_model("smallcnn", num_classes=10, in_channels=1))
    x = torch.randn(16, 1, 8, 8)
    ref = per_sample_grad_norms_loop(copy.deepcopy(model).double(), x.double(), entropy_loss)
    ours = per_sample_grad_norms(model.to(dtype), x.to(dtype), entropy_loss)
    assert ours.dtype == torch.float64
    tol = 1e-5 if dtype == torch.float32 else 0.1
    assert float(((ours - ref).abs() / ref).median()) < tol


# ----------------------------------------------------------------------- property-based
@st.composite
def conv_nets(draw):
    c_in = draw(st.integers(1, 3))
    size = draw(st.integers(5, 9))
    layers, c, h = [], c_in, size
    for _ in range(draw(st.integers(1, 3))):
        groups = draw(st.sampled_from([g for g in (1, 2, 3) if c % g == 0]))
        c_out = groups * draw(st.integers(1, 3))
        k = draw(st.integers(1, 3))
        stride = draw(st.integers(1, 2))
        dilation = draw(st.integers(1, 2))
        padding = draw(st.integers(0, 2))
        h_out = (h + 2 * padding - dilation * (k - 1) - 1) // stride + 1
        if h_out < 1:
            break
        layers.append(
            nn.Conv2d(
                c,
                c_out,
                k,
                stride=stride,
                padding=padding,
                dilation=dilation,
                groups=groups,
                bias=draw(st.booleans()),
            )
        )
        if draw(st.booleans()):
            layers.append(nn.BatchNorm2d(c_out))
        layers.append(draw(st.sampled_from([nn.ReLU(inplace=True), nn.Tanh(), nn.Identity()])))
        c, h = c_out, h_out
    method = draw(st.sampled_from([None, "ghost", "materialize", "im2col", "grouped"]))
    return nn.Sequential(*layers), (c_in, size, size), method, draw(st.integers(0, 1000))


@settings(max_examples=25, deadline=None)
@given(conv_nets())
def test_random_architectures_match_the_loop(spec):
    body, shape, method, seed = spec
    old = layer_rules.FORCE_METHOD
    layer_rules.FORCE_METHOD = method
    try:
        model, x = _net(body, shape, n=3, seed=seed)
        _assert_exact(model, x, norms=["per-tensor"])
    finally:
        layer_rules.FORCE_METHOD = old


# ------------------------------------------------------- modules without the batch in dim 0
# (issue 15): a positional table broadcast over the batch, a Linear or an Embedding applied to a
# tensor that is not computed from the batch, a sequence-first layout (batch in dim 1), and
# recurrent layers. With the batch size equal to the sequence length such modules look batched
# by their shapes alone; the engine must find them and stay exact (or refuse), never be wrong.
SEQ = 5  # sequence length: the batch sizes below include SEQ itself


class PositionTable(nn.Module):
    """A learned positional table: returns its first L rows [L, D], not one row per sample."""

    def __init__(self, length: int, dim: int) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(length, dim))

    def forward(self, x):
        return self.pos[: x.shape[1]]


class Positional(nn.Module):
    """Tokens (or float features) plus a broadcast positional term, LayerNorm, mean-pooled head.
    ``kind``: "table" (PositionTable), "embedding" (an nn.Embedding of arange(L), GPT-2 style) or
    "linear" (a Linear applied to the table's rows: a rule on a tensor without batch)."""

    def __init__(self, kind: str, tokens: bool = True, dim: int = 4) -> None:
        super().__init__()
        self.kind, self.tokens = kind, tokens
        self.inp = nn.Embedding(9, dim) if tokens else nn.Linear(3, dim)
        if kind == "embedding":
            self.pos = nn.Embedding(SEQ + 2, dim)
        else:
            self.pos = PositionTable(SEQ + 2, dim)
            self.mix = nn.Linear(dim, dim) if kind == "linear" else None
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 3)

    def forward(self, x):
        h = self.inp(x)
        if self.kind == "embedding":
            pos = self.pos(torch.arange(x.shape[1], device=x.device))
        else:
            pos = self.pos(x)
            if self.mix is not None:
                pos = self.mix(pos)
        return self.fc(torch.tanh(self.norm(h + pos)).mean(dim=1))


def _sequences(n: int, tokens: bool, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if tokens:
        return torch.randint(0, 9, (n, SEQ), generator=g)
    return torch.randn(n, SEQ, 3, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("kind", ["table", "embedding", "linear"])
@pytest.mark.parametrize("n, chunk", [(SEQ, None), (3, None), (8, None), (12, SEQ), (1, None)])
def test_a_positional_term_without_batch_dimension_is_exact(kind, n, chunk):
    torch.manual_seed(0)
    model = Positional(kind).double()
    # n == 1: one sample's gradient is the batch gradient, but the positional term still has L
    # rows, not one: the engine still has to route it to a fallback, except for an Embedding
    # (a position-wise rule: the L rows of the chunk's one sample are all that sample's)
    warn = n != 1 or kind != "embedding"
    _assert_exact(model, _sequences(n, tokens=True), chunk_size=chunk, warn=warn)


def test_a_linear_on_a_broadcast_parameter_with_float_input_is_exact():
    torch.manual_seed(0)
    model = Positional("linear", tokens=False).double()
    for n in (SEQ, 2, 7):
        _assert_exact(model, _sequences(n, tokens=False, seed=n), warn=True)


class SequenceFirst(nn.Module):
    """Linear, LayerNorm and Linear on the sequence-first layout [L, N, D] (batch in dim 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.norm = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.norm(self.inp(x.transpose(0, 1))))  # [L, N, 4]
        return self.fc(h).mean(dim=0)


@pytest.mark.parametrize("n", [SEQ, 2, 7, 1])
def test_modules_with_the_batch_in_dim_1_are_exact(n):
    # Linear and LayerNorm treat the dimensions before their features alike: their rules take
    # the batch from dim 1 (moved to the front), on the batched path
    torch.manual_seed(0)
    _assert_exact(SequenceFirst().double(), _sequences(n, tokens=False), warn=False)


class Recurrent(nn.Module):
    """A text classifier: embedding (or float features), a recurrent layer, and a head reading both
    the mean of the output sequence and the last layer's final hidden state."""

    def __init__(self, cell, layers: int, bidirectional: bool, batch_first: bool, tokens: bool):
        super().__init__()
        self.batch_first, self.tokens = batch_first, tokens
        self.layers, self.directions = layers, 2 if bidirectional else 1
        self.inp = nn.Embedding(9, 3) if tokens else None
        self.rnn = cell(
            3, 4, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first
        )
        self.fc = nn.Linear(2 * 4 * self.directions, 3)

    def forward(self, x):
        h = self.inp(x) if self.tokens else x
        if not self.batch_first:
            h = h.transpose(0, 1)
        out, state = self.rnn(h)
        hidden = state[0] if isinstance(state, tuple) else state  # LSTM: (h_n, c_n)
        last = hidden.view(self.layers, self.directions, -1, 4)[-1]  # [directions, N, 4]
        last = last.transpose(0, 1).flatten(1)
        pooled = out.mean(dim=1 if self.batch_first else 0)
        return self.fc(torch.cat([pooled, last], dim=1))


RNN_CASES = [  # layers, bidirectional, batch_first, tokens
    (1, False, True, True),
    (2, True, False, True),
    (2, False, False, False),
    (1, True, True, False),
]


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU, nn.RNN], ids=lambda c: c.__name__)
@pytest.mark.parametrize("case", RNN_CASES, ids=lambda c: "-".join(str(int(v)) for v in c))
def test_recurrent_layers_are_exact(cell, case):
    layers, bidirectional, batch_first, tokens = case
    torch.manual_seed(0)
    model = Recurrent(cell, layers, bidirectional, batch_first, tokens).double()
    # the batch size equals the sequence length, and (2 layers x 2 directions) the state's dim 0
    n = SEQ if layers * (2 if bidirectional else 1) != 4 else 4
    x = _sequences(n, tokens)
    _assert_exact(model, x, norms=["per-tensor"])


class Squeezing(nn.Module):
    """Squeezes its pooled features: at a batch of one the head sees [C], not [1, C] (the
    logits get their batch dimension back at the end)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        features = F.adaptive_avg_pool2d(torch.tanh(self.conv(x)), 1).squeeze()
        return self.fc(features).view(x.shape[0], -1)


def test_a_model_that_squeezes_its_batch_of_one_keeps_the_batched_path():
    torch.manual_seed(0)
    _assert_exact(Squeezing().double(), torch.randn(4, 1, 5, 5, dtype=torch.float64))


def test_one_probe_of_one_sample_per_call():
    """The batch dimension is found from the chunk's shapes and those of one probe forward of
    one sample (later chunks of other sizes compare with earlier ones)."""
    seen = []
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3)).double()
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    x = torch.randn(7, 1, 4, 4, dtype=torch.float64)
    _assert_exact(model, x, norms=["per-tensor"], chunk_size=3)
    assert seen[7:] == [1, 3, 3, 1]  # after the loop's 7 forwards: probe, then the chunks


class RecurrentWithPositions(nn.Module):
    """A positional table (no batch) before an LSTM: torch.func cannot run the LSTM, so the whole
    model is scored by one backward per sample."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = PositionTable(SEQ, 3)
        self.rnn = nn.LSTM(3, 4, batch_first=True)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.rnn(x + self.pos(x))[0][:, -1])


def test_the_whole_model_falls_back_to_one_backward_per_sample_where_torch_func_fails():
    torch.manual_seed(0)
    model = RecurrentWithPositions().double()
    x = _sequences(SEQ, tokens=False)
    _assert_exact(model, x, norms=["l2"], warn=True)
    with pytest.warns(FallbackWarning, match="one backward pass per sample for the whole model"):
        per_sample_grad_norms(model, x, entropy_loss)


class RecurrentWithState(nn.Module):
    """An LSTM given an initial state (h0, c0) computed from the input (a nested argument whose
    batch is in dim 1), sequence first."""

    def __init__(self) -> None:
        super().__init__()
        self.init = nn.Linear(3, 2 * 4)
        self.rnn = nn.LSTM(3, 4, num_layers=2)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h0, c0 = torch.tanh(self.init(x[:, 0])).chunk(2, dim=1)  # [N, 4] each
        state = (h0.expand(2, -1, -1).contiguous(), c0.expand(2, -1, -1).contiguous())
        return self.fc(self.rnn(x.transpose(0, 1), state)[0][-1])


def test_a_recurrent_layer_with_an_initial_state_argument_is_exact():
    torch.manual_seed(0)
    model, x = RecurrentWithState().double(), _sequences(SEQ, tokens=False)
    _assert_exact(model, x)  # batched: no fallback at all
