"""Samplers: stochastic batch acquisition against its definition, SCORER@SAMPLER composition,
prefiltered diversity, and plain names unchanged."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from conftest import create_model_smallcnn, make_context

from gradnorm_al import SAMPLERS, ConfigError, UnknownNameError, create_strategy
from gradnorm_al.strategies import accepted_params
from gradnorm_al.strategies.samplers import gumbel_top_k, stochastic_log_weights


def test_log_weights_follow_their_definitions():
    s = np.array([0.5, 2.0, 0.0, 1.0])
    assert np.allclose(stochastic_log_weights(s, "softmax", 2.0), 2.0 * s)
    with np.errstate(divide="ignore"):
        assert np.array_equal(stochastic_log_weights(s, "power", 3.0), 3.0 * np.log(s))
    ranks = np.array([3.0, 1.0, 4.0, 2.0])  # rank 1 = highest score
    assert np.allclose(stochastic_log_weights(s, "soft-rank", 1.5), -1.5 * np.log(ranks))
    nan = stochastic_log_weights(np.array([1.0, np.nan]), "softmax", 1.0)
    assert nan[1] == -np.inf
    with pytest.raises(ConfigError, match="non-negative"):
        stochastic_log_weights(np.array([-0.1, 0.2]), "power", 1.0)


def test_gumbel_top_k_draws_without_replacement_with_the_right_probabilities():
    """Against the sequential definition: P(first = i) = w_i / W and
    P(first = i, second = j) = w_i / W * w_j / (W - w_i)."""
    w = np.array([1.0, 2.0, 3.0, 4.0])
    p = w / w.sum()
    rng = np.random.default_rng(0)
    n = 20_000
    pairs = np.array([gumbel_top_k(np.log(w), 2, rng) for _ in range(n)])
    assert all(a != b for a, b in pairs)
    for i in range(4):
        freq = np.mean(pairs[:, 0] == i)
        assert abs(freq - p[i]) < 4 * math.sqrt(p[i] * (1 - p[i]) / n)
    for i, j in itertools.permutations(range(4), 2):
        exact = p[i] * w[j] / (w.sum() - w[i])
        freq = np.mean((pairs[:, 0] == i) & (pairs[:, 1] == j))
        assert abs(freq - exact) < 4 * math.sqrt(exact * (1 - exact) / n)
    # weight 0 is never drawn while any positive weight is left
    zero = np.array([-np.inf, 0.0, 0.0])
    assert all(0 not in gumbel_top_k(zero, 2, rng) for _ in range(200))


@pytest.fixture(scope="module")
def trained_ctx(small_digits):
    torch.manual_seed(0)
    model = create_model_smallcnn().eval()

    def ctx(seed=0):
        return make_context(
            model, small_digits.train_eval, np.arange(40, 200), np.arange(40), seed=seed
        )

    return ctx


@pytest.mark.parametrize("sampler", ["softmax", "power", "soft-rank", "k-center", "kmeans++"])
def test_any_scorer_with_any_sampler_is_valid_and_seeded(trained_ctx, sampler):
    name = f"entropy-gradnorm@{sampler}"
    first = create_strategy(name).query(trained_ctx(1), 12)
    again = create_strategy(name).query(trained_ctx(1), 12)
    assert np.array_equal(first.indices, again.indices)
    assert len(set(first.indices.tolist())) == 12
    assert np.isin(first.indices, np.arange(40, 200)).all()
    # the scores reported are the scorer's scores of the picked candidates
    scores = create_strategy("entropy-gradnorm").score(trained_ctx(1))
    assert np.array_equal(first.scores, scores[first.indices - 40])


def test_plain_names_keep_their_sampler(trained_ctx):
    plain = create_strategy("entropy").query(trained_ctx(), 10)
    explicit = create_strategy("entropy@top-k").query(trained_ctx(), 10)
    assert np.array_equal(plain.indices, explicit.indices)
    assert np.all(np.diff(plain.scores) <= 0)
    assert create_strategy("core-set").query(trained_ctx(), 5).scores is None


def test_diversity_after_a_scorer_keeps_to_the_prefiltered_top(trained_ctx):
    k, prefilter = 5, 2.0
    scores = create_strategy("entropy").score(trained_ctx())
    top = 40 + np.argsort(-scores, kind="stable")[: int(prefilter * k)]
    for sampler in ("k-center", "kmeans++"):
        picked = create_strategy(f"entropy@{sampler}", prefilter=prefilter)(trained_ctx(), k)
        assert set(picked.tolist()) <= set(top.tolist())


def test_composition_errors_name_the_problem():
    with pytest.raises(ConfigError, match="core-set has no per-sample scores"):
        create_strategy("core-set@power")
    with pytest.raises(UnknownNameError, match="unknown sampler 'nope'"):
        create_strategy("entropy@nope")
    with pytest.raises(ConfigError, match="SCORER@SAMPLER"):
        create_strategy("entropy@")
    with pytest.raises(ConfigError, match="sampler softmax: beta must be a number > 0"):
        create_strategy("entropy@softmax", beta=0)
    with pytest.raises(ConfigError, match="prefilter must be a number >= 1"):
        create_strategy("entropy@k-center", prefilter=0.5)
    with pytest.raises(ConfigError, match="entropy@power does not take bogus; it takes: beta"):
        create_strategy("entropy@power", bogus=1)
    s = create_strategy("entropy-gradnorm@power", beta=2.0, norm="l2")
    assert (s.sampler.beta, s.norm, s.name) == (2.0, "l2", "entropy-gradnorm@power")
    assert accepted_params("entropy-gradnorm@power") == {"norm", "beta"}
    assert set(SAMPLERS.names()) == {
        "top-k", "k-center", "kmeans++", "softmax", "power", "soft-rank", "uniform"
    }  # fmt: skip


def test_power_sampling_refuses_negative_scores(trained_ctx):
    with pytest.raises(ConfigError, match="non-negative"):
        create_strategy("margin@power")(trained_ctx(), 5)
    assert len(create_strategy("margin@soft-rank")(trained_ctx(), 5)) == 5
