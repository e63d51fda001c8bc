"""Learning loss for active learning (ll4al): the ranking loss, the loss-prediction module, its
hooks and gradient stop, selection, and end-to-end runs with smallcnn and resnet18-cifar."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_to_scale, bundle_trial, make_context
from torch import nn

from gradnorm_al import ConfigError, create_model, create_strategy
from gradnorm_al.data import tensor_dataset
from gradnorm_al.loop import LoopConfig
from gradnorm_al.strategies import accepted_params
from gradnorm_al.strategies.ll4al import (
    LL4ALStrategy,
    LossPredictionAuxiliary,
    LossPredictionModule,
    feature_stages,
    loss_prediction_loss,
    stage_channels,
)
from gradnorm_al.train import TrainConfig, fit


def _slow_ranking_loss(pred, true, margin):
    """Reference: an explicit loop over the pairs (i, B-1-i), i < B // 2."""
    b = len(pred)
    terms = []
    for i in range(b // 2):
        j = b - 1 - i
        sign = 1.0 if true[i] > true[j] else -1.0
        terms.append(max(0.0, margin - sign * (pred[i] - pred[j])))
    return sum(terms) / len(terms)


class Lookup(nn.Module):
    """Maps the input number i to row i of a fixed feature table."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", table)
        self.out_features = table.shape[1]  # the width ll4al reads from the structure

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x[:, 0].long()]


class LookupNet(nn.Module):
    """One lookup 'block' (fixed per-sample features) and a linear head."""

    def __init__(self, table: torch.Tensor, num_classes: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Lookup(table)])
        self.classifier = nn.Linear(table.shape[1], num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[0](x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


class TinyMLP(nn.Module):
    """Two linear blocks and a head: a small backbone with feature taps."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.Linear(4, 8), nn.ReLU()), nn.Sequential(nn.Linear(8, 8), nn.ReLU())]
        )
        self.classifier = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.classifier(x)


def _index_pool(n: int):
    return tensor_dataset(torch.arange(n, dtype=torch.float32).view(n, 1), np.zeros(n, np.int64))


def _ctx(model, pool, candidates, labeled=(), seed=0, batch_size=5):
    return make_context(
        model, pool, candidates, labeled, seed=seed, num_classes=2, batch_size=batch_size
    )


def _sum_module(aux: LossPredictionAuxiliary, bias: float = 0.0) -> None:
    """Set a one-tap module (hidden = feature width) to predict bias + sum_c relu(f_c)."""
    with torch.no_grad():
        tap = aux.module.taps[0]
        tap.weight.copy_(torch.eye(tap.in_features))
        tap.bias.zero_()
        aux.module.head.weight.fill_(1.0)
        aux.module.head.bias.fill_(bias)


# ------------------------------------------------------------------------------------------------
# The ranking loss


def test_loss_prediction_loss_hand_computed():
    pred = torch.tensor([3.0, 1.0, 0.0, 2.0])
    true = torch.tensor([1.0, 0.5, 2.0, 0.2])
    # pairs (0, 3): true 1 > 0.2 -> s = +1, pred diff 3 - 2 = 1 -> max(0, 1 - 1) = 0
    #       (1, 2): true 0.5 < 2 -> s = -1, pred diff 1 - 0 = 1 -> max(0, 1 + 1) = 2
    assert loss_prediction_loss(pred, true).item() == pytest.approx(1.0)
    assert loss_prediction_loss(pred, true, margin=0.5).item() == pytest.approx(0.75)
    # a tie counts as -1 (published): 1 - (-1) * (1 - 0) = 2
    assert loss_prediction_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.3, 0.3])).item() == 2.0
    # odd batch: the middle sample is unpaired and changes nothing
    odd = torch.tensor([3.0, 1.0, 7.0, 0.0, 2.0])
    odd_true = torch.tensor([1.0, 0.5, 9.0, 2.0, 0.2])
    assert loss_prediction_loss(odd, odd_true).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 2"):
        loss_prediction_loss(torch.tensor([1.0]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match=r"\[B\]"):
        loss_prediction_loss(torch.zeros(4, 1), torch.zeros(4))


def test_loss_prediction_loss_matches_slow_reference_and_detaches_target():
    g = torch.Generator().manual_seed(0)
    for b in (2, 5, 8, 13):
        pred = torch.randn(b, generator=g, dtype=torch.float64, requires_grad=True)
        true = torch.rand(b, generator=g, dtype=torch.float64, requires_grad=True)
        loss = loss_prediction_loss(pred, true, margin=0.7)
        expected = _slow_ranking_loss(pred.tolist(), true.tolist(), 0.7)
        assert loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
        loss.backward()
        assert true.grad is None  # the true loss only orders the pairs
        assert pred.grad is not None


# ------------------------------------------------------------------------------------------------
# The module, its hooks and the gradient stop


def test_module_formula_on_feature_maps():
    module = LossPredictionModule([2, 3], hidden=2).double()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.linspace(-1.0, 1.0, p.numel(), dtype=torch.float64).view_as(p))
    f1 = torch.arange(16, dtype=torch.float64).view(2, 2, 2, 2) / 10  # [B, 2, 2, 2]
    f2 = torch.arange(6, dtype=torch.float64).view(2, 3) / 5 - 0.4  # [B, 3] (no pooling)
    out = module([f1, f2])
    for i in range(2):
        v1 = torch.relu(module.taps[0].weight @ f1[i].mean(dim=(1, 2)) + module.taps[0].bias)
        v2 = torch.relu(module.taps[1].weight @ f2[i] + module.taps[1].bias)
        want = module.head.weight[0] @ torch.cat([v1, v2]) + module.head.bias[0]
        assert out[i].item() == pytest.approx(want.item(), rel=1e-12)
    assert out.shape == (2,)
    with pytest.raises(ConfigError, match="expected 3 channels"):
        module([f1, torch.zeros(2, 4, dtype=torch.float64)])


def test_feature_stages_and_channels():
    cnn = create_model("smallcnn", num_classes=10, in_channels=1)
    assert [stage_channels(s) for s in feature_stages(cnn)] == [32, 64, 128]
    resnet = create_model("resnet18-cifar", num_classes=10, in_channels=3)
    assert [stage_channels(s) for s in feature_stages(resnet)] == [64, 128, 256, 512]
    with pytest.raises(ConfigError, match="'stages' or 'blocks'"):
        feature_stages(nn.Linear(3, 2))
    with pytest.raises(ConfigError, match="output channels"):
        stage_channels(nn.ReLU())


def test_hooks_capture_only_training_and_scoring_passes_and_do_not_leak():
    torch.manual_seed(0)
    strategy = LL4ALStrategy()
    model = create_model("smallcnn", num_classes=10, in_channels=1)
    assert all(len(b._forward_hooks) == 0 for b in model.blocks)
    aux = strategy.auxiliary(model)
    assert [len(b._forward_hooks) for b in model.blocks] == [1, 1, 1]
    x = torch.randn(4, 1, 8, 8)
    model.eval()
    model(x)  # evaluation passes keep nothing
    assert aux._features == [None, None, None]
    with aux.capturing():
        model(x)
    assert [tuple(f.shape[:2]) for f in aux._features] == [(4, 32), (4, 64), (4, 128)]
    aux.take_features()
    assert aux._features == [None, None, None]
    with pytest.raises(RuntimeError, match="no captured features"):
        aux.loss(torch.rand(4), 0, 1)
    model.train()
    ce = F.cross_entropy(model(x), torch.arange(4), reduction="none")
    assert aux.loss(ce, 0, 1).item() >= 0.0
    assert aux._features == [None, None, None]  # taken by the loss
    # preparing the same model again replaces the hooks; another model is untouched
    other = create_model("smallcnn", num_classes=10, in_channels=1)
    aux2 = strategy.auxiliary(model)
    assert aux2 is not aux and [len(b._forward_hooks) for b in model.blocks] == [1, 1, 1]
    assert all(len(b._forward_hooks) == 0 for b in other.blocks)
    # the strategy holds its auxiliaries weakly: the model and its module can be freed
    assert len(strategy._auxiliaries) == 1
    del model, aux, aux2
    gc.collect()
    assert len(strategy._auxiliaries) == 0


def test_gradient_into_backbone_flows_before_the_stop_fraction_and_not_after():
    torch.manual_seed(0)
    model = TinyMLP()
    aux = LossPredictionAuxiliary(model, stop_gradient_fraction=0.5)
    backbone = model.blocks[0][0].weight
    head = aux.module.head.weight
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    model.train()
    for epoch, stopped in [(0, False), (1, False), (2, True), (3, True)]:
        assert aux.gradient_stopped(epoch, 4) is stopped
        ce = F.cross_entropy(model(x), y, reduction="none")
        aux_loss = aux.loss(ce, epoch, 4)  # the auxiliary loss alone
        assert aux_loss.item() > 0
        g_backbone, g_head = torch.autograd.grad(aux_loss, [backbone, head], allow_unused=True)
        assert g_head is not None and g_head.abs().sum() > 0
        if stopped:
            assert g_backbone is None or g_backbone.abs().sum() == 0
        else:
            assert g_backbone is not None and g_backbone.abs().sum() > 0
    # published: 120 of 200 epochs with gradient; fractions 0 and 1 are "always" and "never"
    published = LossPredictionAuxiliary(model)
    assert not published.gradient_stopped(119, 200) and published.gradient_stopped(120, 200)
    always = LossPredictionAuxiliary(model, stop_gradient_fraction=0.0)
    never = LossPredictionAuxiliary(model, stop_gradient_fraction=1.0)
    assert always.gradient_stopped(0, 3) and not never.gradient_stopped(2, 3)


def test_loss_module_training_decreases_the_ranking_loss():
    # a fixed problem: the "true loss" of a sample is a fixed function of its input
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = TinyMLP()
    aux = LossPredictionAuxiliary(model, stop_gradient_fraction=0.0, hidden=16)
    x = torch.randn(32, 4, generator=g)
    true = x[:, 0] + x[:, 1]  # its order is learnable from the frozen random features
    optimizer = torch.optim.SGD(aux.module.parameters(), lr=0.05, momentum=0.9)
    model.train()

    def ranking_loss() -> float:
        with torch.no_grad():
            model(x)
            return aux.loss(true, 0, 1).item()

    before = ranking_loss()
    for _ in range(60):
        order = torch.randperm(32, generator=g)  # new pairs every step
        model(x[order])
        loss = aux.loss(true[order], 0, 1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = ranking_loss()
    assert after < 0.3 * before, (before, after)


# ------------------------------------------------------------------------------------------------
# Selection


def _lookup_setup(seed: int = 0):
    # row sums of the (non-negative) features are the predicted losses by construction
    table = torch.tensor(
        [[0.1, 0.2], [2.0, 1.0], [0.0, 0.3], [5.0, 0.0], [0.4, 0.4], [1.0, 1.5], [0.2, 0.0],
         [0.0, 0.0], [3.0, 0.1], [0.6, 0.6], [0.9, 0.0], [0.0, 1.1]]
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LookupNet(table)
    strategy = create_strategy("ll4al", hidden=2)
    _sum_module(strategy.auxiliary(model))
    return strategy, model, table


def test_selects_the_highest_predicted_losses_known_by_construction():
    strategy, model, table = _lookup_setup()
    pool = _index_pool(len(table))
    labeled = [3, 5]
    candidates = [i for i in range(12) if i not in labeled]
    ctx = _ctx(model, pool, candidates, labeled)
    scores = strategy.score(ctx)
    assert scores.dtype == np.float64
    assert_close_to_scale(scores, table.sum(dim=1)[candidates], rel=1e-6)
    # sums: 1 -> 3.0, 8 -> 3.1, 9 -> 1.2, 11 -> 1.1 (3 and 5 are labelled)
    assert strategy(ctx, 4).tolist() == [8, 1, 9, 11]


def test_selection_is_valid_and_deterministic():
    strategy, model, table = _lookup_setup()
    pool = _index_pool(len(table))
    labeled = [1, 8]
    candidates = [0, 2, 3, 4, 5, 6, 7, 9, 10, 11]
    first = strategy(_ctx(model, pool, candidates, labeled, seed=3), 5)
    assert len(first) == 5 and len(set(first.tolist())) == 5
    assert not set(first.tolist()) & set(labeled) and set(first.tolist()) <= set(candidates)
    again = strategy(_ctx(model, pool, candidates, labeled, seed=3), 5)
    assert first.tolist() == again.tolist()
    # the module's initialisation is seeded by torch's generator (the loop seeds it)
    torch.manual_seed(7)
    a = LL4ALStrategy().auxiliary(TinyMLP())
    torch.manual_seed(7)
    b = LL4ALStrategy().auxiliary(TinyMLP())
    for pa, pb in zip(a.module.parameters(), b.module.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_selection_uses_the_auxiliary_of_the_context_model():
    strategy, model_a, table = _lookup_setup()
    model_b = LookupNet(table.flip(0))
    _sum_module(strategy.auxiliary(model_b), bias=100.0)
    pool = _index_pool(len(table))
    everything = list(range(12))
    sums = table.sum(dim=1).double().numpy()
    model_a.train()
    strategy.auxiliary_for(model_a).module.train()
    assert_close_to_scale(strategy.score(_ctx(model_a, pool, everything)), sums, rel=1e-6)
    # scoring ran in eval mode and gave each module its own mode back
    assert model_a.training and strategy.auxiliary_for(model_a).module.training
    assert_close_to_scale(
        strategy.score(_ctx(model_b, pool, everything)), sums[::-1] + 100.0, rel=1e-6
    )


def test_select_on_an_unprepared_model_raises():
    strategy = create_strategy("ll4al")
    table = torch.rand(6, 2)
    ctx = _ctx(LookupNet(table), _index_pool(6), [0, 1, 2, 3])
    with pytest.raises(ConfigError, match="no loss-prediction module"):
        strategy(ctx, 2)


@pytest.mark.parametrize(
    "params, match",
    [
        ({"margin": -1.0}, "margin"),
        ({"weight": float("nan")}, "weight"),
        ({"margin": float("inf")}, "margin"),
        ({"stop_gradient_fraction": 1.5}, "stop_gradient_fraction"),
        ({"hidden": 0}, "hidden"),
        ({"hidden": 2.5}, "hidden"),
    ],
)
def test_bad_hyper_parameters_raise(params, match):
    with pytest.raises(ConfigError, match=f"^strategy ll4al: {match} must be "):
        create_strategy("ll4al", **params)


def test_registered_hyper_parameters():
    assert accepted_params("ll4al") == {"margin", "weight", "hidden", "stop_gradient_fraction"}
    s = create_strategy("ll4al")
    assert (s.margin, s.weight, s.hidden, s.stop_gradient_fraction) == (1.0, 1.0, 128, 0.6)


# ------------------------------------------------------------------------------------------------
# End to end


def _run(bundle, strategy, seed=0):
    return bundle_trial(
        bundle,
        strategy,
        loop=LoopConfig(cycles=2, initial_fraction=0.1, budget_fraction=0.05, subset_size=40),
        train=TrainConfig(epochs=2, lr=0.05, batch_size=16),
        seed=seed,
    )


def test_run_trial_smallcnn_digits_is_valid_and_deterministic(small_digits):
    strategy = create_strategy("ll4al")
    first = _run(small_digits, strategy)
    selected = first[0].selected
    assert len(selected) == 15 and len(np.unique(selected)) == 15
    assert first[1].num_labeled == 45
    # the same strategy object serves the next trial (a new model, a new module, same seeds)
    again = _run(small_digits, strategy)
    assert again[0].selected.tolist() == selected.tolist()
    gc.collect()
    assert len(strategy._auxiliaries) == 0  # finished trials' modules are not kept


def test_resnet18_cifar_module_has_four_taps_and_scores_candidates():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    # 16x16 rather than 32x32 keeps it fast on a CPU; the four stages and widths are the same
    images = torch.randn(8, 3, 16, 16, generator=g)
    pool = tensor_dataset(images, np.arange(8))
    model = create_model("resnet18-cifar", num_classes=10, in_channels=3)
    strategy = create_strategy("ll4al")
    aux = strategy.auxiliary(model)
    assert aux.module.channels == [64, 128, 256, 512] and len(aux.module.taps) == 4
    assert aux.module.head.in_features == 4 * 128
    before = [p.detach().clone() for p in aux.module.parameters()]
    cfg = TrainConfig(epochs=1, lr=0.01, batch_size=4)
    fit(model, pool, np.arange(4), cfg, device=torch.device("cpu"), seed=0, auxiliary=aux)
    assert any(not torch.equal(a, b) for a, b in zip(before, aux.module.parameters(), strict=True))
    ctx = make_context(model, pool, np.arange(4, 8), np.arange(4), batch_size=4)
    scores = strategy.score(ctx)
    assert scores.shape == (4,) and np.isfinite(scores).all() and len(np.unique(scores)) == 4
    chosen = strategy(ctx, 2)
    assert chosen.tolist() == (np.arange(4, 8)[np.argsort(-scores, kind="stable")[:2]]).tolist()


def test_a_vision_transformer_s_token_features_are_averaged_over_the_tokens():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(8, 1, 8, 8, generator=g)
    pool = tensor_dataset(images, np.arange(8))
    model = create_model(
        "vit-small-cifar", num_classes=10, in_channels=1, image_size=8, num_layers=2
    )
    strategy = create_strategy("ll4al")
    aux = strategy.auxiliary(model)
    assert aux.module.tokens and aux.module.channels == [192, 192]
    tokens = torch.randn(3, 5, 192, generator=g)  # [B, L, D]: 4 patches and the class token
    module = aux.module
    by_hand = module.head(
        torch.cat([torch.relu(fc(tokens.mean(dim=1))) for fc in module.taps], dim=1)
    ).squeeze(1)
    assert torch.allclose(module([tokens, tokens]), by_hand)
    cfg = TrainConfig(epochs=1, lr=0.01, batch_size=4)
    fit(model, pool, np.arange(4), cfg, device=torch.device("cpu"), seed=0, auxiliary=aux)
    ctx = make_context(model, pool, np.arange(4, 8), np.arange(4), batch_size=4)
    scores = strategy.score(ctx)
    assert scores.shape == (4,) and np.isfinite(scores).all()
