"""Bayesian and committee baselines: MC dropout (BALD, max-entropy, variation ratio) and query by
committee (vote entropy, mean KL)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_to_scale, bundle_trial, make_context, randomise_bn
from torch import nn

from gradnorm_al import ConfigError, create_model, create_strategy
from gradnorm_al.data import tensor_dataset
from gradnorm_al.loop import LoopConfig
from gradnorm_al.strategies.mc_dropout import (
    bald_scores,
    has_dropout,
    max_entropy_scores,
    mc_dropout_probabilities,
    variation_ratio_scores,
)
from gradnorm_al.strategies.qbc import mean_kl_scores, vote_entropy_scores
from gradnorm_al.train import TrainConfig

LN2 = math.log(2)


def _index_pool(n: int):
    """A pool whose input for row i is the number i (read back by the lookup models)."""
    return tensor_dataset(torch.arange(n, dtype=torch.float32).view(n, 1), np.zeros(n, np.int64))


def _ctx(model, pool, candidates, labeled=(), seed=0, trainer=None, batch_size=5):
    return make_context(
        model,
        pool,
        candidates,
        labeled,
        seed=seed,
        num_classes=2,
        batch_size=batch_size,
        trainer=trainer,
    )


def _modes(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


# ------------------------------------------------------------------------------------------------
# MC dropout: formulas


def test_bald_max_entropy_variation_ratio_hand_computed():
    # [n=3, C=2, T=2]: a full flip, no change at all, and uncertain-vs-certain
    probs = torch.tensor(
        [
            [[1.0, 0.0], [0.0, 1.0]],  # p_1 = [1, 0], p_2 = [0, 1]
            [[0.5, 0.5], [0.5, 0.5]],  # p_1 = p_2 = [.5, .5]
            [[0.5, 1.0], [0.5, 0.0]],  # p_1 = [.5, .5], p_2 = [1, 0]
        ],
        dtype=torch.float64,
    )
    h_mean3 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))  # mean = [.75, .25]
    assert_close_to_scale(bald_scores(probs), [LN2, 0.0, h_mean3 - LN2 / 2], rel=1e-12)
    assert_close_to_scale(max_entropy_scores(probs), [LN2, LN2, h_mean3], rel=1e-12)
    # votes: (0, 1) -> 1 - 1/2; (0, 0) ties go to class 0 -> 0; (0, 0) -> 0
    assert variation_ratio_scores(probs).tolist() == [0.5, 0.0, 0.0]
    # T = 4, C = 3: votes 0, 0, 1, 2 -> modal count 2 -> 1 - 2/4; numpy input accepted
    votes = np.eye(3)[[0, 0, 1, 2]].T[None]  # [1, 3, 4]
    assert variation_ratio_scores(votes).tolist() == [0.5]
    for fn in (bald_scores, max_entropy_scores, variation_ratio_scores):
        assert fn(probs).dtype == torch.float64
        with pytest.raises(ValueError, match=r"\[n, C, T\]"):
            fn(probs[:, :, 0])


def test_bald_matches_a_slow_reference_and_is_never_negative():
    g = torch.Generator().manual_seed(0)
    probs = F.softmax(torch.randn(7, 4, 6, generator=g, dtype=torch.float64) * 3, dim=1)
    probs[0] = probs[0, :, :1]  # identical passes: exactly 0, not a rounding error below it
    ref = []
    for i in range(7):
        mean = [sum(float(probs[i, c, t]) for t in range(6)) / 6 for c in range(4)]
        h_mean = -sum(m * math.log(m) for m in mean)
        h_each = [-sum(float(probs[i, c, t]) * math.log(probs[i, c, t]) for c in range(4))
                  for t in range(6)]  # fmt: skip
        ref.append(h_mean - sum(h_each) / 6)
    ours = bald_scores(probs)
    assert_close_to_scale(ours, ref, rel=1e-12)
    assert ours[0] == 0.0 and (ours >= 0).all()


# ------------------------------------------------------------------------------------------------
# MC dropout: known-by-construction selections


class MaskLookup(nn.Module):
    """logits(i) = classifier(dropout(h[i])) + offset[i] for the integer input i.

    With h[i] = 0 the output does not depend on the dropout mask; with h[i] = 1 a kept unit gives
    logits [20, 5] (class 0) and a dropped one [0, 5] (class 1)."""

    def __init__(self, h: torch.Tensor, offset: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("h", h.view(-1, 1))
        self.register_buffer("offset", offset)
        self.dropout = nn.Dropout(0.5)
        self.classifier = nn.Linear(1, 2)
        with torch.no_grad():
            self.classifier.weight.copy_(torch.tensor([[10.0], [0.0]]))
            self.classifier.bias.copy_(torch.tensor([0.0, 5.0]))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.h[x[:, 0].long()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        i = x[:, 0].long()
        return self.classifier(self.dropout(self.h[i])) + self.offset[i]


FLIPPING, UNCERTAIN = [2, 7, 9], [0, 4, 10]  # the rest: constant and confident


def _mask_lookup(n: int = 12) -> MaskLookup:
    h = torch.zeros(n)
    h[FLIPPING] = 1.0
    offset = torch.tensor([10.0, -5.0]).repeat(n, 1)  # constant logits [10, 0]
    offset[UNCERTAIN] = torch.tensor([0.0, -5.0])  # constant logits [0, 0]: entropy ln 2, BALD 0
    offset[FLIPPING] = 0.0
    return MaskLookup(h, offset)


def test_mc_passes_vary_only_where_the_mask_matters():
    model = _mask_lookup().eval()
    x = torch.arange(12, dtype=torch.float32).view(12, 1)
    torch.manual_seed(0)
    probs = mc_dropout_probabilities(model, x, 25)
    assert probs.shape == (12, 2, 25) and probs.dtype == torch.float64
    for i in range(12):
        distinct = torch.unique(probs[i].T, dim=0)
        if i in FLIPPING:  # both masks occur, and only those two outcomes
            assert len(distinct) == 2
            assert set(distinct.argmax(dim=1).tolist()) == {0, 1}
        else:
            assert len(distinct) == 1
    assert not model.dropout.training  # modes restored


@pytest.mark.parametrize(
    "acquisition, expected",
    [("bald", FLIPPING), ("variation-ratio", FLIPPING), ("max-entropy", UNCERTAIN)],
)
def test_mc_dropout_picks_the_mask_dependent_samples(acquisition, expected):
    model, pool = _mask_lookup(), _index_pool(12)
    strategy = create_strategy("mc-dropout", acquisition=acquisition)
    ctx = _ctx(model, pool, np.arange(12))
    scores = strategy.score(ctx)
    constant = np.setdiff1d(np.arange(12), FLIPPING)
    if acquisition == "max-entropy":
        # predictive entropy is fooled by aleatoric noise: the constant [0, 0] logits win
        assert np.allclose(scores[UNCERTAIN], LN2)
    else:
        # BALD and the variation ratio are exactly 0 wherever the mask does not matter
        assert (scores[constant] == 0).all() and (scores[FLIPPING] > 0).all()
    assert sorted(strategy(ctx, 3).tolist()) == expected


def test_mc_dropout_never_returns_labelled_or_duplicate_indices():
    model, pool = _mask_lookup(), _index_pool(12)
    labeled = [2, 5, 7]  # two of the flipping samples are labelled, so not candidates
    candidates = np.setdiff1d(np.arange(12), labeled)
    chosen = create_strategy("mc-dropout", samples=5)(_ctx(model, pool, candidates, labeled), 6)
    assert len(np.unique(chosen)) == 6 and np.isin(chosen, candidates).all()
    assert not np.isin(chosen, labeled).any() and chosen[0] == 9


def _bn_dropout_net() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3)
    )
    return randomise_bn(model)


def test_mc_dropout_is_seeded_by_the_context_and_leaves_torch_rng_alone():
    model = _bn_dropout_net()
    pool = tensor_dataset(torch.randn(30, 4, generator=torch.Generator().manual_seed(1)),
                          np.zeros(30, np.int64))  # fmt: skip
    strategy = create_strategy("mc-dropout", samples=8)
    cands = np.arange(30)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = strategy.score(_ctx(model, pool, cands, seed=4))
    assert torch.equal(torch.get_rng_state(), state)  # the caller's stream is untouched
    torch.manual_seed(999)  # whatever the global seed, the context decides
    b = strategy.score(_ctx(model, pool, cands, seed=4))
    c = strategy.score(_ctx(model, pool, cands, seed=5))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # the batching is the context's: a different batch size draws other masks, but still seeded
    d = strategy.score(_ctx(model, pool, cands, seed=4, batch_size=30))
    assert np.array_equal(d, strategy.score(_ctx(model, pool, cands, seed=4, batch_size=30)))
    k_a = strategy(_ctx(model, pool, cands, seed=4), 5)
    assert np.array_equal(k_a, strategy(_ctx(model, pool, cands, seed=4), 5))


def test_batchnorm_stays_in_eval_mode_and_every_mode_is_restored():
    model = _bn_dropout_net()
    model.train()
    model[4].eval()  # a mixed state that must come back exactly
    before = _modes(model)
    bn, dropout = model[1], model[3]
    stats = {k: v.clone() for k, v in bn.state_dict().items()}
    seen = []

    def bn_hook(m, inputs, out):
        ref = F.batch_norm(
            inputs[0], m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps
        )
        seen.append(("bn", m.training, torch.allclose(out, ref, atol=1e-6)))

    bn.register_forward_hook(bn_hook)
    dropout.register_forward_hook(lambda m, i, o: seen.append(("dropout", m.training, None)))
    pool = tensor_dataset(torch.randn(10, 4), np.zeros(10, np.int64))
    scores = create_strategy("mc-dropout", samples=4).score(_ctx(model, pool, np.arange(10)))
    assert (scores > 0).any()  # the masks did vary
    assert [s for s in seen if s[0] == "bn"] == [("bn", False, True)] * 8  # 2 batches x 4 passes
    assert [s for s in seen if s[0] == "dropout"] == [("dropout", True, None)] * 8
    # the same without the strategy's batching around it (which already sets eval mode)
    seen.clear()
    probs = mc_dropout_probabilities(model, torch.randn(6, 4), 3)
    assert probs.shape == (6, 3, 3)
    assert [s[1:] for s in seen] == [(False, True), (True, None)] * 3
    for key, value in bn.state_dict().items():  # running statistics untouched
        assert torch.equal(value, stats[key]), key
    assert _modes(model) == before


def test_modes_are_restored_when_a_pass_fails():
    model = _bn_dropout_net()
    model.train()
    model[1].eval()
    before = _modes(model)
    calls = []

    def explode(m, i, o):
        calls.append(m.training)
        if len(calls) == 2:
            raise RuntimeError("boom")

    model[4].register_forward_hook(explode)
    pool = tensor_dataset(torch.randn(10, 4), np.zeros(10, np.int64))
    with pytest.raises(RuntimeError, match="boom"):
        create_strategy("mc-dropout", samples=3).score(_ctx(model, pool, np.arange(10)))
    assert calls == [False, False]  # the head ran in eval mode
    assert _modes(model) == before


def test_prepare_model_inserts_dropout_only_where_there_is_none():
    strategy = create_strategy("mc-dropout", p=0.3)
    torch.manual_seed(0)
    cnn = create_model("smallcnn", num_classes=10, in_channels=1).eval()
    linear = cnn.classifier
    x = torch.randn(4, 1, 8, 8)
    logits, feats = cnn(x), cnn.embed(x)
    assert not has_dropout(cnn)
    assert strategy.prepare_model(cnn) is cnn
    assert isinstance(cnn.classifier, nn.Sequential) and cnn.classifier[1] is linear
    assert isinstance(cnn.classifier[0], nn.Dropout) and cnn.classifier[0].p == 0.3
    cnn.eval()
    assert torch.allclose(cnn(x), logits) and torch.equal(cnn.embed(x), feats)
    # a second call (or a model that has its own dropout) changes nothing
    text = str(cnn)
    assert strategy.prepare_model(cnn) is cnn and str(cnn) == text
    net = _bn_dropout_net()
    text = str(net)
    assert strategy.prepare_model(net) is net and str(net) == text
    with pytest.raises(ConfigError, match="no dropout layer and no `classifier`"):
        strategy.prepare_model(nn.Sequential(nn.Linear(4, 3)))


def test_selecting_with_a_model_without_dropout_is_refused():
    model = nn.Sequential(nn.Linear(1, 2))
    with pytest.raises(ConfigError, match="needs a model with dropout.*prepare_model"):
        create_strategy("mc-dropout")(_ctx(model, _index_pool(6), np.arange(6)), 2)


@pytest.mark.parametrize(
    "params, match",
    [
        ({"samples": 1}, "samples must be an integer >= 2, got 1$"),
        ({"samples": 2.5}, "samples must be an integer >= 2, got 2.5$"),
        (
            {"acquisition": "entropy"},
            "acquisition must be one of 'bald', 'max-entropy', 'variation-ratio', got 'entropy'",
        ),
        ({"p": 0.0}, r"p must be a number in \(0, 1\), got 0.0"),
        ({"p": 1.0}, r"p must be a number in \(0, 1\), got 1.0"),
        ({"p": True}, r"p must be a number in \(0, 1\), got True"),
    ],
)
def test_mc_dropout_parameters_are_validated(params, match):
    with pytest.raises(ConfigError, match="^strategy mc-dropout: " + match):
        create_strategy("mc-dropout", **params)


TRAIN = TrainConfig(epochs=1, lr=0.05, batch_size=32)
LOOP = LoopConfig(cycles=2, initial_fraction=0.1, budget_fraction=0.05, subset_size=40)


def _run(bundle, strategy, name):
    return bundle_trial(bundle, strategy, loop=LOOP, train=TRAIN)


def _check_records(records):
    first = records[0]
    assert len(first.selected) == 15 and len(np.unique(first.selected)) == 15
    assert records[1].num_labeled == 45 and records[1].selected is None


def test_mc_dropout_loop_trains_with_the_inserted_dropout(small_digits):
    strategy = create_strategy("mc-dropout", samples=3)
    seen, models = [], []
    prepare = strategy.prepare_model

    def recording_prepare(model):
        model = prepare(model)
        models.append(model)
        model.classifier[0].register_forward_hook(
            lambda m, i, o: seen.append((m.training, torch.is_grad_enabled()))
        )
        return model

    strategy.prepare_model = recording_prepare
    records = _run(small_digits, strategy, "mc-dropout")
    _check_records(records)
    assert len(models) == 1 and isinstance(models[0].classifier[0], nn.Dropout)
    assert (True, True) in seen  # training passes went through the dropout, active
    assert (True, False) in seen  # and so did the MC passes (no grad)
    assert not models[0].classifier[0].training  # left in eval mode


# ------------------------------------------------------------------------------------------------
# QBC: formulas


def test_vote_entropy_and_mean_kl_hand_computed():
    votes = torch.tensor([[0, 0, 1, 2], [1, 1, 1, 1], [3, 0, 3, 0]])  # [n=3, M=4]
    expected = [1.5 * LN2, 0.0, LN2]  # -(.5 ln .5 + 2 * .25 ln .25); 0; two classes half each
    assert_close_to_scale(vote_entropy_scores(votes), expected, rel=1e-12)
    assert_close_to_scale(vote_entropy_scores(votes, num_classes=10), expected, rel=1e-12)
    # probabilities vote with their argmax
    probs = F.one_hot(votes, 4).permute(0, 2, 1).double() * 0.7 + 0.075  # [3, 4, 4]
    assert_close_to_scale(vote_entropy_scores(probs), expected, rel=1e-12)
    with pytest.raises(ValueError, match="integer votes"):
        vote_entropy_scores(votes.double())

    # [n=2, C=2, M=2]: p_1 = [1, 0], p_2 = [0, 1]; p_1 = [.5, .5], p_2 = [1, 0]
    probs = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.5, 1.0], [0.5, 0.0]]], dtype=torch.float64)
    kl2 = (0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25) + math.log(1 / 0.75)) / 2
    assert_close_to_scale(mean_kl_scores(probs), [LN2, kl2], rel=1e-12)


def test_mean_kl_matches_a_slow_reference_and_equals_the_mutual_information():
    g = torch.Generator().manual_seed(0)
    probs = F.softmax(torch.randn(6, 5, 4, generator=g, dtype=torch.float64) * 2, dim=1)
    ref = []
    for i in range(6):
        mean = probs[i].mean(dim=1)
        ref.append(
            sum(
                sum(float(probs[i, c, m] * math.log(probs[i, c, m] / mean[c])) for c in range(5))
                for m in range(4)
            )
            / 4
        )
    ours = mean_kl_scores(probs)
    assert_close_to_scale(ours, ref, rel=1e-12)
    assert_close_to_scale(ours, bald_scores(probs), rel=1e-12)  # Jensen-Shannon = BALD


# ------------------------------------------------------------------------------------------------
# QBC: committees


class LogitTable(nn.Module):
    """logits(i) = table[i] for the integer input i."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", table)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x[:, 0].long()]


def _fake_trainer(n: int, num_classes: int, hard=(), soft=()):
    """A trainer whose members all predict class 0 with logit 5 except on ``hard`` samples, where
    member m (and its seed) picks the class, and on ``soft`` samples, where every member votes
    class 0 but with a member-specific confidence. Records every call."""
    calls = []

    def trainer(indices, seed):
        calls.append((np.asarray(indices).copy(), seed))
        m = len(calls) - 1
        table = torch.zeros(n, num_classes, dtype=torch.float64)
        table[:, 0] = 5.0
        for i in hard:
            table[i] = 0.0
            table[i, (m + seed) % num_classes] = 5.0
        for i in soft:
            table[i, 0] = 0.5 + m
        return LogitTable(table)

    return trainer, calls


def test_qbc_picks_the_samples_the_committee_disagrees_on():
    trainer, calls = _fake_trainer(30, 3, hard=[3, 7])
    labeled = np.arange(10, 30)
    ctx = _ctx(None, _index_pool(30), np.arange(10), labeled, trainer=trainer)
    strategy = create_strategy("qbc")
    assert sorted(strategy(ctx, 2).tolist()) == [3, 7]
    assert len(calls) == 5
    # bootstrap resamples of the labelled set: its size, only labelled rows, with repeats
    for indices, _ in calls:
        assert len(indices) == 20 and np.isin(indices, labeled).all()
        assert len(np.unique(indices)) < 20
    assert len({tuple(i) for i, _ in calls}) == 5 and len({s for _, s in calls}) == 5
    # everyone agrees elsewhere
    trainer, _ = _fake_trainer(30, 3, hard=[3, 7])
    scores = strategy.score(_ctx(None, _index_pool(30), np.arange(10), labeled, trainer=trainer))
    assert (np.delete(scores, [3, 7]) == 0).all() and (scores[[3, 7]] > 0).all()


def test_qbc_without_bootstrap_trains_every_member_on_the_labelled_set():
    trainer, calls = _fake_trainer(30, 3, hard=[4])
    labeled = np.arange(10, 30)
    ctx = _ctx(None, _index_pool(30), np.arange(10), labeled, trainer=trainer)
    create_strategy("qbc", members=3, bootstrap=False)(ctx, 1)
    assert len(calls) == 3 and len({s for _, s in calls}) == 3
    for indices, _ in calls:
        assert np.array_equal(np.sort(indices), labeled)


def test_qbc_kl_sees_soft_disagreement_that_votes_miss():
    labeled = np.arange(10, 30)
    trainer, _ = _fake_trainer(30, 3, soft=[5, 8])
    ctx = _ctx(None, _index_pool(30), np.arange(10), labeled, trainer=trainer)
    assert sorted(create_strategy("qbc", disagreement="kl")(ctx, 2).tolist()) == [5, 8]
    trainer, _ = _fake_trainer(30, 3, soft=[5, 8])
    ctx = _ctx(None, _index_pool(30), np.arange(10), labeled, trainer=trainer)
    assert (create_strategy("qbc").score(ctx) == 0).all()  # all members vote class 0


def test_qbc_is_seeded_and_never_returns_labelled_or_duplicate_indices():
    labeled = np.array([0, 3, 5, 11, 12, 20])
    candidates = np.setdiff1d(np.arange(30), labeled)
    hard = [1, 3, 7, 9, 15, 22]  # 3 is labelled: never a candidate

    def select(seed):
        trainer, calls = _fake_trainer(30, 4, hard=hard)
        ctx = _ctx(None, _index_pool(30), candidates, labeled, seed=seed, trainer=trainer)
        return create_strategy("qbc", members=4)(ctx, 8), calls

    a, calls_a = select(1)
    b, calls_b = select(1)
    _, calls_c = select(2)
    assert np.array_equal(a, b)
    assert [s for _, s in calls_a] == [s for _, s in calls_b] != [s for _, s in calls_c]
    assert len(np.unique(a)) == 8 and np.isin(a, candidates).all() and not np.isin(a, labeled).any()
    assert set(np.setdiff1d(hard, labeled)) <= set(a.tolist())


def test_qbc_needs_a_trainer_and_valid_parameters():
    ctx = _ctx(None, _index_pool(6), np.arange(3), [3, 4, 5])
    with pytest.raises(ConfigError, match="needs a trainer; run it through the loop"):
        create_strategy("qbc")(ctx, 1)
    trainer, _ = _fake_trainer(6, 2)
    with pytest.raises(ConfigError, match="no.*labelled|there are none"):
        create_strategy("qbc")(_ctx(None, _index_pool(6), np.arange(6), [], trainer=trainer), 1)
    for params, match in [
        ({"members": 1}, "members must be an integer >= 2, got 1"),
        ({"disagreement": "js"}, "disagreement must be one of 'vote-entropy', 'kl', got 'js'"),
        ({"bootstrap": "yes"}, "bootstrap must be true or false, got 'yes'"),
    ]:
        with pytest.raises(ConfigError, match="^strategy qbc: " + match):
            create_strategy("qbc", **params)


@pytest.mark.parametrize("disagreement", ["vote-entropy", "kl"])
def test_qbc_runs_in_the_loop_with_the_real_trainer(small_digits, disagreement):
    records = _run(
        small_digits, create_strategy("qbc", members=2, disagreement=disagreement), "qbc"
    )
    _check_records(records)
