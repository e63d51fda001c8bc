"""ActiveLearner: labels enter only through update (caller or oracle), training never reads the
pool's own targets, state round-trips, and a user's own module and Dataset work as they are."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from conftest import create_model_smallcnn
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from gradnorm_al import (
    ActiveLearner,
    CallbackOracle,
    ClassificationTask,
    DataError,
    DatasetOracle,
    PoolError,
    create_strategy,
)
from gradnorm_al.train import TrainConfig

TRAIN = TrainConfig(epochs=1, lr=0.05, batch_size=16)
POISON = -7  # a target no training step could use (cross-entropy raises on it)


class RecordingOracle:
    """The true labels, and a log of every index it was asked for."""

    def __init__(self, targets: np.ndarray) -> None:
        self.targets, self.asked = targets, []

    def labels(self, indices):
        self.asked.extend(int(i) for i in indices)
        return self.targets[indices]


class Items(Dataset):
    """A per-item pool (the DataLoader path): inputs only, or ``(input, target)`` with every
    target ``target``."""

    def __init__(self, x: torch.Tensor, target: int | None = None) -> None:
        self.x, self.target = x, target

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i] if self.target is None else (self.x[i], self.target)


class RecordingTask(ClassificationTask):
    """Classification that records every target batch its training loss saw."""

    def __init__(self, num_classes: int) -> None:
        super().__init__(num_classes)
        self.seen: list[torch.Tensor] = []

    def loss(self, output, target):
        self.seen.append(target.clone())
        return super().loss(output, target)


def _data(small_digits, n=120):
    x, y = small_digits.train.tensors
    return x[:n], y[:n].numpy()


@pytest.mark.parametrize("per_item", [False, True])
def test_training_reads_only_labels_that_came_through_update(small_digits, per_item):
    x, y = _data(small_digits)
    pool = Items(x, POISON) if per_item else TensorDataset(x, torch.full((len(x),), POISON))
    oracle = RecordingOracle(y)
    task = RecordingTask(10)
    learner = ActiveLearner(
        create_model_smallcnn, pool, task, "entropy-gradnorm", oracle=oracle, train=TRAIN
    )
    first = np.arange(0, 120, 4)
    learner.update(first)
    learner.fit()
    picked = learner.query(10)
    learner.update(picked)
    learner.fit()
    assert oracle.asked == first.tolist() + picked.tolist()  # asked once, only for these
    seen = torch.cat(task.seen)
    assert (seen != POISON).all()
    # each fit trains one epoch over exactly the labelled set, with the oracle's labels
    first_fit = torch.cat(task.seen[: -(-len(first) // TRAIN.batch_size)])
    assert sorted(first_fit.tolist()) == sorted(y[first].tolist())
    assert learner.evaluate_labeled()["accuracy"] >= 0.0
    assert np.array_equal(learner.labels(), torch.as_tensor(y[learner.labeled]))


def test_labels_given_by_the_caller_are_what_training_uses(small_digits):
    x, y = _data(small_digits)
    wrong = (y + 1) % 10  # the caller's labels differ from the dataset's targets on purpose
    task = RecordingTask(10)
    learner = ActiveLearner(
        create_model_smallcnn, TensorDataset(x, torch.as_tensor(y)), task, "random", train=TRAIN
    )
    idx = np.arange(40)
    learner.update(idx, wrong[idx])
    learner.fit()
    assert sorted(torch.cat(task.seen).tolist()) == sorted(wrong[idx].tolist())


def test_update_is_all_or_nothing_and_explains_itself(small_digits):
    x, y = _data(small_digits)
    learner = ActiveLearner(create_model_smallcnn, TensorDataset(x), ClassificationTask(10))
    with pytest.raises(PoolError, match="no oracle"):
        learner.update([1, 2])
    with pytest.raises(DataError, match="out of range"):
        learner.update([1, 2], [3, 10])
    with pytest.raises(PoolError, match="2 labels for 3 indices"):
        learner.update([1, 2, 3], [3, 4])
    with pytest.raises(PoolError, match="duplicate"):
        learner.update([1, 1], [3, 3])
    with pytest.raises(DataError, match="integers"):
        learner.update([1, 2], [0.5, 1.0])
    assert len(learner.labeled) == 0  # none of the failed calls labelled anything
    learner.update([1, 2], [3, 4])
    with pytest.raises(PoolError, match="already labelled"):
        learner.update([2, 5], [1, 1])
    assert learner.labeled.tolist() == [1, 2]
    with pytest.raises(PoolError, match="call fit"):
        learner.query(3)
    with pytest.raises(PoolError, match="no labelled samples"):
        ActiveLearner(create_model_smallcnn, TensorDataset(x), ClassificationTask(10)).fit()


def test_query_records_scores_and_advances_the_cycle(small_digits):
    x, y = _data(small_digits)
    learner = ActiveLearner(
        create_model_smallcnn,
        TensorDataset(x),
        ClassificationTask(10),
        "entropy",
        oracle=CallbackOracle(lambda idx: y[idx]),
        train=TRAIN,
    )
    learner.update(np.arange(20))
    learner.fit()
    picked = learner.query(8)
    record = learner.queries[-1]
    assert record["cycle"] == 0 and learner.cycle == 1 and record["indices"] == picked.tolist()
    assert np.all(np.diff(record["scores"]) <= 0)  # top-k: best first
    learner.update(picked)
    assert (learner.labeled_at[picked] == 1).all() and (learner.labeled_at[:20] == 0).all()
    with pytest.raises(PoolError, match="already labelled"):
        learner.query(2, candidates=[0, 50, 51])


@pytest.mark.parametrize("strategy", ["ll4al", "mc-dropout"])
def test_a_restored_learner_continues_exactly(small_digits, strategy):
    x, y = _data(small_digits)

    def learner():
        return ActiveLearner(
            create_model_smallcnn,
            TensorDataset(x),
            ClassificationTask(10),
            create_strategy(strategy),
            oracle=DatasetOracle(y),
            train=TRAIN,
            seed=3,
        )

    a = learner()
    a.update(np.arange(0, 120, 5))
    a.fit()
    a.update(a.query(6))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = learner()
    b.load_state_dict(torch.load(buf, weights_only=True))
    assert b.cycle == a.cycle == 1 and np.array_equal(b.labeled, a.labeled)
    a.fit()
    b.fit()
    assert np.array_equal(a.query(6), b.query(6))
    assert a.queries == b.queries
    for pa, pb in zip(a.model.state_dict().values(), b.model.state_dict().values()):
        assert torch.equal(pa, pb)


class UserNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.body(x))


def test_a_users_own_module_and_label_free_dataset(small_digits):
    x, y = _data(small_digits)
    net = UserNet()
    before = net.head.weight.detach().clone()
    learner = ActiveLearner(net, Items(x), ClassificationTask(10), "entropy-gradnorm", train=TRAIN)
    learner.update(np.arange(30), y[:30])
    learner.fit()
    assert learner.model is net and not torch.equal(before, net.head.weight)
    picked = learner.query(5)
    assert len(set(picked.tolist())) == 5 and picked.min() >= 30
    test = TensorDataset(x[60:], torch.as_tensor(y[60:]))
    assert 0.0 <= learner.evaluate(test)["accuracy"] <= 1.0
    with pytest.raises(DataError, match="has no target"):
        DatasetOracle(Items(x)).labels(np.array([0]))
