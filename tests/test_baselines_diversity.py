"""Diversity baselines: core-set (k-center greedy) and BADGE (k-means++ over gradient
embeddings), against brute-force references and cases whose answer is known by construction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_to_scale, make_context
from torch import nn

from gradnorm_al import ConfigError, create_strategy
from gradnorm_al.data import tensor_dataset
from gradnorm_al.strategies import SelectionContext
from gradnorm_al.strategies import samplers as coreset_mod
from gradnorm_al.strategies.samplers import (
    badge_embeddings_factors,
    gradient_sq_dists_to,
    gradient_sq_norms,
    k_center_greedy,
    kmeans_pp_factorised,
    min_sq_dists,
)


class Lookup(nn.Module):
    """Maps the integer-valued input x (pool row id) to fixed rows of a feature / logit table."""

    def __init__(self, feats: torch.Tensor, logits: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("feats", torch.as_tensor(feats, dtype=torch.float32))
        if logits is None:
            logits = torch.zeros(len(feats), 3)
        self.register_buffer("logits", torch.as_tensor(logits, dtype=torch.float32))

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, 0].round().long()

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.feats[self._rows(x)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[self._rows(x)]


def _ctx(model, n, candidates, labeled=(), seed=0, num_classes=3, batch_size=7):
    pool = tensor_dataset(torch.arange(n, dtype=torch.float32)[:, None], np.zeros(n))
    return make_context(
        model, pool, candidates, labeled, seed=seed, num_classes=num_classes, batch_size=batch_size
    )


def _clusters(seed=0, per=10, d=6, spread=1e-3):
    """4 tight clusters far apart, ``per`` points each, rows grouped by cluster."""
    g = np.random.default_rng(seed)
    centres = np.eye(4, d) * 100.0 + g.normal(size=(4, d))
    feats = np.repeat(centres, per, axis=0) + spread * g.normal(size=(4 * per, d))
    return feats, np.repeat(np.arange(4), per)


# ---------------------------------------------------------------- core-set


def _k_center_reference(cand: np.ndarray, centres: np.ndarray, k: int, first=None) -> list[int]:
    """Brute force: all pairwise distances, exact argmax with first-index ties."""
    chosen = [] if first is None else [first]
    for _ in range(k - len(chosen)):
        covered = [*map(tuple, centres), *(tuple(cand[c]) for c in chosen)]
        best, best_d = -1, -1.0
        for j in range(len(cand)):
            if j in chosen:
                continue
            d = min(float(np.sqrt(((cand[j] - np.array(c)) ** 2).sum())) for c in covered)
            if d > best_d:
                best, best_d = j, d
        chosen.append(best)
    return chosen


def test_k_center_greedy_hand_computed_example():
    # 1-D: candidates 1, 4, 10, 6; centre 0. min dists 1,4,10,6 -> pick 10 (pos 2); then
    # 1,4,-,4 -> tie between pos 1 and pos 3 goes to pos 1; then 1,-,-,2 -> pos 3; then pos 0
    cand = torch.tensor([[1.0], [4.0], [10.0], [6.0]])
    assert k_center_greedy(cand, torch.tensor([[0.0]]), 4).tolist() == [2, 1, 3, 0]


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_k_center_greedy_matches_brute_force(chunk):
    g = np.random.default_rng(chunk)
    cand, centres = g.normal(size=(40, 5)), g.normal(size=(13, 5))
    got = k_center_greedy(torch.from_numpy(cand), torch.from_numpy(centres), 12, chunk_size=chunk)
    assert got.tolist() == _k_center_reference(cand, centres, 12)
    # small integer coordinates: every distance is exact, so ties (plenty here) must resolve to
    # the first position exactly as in the reference; includes candidates equal to centres
    cand, centres = g.integers(0, 3, size=(30, 2)).astype(float), np.array([[0.0, 0.0], [2, 2]])
    got = k_center_greedy(torch.from_numpy(cand), torch.from_numpy(centres), 30, chunk_size=chunk)
    assert got.tolist() == _k_center_reference(cand, centres, 30)
    assert sorted(got.tolist()) == list(range(30))  # k = M: a permutation, no repeats


def test_k_center_greedy_without_centres_starts_where_the_rng_says():
    g = np.random.default_rng(5)
    cand = g.normal(size=(25, 3))
    first = int(np.random.default_rng(9).integers(25))
    got = k_center_greedy(cand, None, 6, rng=np.random.default_rng(9))
    assert got[0] == first
    assert got.tolist() == _k_center_reference(cand, np.zeros((0, 3)), 6, first=first)
    assert (
        got.tolist()
        == k_center_greedy(cand, np.zeros((0, 3)), 6, rng=np.random.default_rng(9)).tolist()
    )
    with pytest.raises(ValueError, match="rng"):
        k_center_greedy(cand, None, 2)
    with pytest.raises(ValueError, match="cannot pick"):
        k_center_greedy(cand, None, 26, rng=g)


def test_min_sq_dists_is_chunked_and_exact(monkeypatch):
    g = np.random.default_rng(1)
    pts, cen = torch.from_numpy(g.normal(size=(23, 4))), torch.from_numpy(g.normal(size=(17, 4)))
    ref = ((pts[:, None, :] - cen[None]) ** 2).sum(-1).min(dim=1).values
    shapes = []
    real = coreset_mod._sq_dists

    def spy(a, b, a_sq, b_sq):
        shapes.append((len(a), len(b)))
        return real(a, b, a_sq, b_sq)

    monkeypatch.setattr(coreset_mod, "_sq_dists", spy)
    got = min_sq_dists(pts, cen, chunk_size=5)
    assert_close_to_scale(got, ref, rel=1e-12)
    assert max(max(s) for s in shapes) <= 5 and len(shapes) == 5 * 4


def test_core_set_covers_the_uncovered_clusters():
    feats, cluster = _clusters()
    labeled = np.arange(0, 10, 2)  # half of cluster 0
    candidates = np.setdiff1d(np.arange(40), labeled)
    ctx = _ctx(Lookup(torch.from_numpy(feats)), 40, candidates, labeled)
    chosen = create_strategy("core-set", chunk_size=3)(ctx, 3)
    assert sorted(cluster[chosen].tolist()) == [1, 2, 3]
    # one more sample than uncovered clusters: the 4th goes back to a covered cluster
    chosen = create_strategy("core-set")(ctx, 4)
    assert set(cluster[chosen[:3]].tolist()) == {1, 2, 3}


def test_core_set_selection_is_valid_and_deterministic():
    g = np.random.default_rng(3)
    feats = torch.from_numpy(g.normal(size=(60, 4)))
    feats[30:40] = feats[0]  # duplicates of a labelled point
    model = Lookup(feats)
    strategy = create_strategy("core-set")
    for labeled in (np.arange(0, 60, 3), np.zeros(0, dtype=np.int64)):
        candidates = np.setdiff1d(np.arange(60), labeled)
        a = strategy(_ctx(model, 60, candidates, labeled, seed=4), len(candidates))
        b = strategy(_ctx(model, 60, candidates, labeled, seed=4), len(candidates))
        assert np.array_equal(a, b)
        assert sorted(a.tolist()) == candidates.tolist()  # all, no labelled, no duplicates
    # without labelled samples the start, hence the selection, depends on the seed
    picks = {tuple(strategy(_ctx(model, 60, np.arange(60), seed=s), 3)) for s in range(5)}
    assert len(picks) > 1


def test_core_set_rejects_a_bad_chunk_size():
    with pytest.raises(ConfigError, match="chunk_size"):
        create_strategy("core-set", chunk_size=0)


# ---------------------------------------------------------------- BADGE


def test_badge_factors_are_the_last_layer_weight_gradient_under_the_predicted_label():
    torch.manual_seed(0)
    h = torch.randn(6, 4, dtype=torch.float64)
    layer = nn.Linear(4, 3).double()
    logits = layer(h)
    probs = F.softmax(logits, dim=1).detach()
    u, hh = badge_embeddings_factors(probs, h)
    yhat = probs.argmax(dim=1)
    for i in range(6):
        layer.zero_grad()
        F.cross_entropy(layer(h[i : i + 1]), yhat[i : i + 1]).backward()
        assert_close_to_scale(torch.outer(u[i], hh[i]), layer.weight.grad, rel=1e-12)


def test_badge_hand_computed_factors_and_norm():
    f64 = torch.float64
    u, h = badge_embeddings_factors(
        torch.tensor([[0.7, 0.2, 0.1]], dtype=f64), torch.tensor([[1.0, 2.0]], dtype=f64)
    )
    assert torch.allclose(u, torch.tensor([[-0.3, 0.2, 0.1]], dtype=torch.float64))
    # ||u||^2 = 0.09 + 0.04 + 0.01 = 0.14, ||h||^2 = 5
    assert gradient_sq_norms(u, h).item() == pytest.approx(0.7, abs=1e-15)
    # argmax ties go to the first class
    u, _ = badge_embeddings_factors(torch.tensor([[0.4, 0.4, 0.2]]), torch.ones(1, 1))
    assert u.tolist() == [[pytest.approx(-0.6), pytest.approx(0.4), pytest.approx(0.2)]]


def test_factorised_distances_match_explicit_embeddings():
    g = np.random.default_rng(0)
    probs = torch.from_numpy(g.dirichlet(np.ones(5), size=30))
    feats = torch.from_numpy(g.normal(size=(30, 7)))
    u, h = badge_embeddings_factors(probs, feats)
    emb = torch.stack([torch.outer(u[i], h[i]).flatten() for i in range(30)])  # [N, C*d]
    sq_norms = (emb**2).sum(1)
    assert_close_to_scale(gradient_sq_norms(u, h), sq_norms, rel=1e-12)
    for j in (0, 11, 29):
        explicit = ((emb - emb[j]) ** 2).sum(1)  # its own entry j is exactly 0
        assert_close_to_scale(gradient_sq_dists_to(u, h, j), explicit, rel=1e-12)
    # a sample's distance to itself: zero up to rounding at the scale of the squared norms
    assert abs(float(gradient_sq_dists_to(u, h, 11)[11])) <= 1e-12 * float(sq_norms.max())


def test_kmeans_pp_first_centre_is_the_largest_gradient_norm():
    g = np.random.default_rng(1)
    u, h = badge_embeddings_factors(g.dirichlet(np.ones(4), size=50), g.normal(size=(50, 6)))
    best = int(np.argmax(gradient_sq_norms(u, h).numpy()))
    for seed in range(3):
        assert kmeans_pp_factorised(u, h, 4, np.random.default_rng(seed))[0] == best


def test_kmeans_pp_draws_proportionally_to_d_squared():
    # 1 class-dimension effectively: u = [-1, 1]/2 scaled, h in 1-D, so g_i is a signed scalar
    # times a fixed direction: g = (-a, a) h with a = 0.5 for probs (0.5, 0.5)
    h = torch.tensor([[4.0], [0.0], [1.0], [2.0], [4.0], [-1.0]], dtype=torch.float64)
    probs = torch.full((6, 2), 0.5, dtype=torch.float64)
    u, h = badge_embeddings_factors(probs, h)
    # first centre: the max norm, h = 4, position 0 (position 4 ties and is a duplicate: D = 0)
    d2 = gradient_sq_dists_to(u, h, 0).numpy()
    expected = d2 / d2.sum()
    assert expected[4] == 0 and expected[0] == 0
    rng = np.random.default_rng(0)
    trials = 4000
    counts = np.zeros(6)
    for _ in range(trials):
        pick = kmeans_pp_factorised(u, h, 2, rng)
        assert pick[0] == 0
        counts[pick[1]] += 1
    assert counts[0] == 0 and counts[4] == 0  # the centre and its duplicate are never drawn
    sd = np.sqrt(trials * expected * (1 - expected))
    assert np.all(np.abs(counts - trials * expected) <= 5 * sd + 1e-9)
    # and a chi-square statistic far below its 99.9% quantile (16.3 for 3 dof)
    nz = expected > 0
    chi2 = (((counts - trials * expected) ** 2)[nz] / (trials * expected[nz])).sum()
    assert chi2 < 16.3


def test_kmeans_pp_all_points_equal_falls_back_to_uniform_without_repeats():
    u, h = badge_embeddings_factors(torch.full((8, 3), 1 / 3), torch.ones(8, 2))
    got = kmeans_pp_factorised(u, h, 8, np.random.default_rng(0))
    assert got[0] == 0 and sorted(got.tolist()) == list(range(8))


def _badge_cluster_model(seed=0):
    """4 tight clusters of gradient embeddings: per-cluster features (norm ~100, +-6%) and logits.

    With logits (a, 0, 0), ``||p - e_yhat||^2 = 6 q^2``, ``q = 1 / (e^a + 2)``: 0.27 for a = 1
    (cluster 2) vs 0.068 (a = 2, cluster 3) and 0.012 (a = 3, clusters 0, 1), so cluster 2 holds
    the largest norms; its row 25 (a = 0.99: +1.1% norm, far above the 1e-4 noise) is the largest.
    Clusters are ~50 apart in gradient space, a cluster's points within ~0.5 of each other, so a
    D^2 draw lands in an already chosen cluster with probability ~1e-5."""
    feats, cluster = _clusters(seed, spread=1e-4)
    g = np.random.default_rng(seed + 1)
    base = np.array([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0], [2.0, 0.0, 0.0]])
    logits = base[cluster] + 1e-4 * g.normal(size=(40, 3))
    logits[25] = [0.0, 0.0, 0.99]
    return Lookup(torch.from_numpy(feats), torch.from_numpy(logits)), cluster


def test_badge_covers_distinct_clusters_starting_from_the_largest_norm():
    model, cluster = _badge_cluster_model()
    strategy = create_strategy("badge")
    labeled = np.array([0, 1])
    candidates = np.setdiff1d(np.arange(40), labeled)
    for seed in range(5):
        chosen = strategy(_ctx(model, 40, candidates, labeled, seed=seed), 3)
        assert chosen[0] == 25
        assert len(set(cluster[chosen].tolist())) == 3
        chosen = strategy(_ctx(model, 40, candidates, labeled, seed=seed), 4)
        assert sorted(cluster[chosen].tolist()) == [0, 1, 2, 3]


def test_badge_selection_is_valid_and_deterministic():
    g = np.random.default_rng(2)
    model = Lookup(
        torch.from_numpy(g.normal(size=(50, 5))), torch.from_numpy(g.normal(size=(50, 3)))
    )
    strategy = create_strategy("badge")
    labeled = np.arange(0, 50, 4)
    candidates = np.setdiff1d(np.arange(50), labeled)
    a = strategy(_ctx(model, 50, candidates, labeled, seed=7), 20)
    b = strategy(_ctx(model, 50, candidates, labeled, seed=7), 20)
    assert np.array_equal(a, b)
    assert len(np.unique(a)) == 20 and np.isin(a, candidates).all()
    assert not np.isin(a, labeled).any()
    everything = strategy(_ctx(model, 50, candidates, labeled, seed=7), len(candidates))
    assert sorted(everything.tolist()) == candidates.tolist()
    picks = {tuple(strategy(_ctx(model, 50, candidates, labeled, seed=s), 5)) for s in range(5)}
    assert len(picks) > 1


# ---------------------------------------------------------------- real data


@pytest.mark.parametrize("name", ["core-set", "badge"])
def test_diversity_strategies_run_on_real_data(small_digits, name):
    from gradnorm_al.models import create_model

    torch.manual_seed(0)
    model = create_model("smallcnn", num_classes=10, in_channels=1).eval()
    labeled, candidates = np.arange(40), np.arange(40, 140)
    ctx = SelectionContext(
        model=model,
        pool=small_digits.train_eval,
        candidates=candidates,
        labeled=labeled,
        num_classes=10,
        device=torch.device("cpu"),
        rng=np.random.default_rng(0),
        batch_size=32,
    )
    chosen = create_strategy(name)(ctx, 8)
    assert chosen.shape == (8,) and len(np.unique(chosen)) == 8
    assert np.isin(chosen, candidates).all()
