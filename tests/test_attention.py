"""Attention in the per-sample gradient-norm engine (issue 20): ``nn.MultiheadAttention`` in every
configuration, transformer encoder layers, torchvision's vision transformer and the registry's
ViTs, against one backward pass per sample (float64, relative L2 error of the whole norm vector),
on the batched path (no FallbackWarning); unsupported uses warn and stay exact."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import engine_against_loop
from torch import nn

from gradnorm_al.models import create_model
from gradnorm_al.pergrad import FallbackWarning

# tiny networks: several intra-op threads on a busy 2-core machine slow every step (conftest)
pytestmark = pytest.mark.usefixtures("one_thread")

REL = 1e-9  # float64: relative L2 error of the whole per-tensor norm matrix
L, E, HEADS = 4, 8, 2


def _check(model, x, *, warn=False, rel=REL, chunk_size=None):
    """Per-tensor norms of the engine against the loop; returns the engine's warnings."""
    return engine_against_loop(model, x, rel=rel, warn=warn, chunk_size=chunk_size)


def _masks(x: torch.Tensor, kind: str | None, src_len: int, heads: int):
    """A mask over [L, S] keys from the sample (3-D: per sample and head) or a fixed one."""
    length = x.shape[1]
    if kind is None:
        return None
    if kind in ("bool2", "causal"):
        return torch.ones(length, src_len, dtype=torch.bool).triu(1)
    if kind == "float2":
        g = torch.Generator().manual_seed(1)
        return torch.randn(length, src_len, generator=g, dtype=x.dtype)
    score = x[:, :, :1] * x[:, :src_len, 1].unsqueeze(1)  # [N, L, S], from the sample itself
    if kind == "float3":
        return score.repeat_interleave(heads, dim=0)
    mask = score > 0.3
    mask[:, :, 0] = False  # every query keeps one key
    return mask.repeat_interleave(heads, dim=0)


class Attend(nn.Module):
    """Linear embedding of float tokens [N, L, 3], one nn.MultiheadAttention, mean-pooled head
    (plus a few attention weights when the layer returns them).

    ``mode``: "self" (query is key is value), "cross" (key is value, another tensor: packed
    weights, q and kv blocks), "distinct" (three tensors, one embedding size: packed weights in
    three blocks), "kdim" (key and value of other sizes: separate projection weights);
    ``first``: the attention reads the raw input (nothing upstream requires grad)."""

    def __init__(
        self,
        mode="self",
        batch_first=True,
        kpm=None,
        mask=None,
        need_weights=False,
        average=True,
        first=False,
        **kw,
    ):
        super().__init__()
        self.mode, self.batch_first, self.first = mode, batch_first, first
        self.kpm, self.mask, self.need_weights, self.average = kpm, mask, need_weights, average
        kdim = vdim = None
        if mode == "kdim":
            kdim, vdim = 5, 6
        self.inp = None if first else nn.Linear(3, E)
        self.mem = nn.Linear(3, kdim or E)
        self.val = nn.Linear(3, vdim or E)
        self.att = nn.MultiheadAttention(
            E, HEADS, batch_first=batch_first, kdim=kdim, vdim=vdim, **kw
        )
        self.fc = nn.Linear(E, 3)

    def forward(self, x):
        q = x if self.first else self.inp(x)
        if self.mode == "self":
            k = v = q
        elif self.mode == "cross":
            k = v = self.mem(x)
        else:
            k, v = self.mem(x), self.val(x)
        src_len = L
        kpm = None
        if self.kpm == "bool":
            kpm = x[:, :, 2] > 0.5
            kpm[:, 0] = False
        elif self.kpm == "float":
            kpm = x[:, :, 2] * 0.7
        mask = _masks(x, self.mask, src_len, HEADS)
        if not self.batch_first:
            if self.mode == "self":
                q = k = v = q.transpose(0, 1)
            elif self.mode == "cross":
                q, k = q.transpose(0, 1), k.transpose(0, 1)
                v = k
            else:
                q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        out, weights = self.att(
            q,
            k,
            v,
            key_padding_mask=kpm,
            need_weights=self.need_weights,
            attn_mask=mask,
            average_attn_weights=self.average,
            is_causal=self.mask == "causal",
        )
        pooled = out.mean(dim=1 if self.batch_first else 0)
        logits = self.fc(pooled)
        if weights is not None:
            logits = logits + weights.flatten(1)[:, :3]
        return logits


def _tokens(n=5, seed=0, dim=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, L, dim, generator=g, dtype=torch.float64)


MHA_CASES = {
    "self": {},
    "self-seq-first": dict(batch_first=False),
    "cross": dict(mode="cross"),
    "cross-seq-first": dict(mode="cross", batch_first=False),
    "distinct": dict(mode="distinct"),
    "kdim-vdim": dict(mode="kdim"),
    "kdim-vdim-seq-first-no-bias": dict(mode="kdim", batch_first=False, bias=False),
    "no-bias": dict(bias=False),
    "bias-kv": dict(add_bias_kv=True),
    "bias-kv-zero-attn-kpm-mask": dict(
        add_bias_kv=True, add_zero_attn=True, kpm="bool", mask="bool2"
    ),
    "zero-attn-seq-first": dict(add_zero_attn=True, batch_first=False, mode="cross"),
    "kpm-bool": dict(kpm="bool"),
    "kpm-float-mask-float": dict(kpm="float", mask="float2"),
    "mask-bool-2d": dict(mask="bool2"),
    "mask-float-3d": dict(mask="float3"),
    "mask-bool-3d-seq-first": dict(mask="bool3", batch_first=False),
    "causal": dict(mask="causal"),
    "causal-weights": dict(mask="causal", need_weights=True),
    "causal-kpm": dict(mask="causal", kpm="bool"),
    "weights-averaged": dict(need_weights=True),
    "weights-per-head-kpm-mask3d": dict(need_weights=True, average=False, kpm="bool", mask="bool3"),
    "weights-bias-kv-zero-attn-kdim": dict(
        need_weights=True, add_bias_kv=True, add_zero_attn=True, mode="kdim"
    ),
    "first-module": dict(first=True),
    "first-module-cross-seq-first": dict(first=True, mode="distinct", batch_first=False),
}


@pytest.mark.parametrize("case", sorted(MHA_CASES))
def test_multihead_attention_is_exact_on_the_batched_path(case):
    kw = dict(MHA_CASES[case])
    torch.manual_seed(0)
    model = Attend(**kw).double()
    x = _tokens(dim=E if kw.get("first") else 3)
    if kw.get("first"):
        model.mem = nn.Linear(E, E).double()
        model.val = nn.Linear(E, E).double()
    with torch.no_grad():  # biases of the appended key and value are zeros by default
        for p in (model.att.bias_k, model.att.bias_v):
            if p is not None:
                p.normal_()
    _check(model, x)
    # a chunk of one sample, and chunks of another size (the layout is checked at both)
    _check(model, x[:3], chunk_size=2)


def test_frozen_projections_and_a_chunk_of_one():
    torch.manual_seed(0)
    model = Attend(mode="cross").double()
    model.att.in_proj_weight.requires_grad_(False)
    model.att.out_proj.bias.requires_grad_(False)
    x = _tokens(3)
    _check(model, x)
    _check(model, x, chunk_size=1)


class Unbatched(nn.Module):
    """Attention over a learned table [L, E] (an unbatched, 2-D call), added to every sample."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, E)
        self.table = nn.Parameter(torch.randn(L, E))
        self.att = nn.MultiheadAttention(E, HEADS)
        self.fc = nn.Linear(E, 3)

    def forward(self, x):
        ctx, _ = self.att(self.table, self.table, self.table)
        return self.fc((self.inp(x) + ctx).mean(dim=1))


class Twice(nn.Module):
    """One attention layer called twice (shared weights)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, E)
        self.att = nn.MultiheadAttention(E, HEADS, batch_first=True)
        self.fc = nn.Linear(E, 3)

    def forward(self, x):
        h = self.inp(x)
        h = self.att(h, h, h)[0]
        return self.fc(self.att(h, h, h)[0].mean(dim=1))


class Folded(Twice):
    """The samples folded into one sequence [1, N L, E], a block-diagonal mask keeping them
    apart: per-sample gradients are defined, but the batch is not where the rule expects it."""

    def forward(self, x):
        n = x.shape[0]
        h = self.inp(x).reshape(1, n * L, E)
        block = torch.arange(n * L) // L
        mask = block.unsqueeze(0) != block.unsqueeze(1)
        out, _ = self.att(h, h, h, attn_mask=mask, need_weights=False)
        return self.fc(out.reshape(n, L, E).mean(dim=1))


class Outside(Twice):
    def forward(self, x):
        h = self.inp(x)
        h = self.att(h, h, h)[0] + h @ self.att.out_proj.weight
        return self.fc(h.mean(dim=1))


class OwnForward(nn.MultiheadAttention):
    def forward(self, query, key, value, **kw):
        return super().forward(query, key, value, **kw)


class Subclass(Twice):
    def __init__(self):
        super().__init__()
        self.att = OwnForward(E, HEADS, batch_first=True)

    def forward(self, x):
        h = self.inp(x)
        return self.fc(self.att(h, h, h)[0].mean(dim=1))


@pytest.mark.parametrize(
    "cls, why",
    [
        (Unbatched, "unbatched"),
        (Folded, "does not carry the batch"),
        (Twice, "more than once"),
        (Outside, "used outside"),
        (Subclass, "outside their module"),
    ],
)
def test_unsupported_uses_of_attention_warn_and_stay_exact(cls, why):
    torch.manual_seed(0)
    messages = _check(cls().double(), _tokens(4), warn=True)
    assert any(why in m for m in messages), messages


# --------------------------------------------------------------- transformer encoder layers
class Encoder(nn.Module):
    def __init__(self, layers=1, mask=None, kpm=False, nested=True, **kw):
        super().__init__()
        self.batch_first = kw.get("batch_first", False)
        self.mask, self.kpm = mask, kpm
        self.inp = nn.Linear(3, E)
        layer = nn.TransformerEncoderLayer(E, HEADS, dim_feedforward=12, dropout=0.1, **kw)
        self.enc = (
            layer
            if layers == 0
            else nn.TransformerEncoder(layer, layers, enable_nested_tensor=nested)
        )
        self.fc = nn.Linear(E, 3)

    def forward(self, x):
        h = self.inp(x)
        if not self.batch_first:
            h = h.transpose(0, 1)
        kw = {}
        if self.kpm:
            kpm = x[:, :, 2] > 0.5
            kpm[:, 0] = False
            kw["src_key_padding_mask"] = kpm
        if self.mask == "causal":
            kw["mask"] = torch.ones(L, L, dtype=torch.bool).triu(1)  # as the padding mask
            kw["is_causal"] = True
        if isinstance(self.enc, nn.TransformerEncoderLayer) and "mask" in kw:
            kw["src_mask"] = kw.pop("mask")
        out = self.enc(h, **kw)
        return self.fc(out.mean(dim=1 if self.batch_first else 0))


ENCODER_CASES = {
    "layer-post-norm-relu": dict(layers=0),
    "layer-pre-norm-gelu-batch-first": dict(
        layers=0, norm_first=True, activation="gelu", batch_first=True
    ),
    "encoder-batch-first-kpm-nested": dict(layers=2, batch_first=True, kpm=True),
    "encoder-pre-norm-causal-kpm": dict(layers=2, norm_first=True, mask="causal", kpm=True),
    "encoder-gelu-causal-batch-first": dict(
        layers=2, activation="gelu", mask="causal", batch_first=True
    ),
}


@pytest.mark.parametrize("case", sorted(ENCODER_CASES))
def test_transformer_encoder_layers_are_exact(case):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # enable_nested_tensor vs norm_first
        model = Encoder(**ENCODER_CASES[case]).double()
    _check(model, _tokens(5))


# ------------------------------------------------------------------------ vision transformers
def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-zero class token, head and biases (torchvision initialises them to zeros)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def test_torchvision_vision_transformer_is_exact():
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(
        image_size=8,
        patch_size=4,
        num_layers=2,
        num_heads=2,
        hidden_dim=8,
        mlp_dim=12,
        num_classes=3,
        representation_size=6,
    )
    model = _randomise(model.double())
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    _check(model, x)
    _check(model, x[:2], chunk_size=1)


def test_a_vision_transformer_subclass_with_its_own_forward_falls_back():
    from torchvision.models import VisionTransformer

    class Mine(VisionTransformer):
        def forward(self, x):
            return super().forward(x)

    torch.manual_seed(0)
    model = Mine(
        image_size=8,
        patch_size=4,
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        mlp_dim=8,
        num_classes=3,
    )
    _check(_randomise(model.double()), torch.randn(3, 3, 8, 8, dtype=torch.float64), warn=True)


@pytest.mark.parametrize(
    "name, kwargs, n",
    [
        ("vit-small-cifar", {}, 3),
        # all of ViT-B/16's 86.6M parameters, on 32x32 images (5 tokens) to keep it quick
        ("vit-b-16", {"image_size": 32}, 2),
    ],
)
def test_registry_vision_transformers_are_exact(name, kwargs, n):
    torch.manual_seed(0)
    model = create_model(name, num_classes=4, in_channels=3, **kwargs).double()
    with torch.no_grad():  # torchvision's head starts at zero (no gradient reaches the rest)
        model.classifier.weight.normal_()
        model.net.class_token.normal_()
    x = torch.randn(n, 3, model.image_size, model.image_size, dtype=torch.float64)
    _check(model, x)


def test_a_tiny_run_with_a_registry_vit_scores_on_the_batched_path(tmp_path, small_digits):
    # digits are 1x8x8: the model takes one channel and 8x8 images (2x2 patches of 4x4)
    from gradnorm_al import ExperimentConfig
    from gradnorm_al.experiment import run_experiment

    cfg = ExperimentConfig(
        strategies=["entropy-gradnorm"],
        trials=1,
        cycles=2,
        epochs=1,
        batch_size=64,
        model="vit-small-cifar",
        model_params={"image_size": 8, "num_layers": 1},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        result = run_experiment(cfg, tmp_path / "run", progress=False, bundle=small_digits)
    assert [row["cycle"] for row in result.rows] == [0, 1]
