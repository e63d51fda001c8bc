"""Sequential GCN baselines (uncertain-gcn, core-gcn): the published adjacency, network and loss
against hand-computed examples, selection rules on cases whose answer is known by construction,
validity, determinism, and runs with both task models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_to_scale, make_context
from torch import nn

import gradnorm_al.strategies.gcn  # noqa: F401  (registers uncertain-gcn and core-gcn)
from gradnorm_al import ConfigError, create_model, create_strategy
from gradnorm_al.data import tensor_dataset
from gradnorm_al.strategies import accepted_params, top_k
from gradnorm_al.strategies import gcn as gcn_mod
from gradnorm_al.strategies.common import seeded_torch
from gradnorm_al.strategies.gcn import (
    SequentialGCN,
    gcn_adjacency,
    gcn_bce_loss,
    train_gcn,
    uncertain_gcn_scores,
)
from gradnorm_al.strategies.samplers import k_center_greedy

NAMES = ("uncertain-gcn", "core-gcn")
TINY = dict(hidden=16, steps=5)


class Lookup(nn.Module):
    """Maps the integer-valued input x (pool row id) to a fixed row of a feature table."""

    def __init__(self, feats) -> None:
        super().__init__()
        self.register_buffer("feats", torch.as_tensor(np.asarray(feats), dtype=torch.float32))
        self.classifier = nn.Linear(self.feats.shape[1], 2)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.feats[x.flatten(1)[:, 0].round().long()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


def _ctx(model, n, candidates, labeled, seed=0, pool=None, batch_size=7):
    if pool is None:
        pool = tensor_dataset(torch.arange(n, dtype=torch.float32).view(n, 1), np.zeros(n))
    return make_context(
        model, pool, candidates, labeled, seed=seed, num_classes=2, batch_size=batch_size
    )


def _random_problem(seed=0, n=40, d=6, n_labeled=10):
    """Non-negative features (as after a ReLU), labelled = the first ``n_labeled`` rows."""
    g = np.random.default_rng(seed)
    feats = np.abs(g.normal(size=(n, d)))
    model = Lookup(feats)
    return model, feats, np.arange(n_labeled, n), np.arange(n_labeled)


# ---------------------------------------------------------------- adjacency


def test_adjacency_hand_computed_4_nodes():
    # unit vectors a=(1,0), b=(0,1), c=(.6,.8), d=(.8,.6): cosines ab=0, ac=.6, ad=.8, bc=.8,
    # bd=.6, cd=.96. S (zero diagonal) has column sums 1.4, 1.4, 2.36, 2.36, and
    # A_ij = S_ij / d_j + [i = j].
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, 0.6]], dtype=torch.float64)
    p, q = 1.4, 2.36
    expected = torch.tensor(
        [
            [1.0, 0.0, 0.6 / q, 0.8 / q],
            [0.0, 1.0, 0.8 / q, 0.6 / q],
            [0.6 / p, 0.8 / p, 1.0, 0.96 / q],
            [0.8 / p, 0.6 / p, 0.96 / q, 1.0],
        ],
        dtype=torch.float64,
    )
    assert_close_to_scale(gcn_adjacency(x), expected, rel=1e-12)
    # the rows are L2-normalised first: any positive scale per node gives the same graph
    scaled = x * torch.tensor([[2.0], [0.5], [10.0], [3.0]], dtype=torch.float64)
    assert_close_to_scale(gcn_adjacency(scaled), expected, rel=1e-12)
    # columns (not rows) of A - I sum to 1; float32 in, float32 out
    a32 = gcn_adjacency(x.float())
    assert a32.dtype == torch.float32
    assert torch.allclose((a32 - torch.eye(4)).sum(dim=0), torch.ones(4))


def test_adjacency_matches_slow_reference():
    g = np.random.default_rng(3)
    f = np.abs(g.normal(size=(9, 5)))
    got = gcn_adjacency(torch.from_numpy(f)).numpy()
    x = [[v / math.sqrt(sum(u * u for u in row)) for v in row] for row in f.tolist()]
    n = len(x)
    s = [[sum(a * b for a, b in zip(x[i], x[j])) - (i == j) for j in range(n)] for i in range(n)]
    d = [sum(s[i][j] for i in range(n)) for j in range(n)]
    ref = [[s[i][j] / d[j] + (i == j) for j in range(n)] for i in range(n)]
    assert_close_to_scale(got, ref, rel=1e-12)


def test_adjacency_isolated_node_keeps_its_self_loop_only():
    # node 2 is orthogonal to the others: its column sum is 0 (the published division would
    # give NaN); its column is left zero, so it keeps only the self-loop
    x = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 4.0]], dtype=torch.float64)
    a = gcn_adjacency(x)
    assert torch.isfinite(a).all()
    assert a[:, 2].tolist() == [0.0, 0.0, 1.0]
    assert a[2, :2].tolist() == [0.0, 0.0]
    assert_close_to_scale(a[:2, :2], torch.ones(2, 2), rel=1e-12)  # 1/sqrt2 / 1/sqrt2


# ---------------------------------------------------------------- network and loss


def test_gcn_bce_loss_hand_computed():
    s = torch.tensor([0.8, 0.2, 0.5, 0.4, 0.1], dtype=torch.float64)
    lab = torch.tensor([True, False, True, False, False])
    logits = torch.log(s / (1 - s))
    expected = (
        -(math.log(0.8) + math.log(0.5)) / 2
        - 1.2 * (math.log(0.8) + math.log(0.6) + math.log(0.9)) / 3
    )
    assert gcn_bce_loss(logits, lab, 1.2).item() == pytest.approx(expected, rel=1e-12)
    # lambda weights only the unlabelled term
    assert gcn_bce_loss(logits, lab, 0.0).item() == pytest.approx(
        -(math.log(0.8) + math.log(0.5)) / 2, rel=1e-12
    )
    # stays finite where the published log(sigmoid) would saturate to -inf
    assert math.isfinite(gcn_bce_loss(torch.tensor([-200.0, 200.0]), lab[:2]).item())


def test_gcn_forward_is_the_published_two_layer_formula():
    torch.manual_seed(0)
    gcn = SequentialGCN(5, hidden=7, dropout=0.3).double().eval()
    for layer in (gcn.gc1, gcn.gc2):  # published init: uniform in +-1/sqrt(fan_out)
        bound = 1 / math.sqrt(layer.weight.shape[1])
        assert layer.weight.abs().max() <= bound and layer.bias.abs().max() <= bound
    x = torch.rand(6, 5, dtype=torch.float64)
    adj = gcn_adjacency(x)
    scores, hidden, logits = gcn(x, adj)
    h = torch.relu(adj @ x @ gcn.gc1.weight + gcn.gc1.bias)
    z = (adj @ h @ gcn.gc2.weight + gcn.gc2.bias).squeeze(1)
    assert_close_to_scale(hidden, h, rel=1e-12)
    assert_close_to_scale(logits, z, rel=1e-12)
    assert_close_to_scale(scores, torch.sigmoid(z), rel=1e-12)
    assert scores.shape == (6,) and hidden.shape == (6, 7)
    gcn.train()  # dropout acts on the hidden layer in training only
    _, hidden_train, _ = gcn(x, adj)
    assert (hidden_train == 0).sum() > (hidden == 0).sum()


def test_train_gcn_loss_decreases_on_a_small_problem():
    # labelled nodes near one direction, most unlabelled near another: separable
    g = np.random.default_rng(0)
    a, b = np.eye(8)[0] * 3, np.eye(8)[1] * 3
    f = np.abs(np.vstack([a + 0.3 * g.normal(size=(10, 8)), b + 0.3 * g.normal(size=(30, 8))]))
    x = F.normalize(torch.tensor(f, dtype=torch.float32), dim=1)
    mask = torch.arange(40) < 10
    with seeded_torch(torch.device("cpu"), 0):
        gcn, losses = train_gcn(x, gcn_adjacency(x), mask, steps=40)  # published settings
    assert len(losses) == 40
    assert losses[-1] < 0.2 * losses[0]  # seeds 0-3 all end below 0.08 x the first loss
    assert not gcn.training
    with torch.no_grad():
        scores, _, _ = gcn(x, gcn_adjacency(x))
    assert scores[:10].min() > scores[10:].max()  # it tells labelled from unlabelled


# ---------------------------------------------------------------- selection rules


def test_uncertain_gcn_scores_pick_the_scores_closest_to_the_margin():
    s = np.array([0.9, 0.12, 0.05, 0.3, 0.1, 0.11, 0.0])
    # |s - 0.1| = .8, .02, .05, .2, 0, .01, .1
    u = uncertain_gcn_scores(s, 0.1)
    np.testing.assert_allclose(u, -np.array([0.8, 0.02, 0.05, 0.2, 0.0, 0.01, 0.1]), atol=1e-15)
    assert u.dtype == np.float64
    cand = np.arange(100, 107)
    assert top_k(u, cand, 3).tolist() == [104, 105, 101]
    # margin 0.5: .4, .38, .45, .2, .4, .39, .5 -> 103, then 101, then 105
    assert top_k(uncertain_gcn_scores(torch.tensor(s), 0.5), cand, 3).tolist() == [103, 101, 105]


def _two_groups():
    """Labelled rows 0-3 and candidate rows 4-7 share one feature; candidates 8-19 another
    (orthogonal: two disconnected graph components)."""
    feats = np.zeros((20, 3))
    feats[:8, 0] = 1.0
    feats[8:, 1] = 1.0
    return Lookup(feats), np.arange(4, 20), np.arange(4)


def test_uncertain_gcn_known_construction():
    # Candidates 4-7 are indistinguishable from the labelled nodes, so they get the labelled
    # nodes' (high) score; candidates 8-19 are pushed to 0. s_margin = 1 picks the former,
    # s_margin = 0 the latter.
    model, cand, lab = _two_groups()
    params = dict(hidden=16, steps=40, lr=1e-2, dropout=0.0)  # 20 suffice for seeds 0-7
    pick = create_strategy("uncertain-gcn", s_margin=1.0, **params)(_ctx(model, 20, cand, lab), 4)
    assert sorted(pick.tolist()) == [4, 5, 6, 7]
    pick = create_strategy("uncertain-gcn", s_margin=0.0, **params)(_ctx(model, 20, cand, lab), 4)
    assert set(pick.tolist()) <= set(range(8, 20))


def test_core_gcn_known_construction():
    # 4 orthogonal clusters; the labelled samples cover clusters 0 and 1 and candidates in them
    # coincide with labelled nodes: k = 2 must pick one candidate from cluster 2 and one from 3.
    cluster = np.array([0, 0, 0, 1, 1, 1] + [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    model = Lookup(np.eye(4)[cluster])
    lab, cand = np.arange(6), np.arange(6, 18)
    for seed in range(3):
        pick = create_strategy("core-gcn", **TINY)(_ctx(model, 18, cand, lab, seed=seed), 2)
        assert sorted(cluster[pick].tolist()) == [2, 3]


def test_core_gcn_runs_k_center_greedy_on_the_gcn_features(monkeypatch):
    model, _, cand, lab = _random_problem()
    calls = []

    def spy(points, centres, k, **kw):
        calls.append((points.clone(), centres.clone()))
        return k_center_greedy(points, centres, k, **kw)

    monkeypatch.setattr(gcn_mod, "k_center_greedy", spy)
    strategy = create_strategy("core-gcn", **TINY)
    pick = strategy(_ctx(model, 40, cand, lab, seed=4), 5)
    # recompute the GCN on the same context: its [hidden | logit] node features, candidates
    # first, then the labelled nodes as centres
    nodes, _, hidden, logits = strategy.fit_graph(_ctx(model, 40, cand, lab, seed=4), 5)
    assert nodes.tolist() == [*cand.tolist(), *lab.tolist()]
    feats = torch.cat([hidden, logits[:, None]], dim=1)
    ((points, centres),) = calls
    assert points.shape == (30, 17) and centres.shape == (10, 17)
    assert torch.equal(points, feats[:30]) and torch.equal(centres, feats[30:])
    assert pick.tolist() == cand[k_center_greedy(feats[:30], feats[30:], 5)].tolist()


def test_fit_graph_matches_an_independent_recomputation():
    # node inputs = L2-normalised embed features, graph = gcn_adjacency of them, GCN seeded with
    # the first draw of ctx.rng; uncertain-gcn = top-k of -|s - s_margin| over the candidates
    model, feats, cand, lab = _random_problem(seed=1)
    strategy = create_strategy("uncertain-gcn", s_margin=0.3, **TINY)
    pick = strategy(_ctx(model, 40, cand, lab, seed=7), 6)
    x = F.normalize(torch.tensor(feats[np.r_[cand, lab]], dtype=torch.float32), dim=1)
    seed = int(np.random.default_rng(7).integers(0, 2**63 - 1))
    with seeded_torch(torch.device("cpu"), seed):
        gcn, _ = train_gcn(x, gcn_adjacency(x), torch.arange(40) >= 30, hidden=16, steps=5)
    with torch.no_grad():
        scores, _, _ = gcn(x, gcn_adjacency(x))
    assert pick.tolist() == top_k(uncertain_gcn_scores(scores[:30], 0.3), cand, 6).tolist()


# ---------------------------------------------------------------- validity, determinism, options


@pytest.mark.parametrize("name", NAMES)
def test_selection_valid_and_deterministic(name):
    model, _, cand, lab = _random_problem(seed=2)
    cand = np.concatenate([cand[::2], cand[1::2]])  # not sorted
    strategy = create_strategy(name, **TINY)
    picks = [strategy(_ctx(model, 40, cand, lab, seed=s), 8) for s in (5, 5, 6)]
    for pick in picks:
        assert len(pick) == 8 and len(set(pick.tolist())) == 8
        assert np.isin(pick, cand).all() and not np.isin(pick, lab).any()
    assert picks[0].tolist() == picks[1].tolist()
    # the torch random stream of the caller is left as it was
    torch.manual_seed(1)
    before = torch.rand(1)
    torch.manual_seed(1)
    strategy(_ctx(model, 40, cand, lab), 3)
    assert torch.equal(torch.rand(1), before)


@pytest.mark.parametrize("name", NAMES)
def test_max_candidates_caps_the_graph(name, monkeypatch):
    model, _, cand, lab = _random_problem(seed=3)
    sizes = []
    real = gcn_mod.gcn_adjacency
    monkeypatch.setattr(gcn_mod, "gcn_adjacency", lambda x: sizes.append(len(x)) or real(x))
    strategy = create_strategy(name, max_candidates=12, **TINY)
    pick = strategy(_ctx(model, 40, cand, lab, seed=1), 4)
    assert sizes == [12 + 10]
    assert len(set(pick.tolist())) == 4 and np.isin(pick, cand).all()
    assert pick.tolist() == strategy(_ctx(model, 40, cand, lab, seed=1), 4).tolist()
    with pytest.raises(ConfigError, match="max_candidates 3 is smaller than the budget 4"):
        create_strategy(name, max_candidates=3, **TINY)(_ctx(model, 40, cand, lab), 4)
    # a cap at or above the number of candidates uses them all
    sizes.clear()
    create_strategy(name, max_candidates=500, **TINY)(_ctx(model, 40, cand, lab), 4)
    assert sizes == [40]


def test_options_are_validated():
    assert accepted_params("uncertain-gcn") == {
        "hidden",
        "dropout",
        "lr",
        "weight_decay",
        "steps",
        "lambda_loss",
        "s_margin",
        "max_candidates",
    }
    assert accepted_params("core-gcn") == accepted_params("uncertain-gcn") - {"s_margin"}
    s = create_strategy("uncertain-gcn")
    assert (s.hidden, s.dropout, s.lr, s.weight_decay, s.steps) == (128, 0.3, 1e-3, 5e-4, 200)
    assert (s.lambda_loss, s.s_margin, s.max_candidates) == (1.2, 0.1, None)
    bad = [
        ("hidden", 0),
        ("hidden", 2.5),
        ("steps", True),
        ("dropout", 1.0),
        ("dropout", "x"),
        ("lr", 0),
        ("weight_decay", -1),
        ("lambda_loss", float("nan")),
        ("max_candidates", 0),
    ]
    for name in NAMES:
        for key, value in bad:
            with pytest.raises(ConfigError, match=f"^strategy {name}: {key} must be .*, got "):
                create_strategy(name, **{key: value})
    for value in (-0.1, 1.5):
        with pytest.raises(ConfigError, match=r"s_margin must be a number in \[0, 1\]"):
            create_strategy("uncertain-gcn", s_margin=value)


@pytest.mark.parametrize("name", NAMES)
def test_needs_labelled_samples(name):
    model, _, _, _ = _random_problem()
    with pytest.raises(ConfigError, match="no labelled samples"):
        create_strategy(name, **TINY)(_ctx(model, 40, np.arange(40), []), 2)


# ---------------------------------------------------------------- task models


def test_runs_with_smallcnn_on_digits(small_digits):
    torch.manual_seed(0)
    model = create_model("smallcnn", num_classes=10, in_channels=1).eval()
    lab, cand = np.arange(20), np.arange(20, 60)
    for name in NAMES:
        ctx = _ctx(model, 300, cand, lab, seed=0, pool=small_digits.train, batch_size=32)
        pick = create_strategy(name, **TINY)(ctx, 5)
        assert len(set(pick.tolist())) == 5 and np.isin(pick, cand).all()


def test_runs_with_resnet18_cifar():
    torch.manual_seed(0)
    model = create_model("resnet18-cifar", num_classes=10, in_channels=3).eval()
    pool = tensor_dataset(torch.rand(6, 3, 32, 32), np.arange(6))
    lab, cand = np.arange(2), np.arange(2, 6)
    for name in NAMES:
        pick = create_strategy(name, hidden=8, steps=3)(_ctx(model, 6, cand, lab, pool=pool), 2)
        assert len(set(pick.tolist())) == 2 and np.isin(pick, cand).all()
