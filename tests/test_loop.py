"""Algorithm 1: pool bookkeeping per cycle, same start for every strategy, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import bundle_trial
from torch import nn

from gradnorm_al import ConfigError, create_model, create_strategy
from gradnorm_al.loop import LoopConfig
from gradnorm_al.strategies import Strategy
from gradnorm_al.train import Auxiliary, TrainConfig, fit

TRAIN = TrainConfig(epochs=2, lr=0.05, batch_size=32)


class Recorder(Strategy):
    """Wraps a strategy and records every context it was shown."""

    def __init__(self, inner: Strategy) -> None:
        self.inner, self.seen = inner, []

    def select(self, ctx, k):
        self.seen.append((ctx.labeled.copy(), ctx.candidates.copy()))
        return self.inner.select(ctx, k)


def _run(bundle, strategy, seed=0, loop=None, factory=None):
    loop = loop or LoopConfig(cycles=4, initial_fraction=0.1, budget_fraction=0.05)
    return bundle_trial(bundle, strategy, loop=loop, train=TRAIN, seed=seed, factory=factory)


@pytest.mark.parametrize("name", ["random", "entropy-gradnorm"])
def test_each_cycle_adds_exactly_k_disjoint_samples(small_digits, name):
    rec = Recorder(create_strategy(name))
    records = _run(small_digits, rec)
    n, k = 300, 15
    assert [r.num_labeled for r in records] == [30, 45, 60, 75]
    assert [r.labeled_fraction for r in records] == [0.1, 0.15, 0.2, 0.25]
    assert records[-1].selected is None and records[-1].select_seconds is None
    for (labeled, candidates), r in zip(rec.seen, records):
        assert np.intersect1d(labeled, candidates).size == 0
        assert np.array_equal(np.union1d(labeled, candidates), np.arange(n))  # all unlabelled
        assert len(r.selected) == k and len(np.unique(r.selected)) == k
        assert np.isin(r.selected, candidates).all()
    chosen = np.concatenate([r.selected for r in records[:-1]])
    assert len(np.unique(chosen)) == len(chosen)
    # the labelled set of the next cycle is exactly the previous one plus the selection
    for (lab_a, _), (lab_b, _), r in zip(rec.seen, rec.seen[1:], records):
        assert np.array_equal(np.sort(np.concatenate([lab_a, r.selected])), lab_b)
    for r in records:
        assert 0.0 <= r.test_accuracy <= 1.0 and 0.0 <= r.train_accuracy <= 1.0


def test_same_initial_pool_and_model_for_every_strategy_in_a_trial(small_digits):
    a, b = Recorder(create_strategy("random")), Recorder(create_strategy("entropy-gradnorm"))
    ra, rb = _run(small_digits, a), _run(small_digits, b)
    assert np.array_equal(a.seen[0][0], b.seen[0][0])
    # identical initial pool and model => identical first training => identical first accuracy
    assert ra[0].test_accuracy == rb[0].test_accuracy
    c = Recorder(create_strategy("random"))
    _run(small_digits, c, seed=1)
    assert not np.array_equal(a.seen[0][0], c.seen[0][0])


def test_same_seed_same_results(small_digits):
    def summary(records):
        return [
            (r.test_accuracy, r.train_accuracy, None if r.selected is None else r.selected.tolist())
            for r in records
        ]

    for name in ("random", "entropy-gradnorm"):
        first = _run(small_digits, create_strategy(name), seed=5)
        second = _run(small_digits, create_strategy(name), seed=5)
        assert summary(first) == summary(second)


def test_candidate_subset(small_digits):
    rec = Recorder(create_strategy("random"))
    loop = LoopConfig(cycles=3, initial_fraction=0.1, budget_fraction=0.05, subset_size=40)
    _run(small_digits, rec, loop=loop)
    for labeled, candidates in rec.seen:
        assert len(candidates) == 40 and np.intersect1d(labeled, candidates).size == 0


def test_warm_start_keeps_the_model_and_reinit_builds_a_fresh_one(small_digits):
    calls = []

    def factory():
        calls.append(1)
        return create_model("smallcnn", num_classes=10, in_channels=1)

    _run(small_digits, create_strategy("random"), factory=factory)
    assert len(calls) == 1
    calls.clear()
    loop = LoopConfig(cycles=4, initial_fraction=0.1, budget_fraction=0.05, reinit_each_cycle=True)
    _run(small_digits, create_strategy("random"), factory=factory, loop=loop)
    assert len(calls) == 4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"cycles": 0}, "cycles must be at least 1"),
        ({"initial_fraction": 0.0}, r"initial-fraction must be in \(0, 1\]"),
        ({"budget_fraction": 1.5}, r"budget-fraction must be in \(0, 1\]"),
        (
            {"initial_fraction": 0.9, "budget_fraction": 0.2, "cycles": 3},
            "larger than the unlabelled",
        ),
        ({"subset_size": 5}, "smaller than the budget"),
    ],
)
def test_schedule_validation(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LoopConfig(**kwargs).validate(300)


def test_a_schedule_that_exactly_exhausts_the_pool_is_allowed():
    LoopConfig(cycles=3, initial_fraction=0.5, budget_fraction=0.25).validate(100)
    with pytest.raises(ConfigError):
        LoopConfig(cycles=4, initial_fraction=0.5, budget_fraction=0.25).validate(100)


class _Penalty(nn.Module):
    """A trainable scale whose loss pulls the per-sample losses of a batch towards its value."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(5.0))


class _PenaltyAux(Auxiliary):
    def __init__(self) -> None:
        self.module = _Penalty()
        self.calls: list[tuple[int, int, int]] = []

    def loss(self, per_sample_loss, epoch, epochs):
        self.calls.append((len(per_sample_loss), epoch, epochs))
        return ((per_sample_loss - self.module.scale) ** 2).mean()


class WithAuxiliary(Strategy):
    """Random selection plus a jointly trained auxiliary module; records every module built."""

    def __init__(self) -> None:
        self.built: list[_PenaltyAux] = []

    def auxiliary(self, model):
        self.built.append(_PenaltyAux())
        return self.built[-1]

    def select(self, ctx, k):
        return ctx.rng.choice(ctx.candidates, size=k, replace=False)


@pytest.mark.parametrize("reinit", [False, True])
def test_a_strategy_can_train_an_auxiliary_module_jointly(small_digits, reinit):
    loop = LoopConfig(
        cycles=3, initial_fraction=0.1, budget_fraction=0.05, reinit_each_cycle=reinit
    )
    strategy = WithAuxiliary()
    _run(small_digits, strategy, loop=loop)
    # one module per task model built: once with warm start, every cycle with reinit
    assert len(strategy.built) == (3 if reinit else 1)
    aux = strategy.built[-1]
    assert all(epochs == TRAIN.epochs and 0 <= e < epochs for _, e, epochs in aux.calls)
    # every labelled sample of every fit it took part in, once per epoch (30, 45, 60 labelled)
    assert sum(b for b, e, _ in aux.calls if e == 0) == (60 if reinit else 30 + 45 + 60)
    # trained by the task model's optimizer, and left in eval mode
    assert aux.module.scale.item() != 5.0 and not aux.module.training


def test_the_auxiliary_loss_is_added_to_the_task_loss(small_digits):
    def trained(auxiliary):
        torch.manual_seed(0)
        model = create_model("smallcnn", num_classes=10, in_channels=1)
        fit(
            model,
            small_digits.train,
            np.arange(64),
            TRAIN,
            device=torch.device("cpu"),
            seed=3,
            auxiliary=auxiliary,
        )
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    plain, again, joint = trained(None), trained(None), trained(_PenaltyAux())
    assert torch.equal(plain, again) and not torch.allclose(plain, joint)


class _NoisyItems(torch.utils.data.Dataset):
    """A per-item dataset (not a TensorDataset) whose items get random noise, like augmentation."""

    def __init__(self, bundle) -> None:
        self.x, self.y = bundle.train.tensors

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i] + 0.1 * torch.randn_like(self.x[i]), self.y[i]


def test_training_with_loader_workers_is_seeded(small_digits):
    cfg = TrainConfig(epochs=2, lr=0.05, batch_size=32, num_workers=2)
    data = _NoisyItems(small_digits)

    def trained():
        torch.manual_seed(0)
        model = create_model("smallcnn", num_classes=10, in_channels=1)
        fit(model, data, np.arange(100), cfg, device=torch.device("cpu"), seed=5)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(trained(), trained())
