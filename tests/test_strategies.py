"""The strategy interface: top-K sampling, random sampling, request validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradnorm_al import PoolError, UnknownNameError, create_strategy
from gradnorm_al.errors import SelectionError
from gradnorm_al.strategies import SelectionContext, Strategy, top_k


def _ctx(candidates, labeled=(), seed=0, model=None, pool=None):
    return SelectionContext(
        model=model,
        pool=pool,
        candidates=np.asarray(candidates, dtype=np.int64),
        labeled=np.asarray(labeled, dtype=np.int64),
        num_classes=10,
        device=torch.device("cpu"),
        rng=np.random.default_rng(seed),
    )


def test_top_k_orders_best_first_breaks_ties_by_position_and_puts_nan_last():
    cands = np.array([10, 11, 12, 13, 14])
    scores = np.array([0.5, np.nan, 0.9, 0.5, 0.1])
    assert top_k(scores, cands, 3).tolist() == [12, 10, 13]
    assert top_k(scores, cands, 5).tolist() == [12, 10, 13, 14, 11]
    with pytest.raises(ValueError):
        top_k(scores[:3], cands, 2)


def test_random_is_seeded_without_replacement_and_within_candidates():
    strategy = create_strategy("random")
    cands = np.arange(100, 200)
    a = strategy(_ctx(cands, seed=1), 40)
    b = strategy(_ctx(cands, seed=1), 40)
    c = strategy(_ctx(cands, seed=2), 40)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert len(np.unique(a)) == 40 and np.isin(a, cands).all()
    # drawing every candidate returns a permutation of them
    assert sorted(strategy(_ctx(cands), 100).tolist()) == cands.tolist()


def test_requests_are_validated_once_for_every_strategy():
    strategy = create_strategy("random")
    with pytest.raises(PoolError, match="larger than the 3 candidates"):
        strategy(_ctx([1, 2, 3]), 4)
    with pytest.raises(PoolError, match="at least 1"):
        strategy(_ctx([1, 2, 3]), 0)


def test_a_misbehaving_strategy_is_caught():
    class Duplicates(Strategy):
        def select(self, ctx, k):
            return np.repeat(ctx.candidates[:1], k)

    class Outside(Strategy):
        def select(self, ctx, k):
            return ctx.labeled[:k]

    with pytest.raises(SelectionError, match="duplicate"):
        Duplicates()(_ctx([1, 2, 3]), 2)
    with pytest.raises(SelectionError, match="not candidates"):
        Outside()(_ctx([1, 2, 3], labeled=[7, 8]), 2)


def test_unknown_strategy_lists_known_ones():
    with pytest.raises(UnknownNameError, match="entropy-gradnorm"):
        create_strategy("bald-typo")


def test_gradnorm_strategy_selects_the_largest_scores(small_digits):
    from gradnorm_al import gradnorm_scores
    from gradnorm_al.models import create_model

    torch.manual_seed(0)
    model = create_model("smallcnn", num_classes=10, in_channels=1).eval()
    cands = np.arange(50, 150)
    ctx = _ctx(cands, labeled=np.arange(50), model=model, pool=small_digits.train_eval)
    chosen = create_strategy("entropy-gradnorm", norm="l2")(ctx, 7)
    x = small_digits.train_eval.tensors[0][cands]
    scores = gradnorm_scores(model, x, norm="l2").numpy()
    assert set(chosen.tolist()) == set(cands[np.argsort(-scores)[:7]].tolist())
    assert (
        scores[np.isin(cands, chosen)].min()
        >= np.delete(scores, np.isin(cands, chosen).nonzero()[0]).max()
    )
