"""Uncertainty baselines (entropy, margin, least confidence) and expected gradient length."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_to_scale, randomise_bn
from torch import nn

from gradnorm_al import ConfigError, create_strategy
from gradnorm_al.data import tensor_dataset
from gradnorm_al.pergrad import FallbackWarning
from gradnorm_al.strategies import SelectionContext, accepted_params
from gradnorm_al.strategies.egl import expected_gradient_lengths
from gradnorm_al.strategies.uncertainty import (
    entropy_scores,
    least_confidence_scores,
    margin_scores,
)

UNCERTAINTY = ("entropy", "margin", "least-confidence")

# Per-sample logits, C = 4. Probabilities (entropy / margin / least confidence):
#   uniform   [0, 0, 0, 0]     -> H = ln 4 = 1.386, margin 0,      1 - max = 0.750
#   tie       [2, 2, 0, 0]     -> H = 1.059,        margin 0,      1 - max = 0.560
#   confident [8, 0, 0, 0]     -> H = 0.009,        margin -0.999, 1 - max = 0.001
#   leaning   [1.5, 0, 0, 0]   -> H = 1.114,        margin -0.465, 1 - max = 0.401
UNIFORM, TIE, CONFIDENT, LEANING = [0.0] * 4, [2.0, 2.0, 0, 0], [8.0, 0, 0, 0], [1.5, 0, 0, 0]


class Lookup(nn.Module):
    """Maps an integer-valued input x [n, 1] to the fixed logits row ``table[x]``; the table is
    an ``nn.Embedding`` (trainable, for EGL) whose gradient for sample x lives in row x alone."""

    def __init__(self, table: list[list[float]]) -> None:
        super().__init__()
        t = torch.tensor(table, dtype=torch.float64)
        self.table = nn.Embedding(t.shape[0], t.shape[1], _weight=t.clone())

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.table(x.long().view(-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x)


def _lookup_ctx(rows, candidates, labeled=(), seed=0, batch_size=128):
    model = Lookup(rows)
    ids = torch.arange(len(rows), dtype=torch.float32)[:, None]
    pool = tensor_dataset(ids, np.zeros(len(rows)))
    return SelectionContext(
        model=model,
        pool=pool,
        candidates=np.asarray(candidates, dtype=np.int64),
        labeled=np.asarray(labeled, dtype=np.int64),
        num_classes=len(rows[0]),
        device=torch.device("cpu"),
        rng=np.random.default_rng(seed),
        batch_size=batch_size,
    )


# ---------------------------------------------------------------- formulas, hand-computed
def test_uncertainty_formulas_on_hand_computed_probabilities():
    probs = torch.tensor(
        [[0.5, 0.5, 0.0], [0.7, 0.2, 0.1], [1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.1, 0.3, 0.6]],
        dtype=torch.float64,
    )
    h_mid = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1))
    h_last = -(0.1 * math.log(0.1) + 0.3 * math.log(0.3) + 0.6 * math.log(0.6))
    expected_h = [math.log(2), h_mid, 0.0, math.log(3), h_last]
    assert entropy_scores(probs).tolist() == pytest.approx(expected_h, abs=1e-15)
    assert margin_scores(probs).tolist() == pytest.approx([0.0, -0.5, -1.0, 0.0, -0.3], abs=1e-15)
    assert least_confidence_scores(probs).tolist() == pytest.approx(
        [0.5, 0.3, 0.0, 2 / 3, 0.4], abs=1e-15
    )


def test_uncertainty_formulas_reject_bad_shapes():
    with pytest.raises(ValueError, match="at least 2 classes"):
        margin_scores(torch.ones(3, 1))
    for formula in (entropy_scores, margin_scores, least_confidence_scores):
        with pytest.raises(ValueError, match=r"\[n, C, \.\.\.\]"):
            formula(torch.ones(4))


# ---------------------------------------------------------------- known by construction
@pytest.mark.parametrize(
    "name, expected",
    [
        # entropy: uniform (1.386) and leaning (1.114) beat tie (1.059)
        ("entropy", {1, 6}),
        # margin: uniform and tie both have a zero gap
        ("margin", {1, 5}),
        # least confidence: uniform (0.75) and tie (0.56) beat leaning (0.40)
        ("least-confidence", {1, 5}),
    ],
)
def test_uncertainty_picks_the_rows_known_by_construction(name, expected):
    # pool rows 0 and 3 are uniform too, but labelled: they are not candidates
    rows = [UNIFORM, UNIFORM, CONFIDENT, UNIFORM, CONFIDENT, TIE, LEANING, CONFIDENT]
    ctx = _lookup_ctx(rows, candidates=[7, 6, 5, 4, 2, 1], labeled=[0, 3])
    chosen = create_strategy(name)(ctx, 2)
    assert set(chosen.tolist()) == expected
    assert not np.isin(chosen, ctx.labeled).any()
    # the strategy's scores are the formula of the softmax, in candidate order
    strategy = create_strategy(name)
    probs = torch.tensor([rows[i] for i in ctx.candidates], dtype=torch.float64).softmax(dim=1)
    formula = {
        "entropy": entropy_scores,
        "margin": margin_scores,
        "least-confidence": least_confidence_scores,
    }[name]
    np.testing.assert_allclose(strategy.score(ctx), formula(probs).numpy(), rtol=0, atol=1e-15)


@pytest.mark.parametrize("name", [*UNCERTAINTY, "egl"])
def test_selection_is_valid_and_deterministic(name):
    rows = [UNIFORM, TIE, LEANING, CONFIDENT] * 5
    candidates = np.arange(4, 20)
    labeled = np.arange(4)
    # a small batch size: EGL then scores the 16 candidates in several engine calls
    a = create_strategy(name)(_lookup_ctx(rows, candidates, labeled, seed=1, batch_size=8), 9)
    b = create_strategy(name)(_lookup_ctx(rows, candidates, labeled, seed=1, batch_size=8), 9)
    c = create_strategy(name)(_lookup_ctx(rows, candidates, labeled, seed=2, batch_size=8), 9)
    assert np.array_equal(a, b) and np.array_equal(a, c)  # no randomness at all
    assert len(np.unique(a)) == 9 and np.isin(a, candidates).all()
    assert not np.isin(a, labeled).any()
    # taking every candidate returns each once
    everything = create_strategy(name)(_lookup_ctx(rows, candidates, labeled), 16)
    assert sorted(everything.tolist()) == candidates.tolist()


# ---------------------------------------------------------------- EGL
def _egl_slow(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(l2, tensor-sum) EGL by one backward per (sample, label) over all parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    l2, tsum = [], []
    model.eval()
    for xi in x:
        logits = model(xi[None])
        p = logits.detach().double().softmax(dim=1)[0]
        s_l2 = s_ts = 0.0
        for y in range(logits.shape[1]):
            loss = F.cross_entropy(logits, torch.tensor([y]))
            grads = torch.autograd.grad(loss, params, retain_graph=True)
            sq = [g.double().pow(2).sum().item() for g in grads]
            s_l2 += p[y].item() * math.sqrt(sum(sq))
            s_ts += p[y].item() * sum(math.sqrt(v) for v in sq)
        l2.append(s_l2)
        tsum.append(s_ts)
    return torch.tensor(l2, dtype=torch.float64), torch.tensor(tsum, dtype=torch.float64)


def _conv_bn_net(num_classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 5 * 5, num_classes),
    )
    return randomise_bn(net).double()


def test_egl_matches_one_backward_per_sample_and_label():
    model = _conv_bn_net().train()  # training mode on purpose: EGL must use eval mode
    x = torch.randn(7, 2, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    # batch_size 8 with C = 4: two inputs (eight rows) per engine call, the last call one input
    l2 = expected_gradient_lengths(model, x, batch_size=8)
    tsum = expected_gradient_lengths(model, x, num_classes=4, norm="tensor-sum", batch_size=1)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(p.grad is None for p in model.parameters())
    ref_l2, ref_tsum = _egl_slow(model, x)
    assert l2.dtype == torch.float64 and l2.shape == (7,)
    assert_close_to_scale(l2, ref_l2, rel=1e-12)
    assert_close_to_scale(tsum, ref_tsum, rel=1e-12)
    assert (tsum > l2).all()  # sum of tensor norms exceeds the global norm (3+ tensors)


def test_egl_of_a_linear_model_by_hand():
    # CE(Wx + b, y) has gradient (p - e_y) x^T for W and p - e_y for b, so
    # ||grad||^2 = ||p - e_y||^2 (||x||^2 + 1) and EGL = sqrt(||x||^2 + 1) sum_y p_y ||p - e_y||
    model = nn.Linear(3, 3).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0], [0.0, -1.0, 1.0]]))
        model.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    x = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [-1.0, 0.5, 2.0]], dtype=torch.float64)
    eye = torch.eye(3, dtype=torch.float64)
    expected_l2, expected_tsum = [], []
    for xi in x:
        z = model.weight.detach() @ xi + model.bias.detach()
        p = torch.exp(z) / torch.exp(z).sum()
        gaps = [torch.linalg.vector_norm(p - eye[y]) for y in range(3)]
        expected_l2.append(sum(p[y] * gaps[y] for y in range(3)) * math.sqrt(xi @ xi + 1))
        expected_tsum.append(sum(p[y] * gaps[y] for y in range(3)) * (math.sqrt(xi @ xi) + 1))
    l2, tsum = (
        expected_gradient_lengths(model, x),
        expected_gradient_lengths(model, x, norm="tensor-sum"),
    )
    assert_close_to_scale(l2, torch.stack(expected_l2), rel=1e-12)
    assert_close_to_scale(tsum, torch.stack(expected_tsum), rel=1e-12)


def test_egl_picks_the_lookup_rows_known_by_construction():
    # only row x of the table gets a gradient, p - e_y: EGL(x) = sum_y p_y ||p - e_y||,
    # sqrt(3/4) = 0.866 for a uniform row, 0.766 for the tie, ~0.002 for the confident row
    rows = [CONFIDENT, TIE, UNIFORM, CONFIDENT, LEANING, UNIFORM, CONFIDENT]
    ctx = _lookup_ctx(rows, candidates=[0, 1, 2, 3, 4, 5, 6])
    eye = torch.eye(4, dtype=torch.float64)
    probs = torch.tensor(rows, dtype=torch.float64).softmax(dim=1)
    by_hand = [
        sum(p[y] * torch.linalg.vector_norm(p - eye[y]) for y in range(4)).item() for p in probs
    ]
    assert by_hand[2] == pytest.approx(math.sqrt(0.75), rel=1e-12)
    strategy = create_strategy("egl")
    assert_close_to_scale(strategy.score(ctx), by_hand, rel=1e-12)
    assert set(strategy(ctx, 2).tolist()) == {2, 5}
    assert set(strategy(ctx, 3).tolist()) == {1, 2, 5}


class _Tied(nn.Module):
    """The same Linear called twice: the engine's batched path refuses it and falls back."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.tanh(self.lin(x)))


def test_egl_stays_exact_when_the_engine_falls_back():
    model = _Tied().double()
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with pytest.warns(FallbackWarning):
        l2 = expected_gradient_lengths(model, x, batch_size=8)
    assert_close_to_scale(l2, _egl_slow(model, x)[0], rel=1e-12)


def test_egl_validates_its_options():
    assert accepted_params("egl") == {"norm"}
    for bad in ("per-tensor", "linf"):
        with pytest.raises(ConfigError, match="egl: norm must be one of 'l2', 'tensor-sum', got"):
            create_strategy("egl", norm=bad)
    model = nn.Linear(3, 2).double()
    x = torch.zeros(2, 3, dtype=torch.float64)
    with pytest.raises(ConfigError, match="num_classes is 5"):
        expected_gradient_lengths(model, x, num_classes=5)
    with pytest.raises(ConfigError, match=r"logits \[n, C\]"):
        expected_gradient_lengths(nn.Conv2d(3, 2, 1).double(), torch.zeros(2, 3, 4, 4))
    assert expected_gradient_lengths(model, x[:0]).shape == (0,)


# ---------------------------------------------------------------- real data
def test_every_baseline_runs_on_real_digits(small_digits):
    from gradnorm_al.models import create_model

    torch.manual_seed(0)
    model = create_model("smallcnn", num_classes=10, in_channels=1).eval()
    candidates = np.arange(40, 64)
    labeled = np.arange(40)
    ctx = SelectionContext(
        model=model,
        pool=small_digits.train_eval,
        candidates=candidates,
        labeled=labeled,
        num_classes=10,
        device=torch.device("cpu"),
        rng=np.random.default_rng(0),
        batch_size=64,
    )
    for name in (*UNCERTAINTY, "egl"):
        chosen = create_strategy(name)(ctx, 5)
        assert chosen.shape == (5,) and len(np.unique(chosen)) == 5
        assert np.isin(chosen, candidates).all() and not np.isin(chosen, labeled).any()
    # EGL through the strategy = the pure function on the candidate images
    x = small_digits.train_eval.tensors[0][candidates]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)  # smallcnn has batched rules throughout
        scores = expected_gradient_lengths(model, x, batch_size=64).numpy()
    assert np.all(scores > 0)
    assert_close_to_scale(create_strategy("egl").score(ctx), scores, rel=1e-12)
