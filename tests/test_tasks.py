"""Tasks: the interface admits dense outputs [N, C, H, W] with an ignore index and mIoU, proven
with a tiny dense task written here (the real segmentation task is its own issue)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from gradnorm_al import ActiveLearner, ClassificationTask, DataError, DatasetOracle
from gradnorm_al.experiment.results import ResultsStore
from gradnorm_al.loop import LoopConfig, run_trial
from gradnorm_al.strategies.gradnorm import entropy_loss
from gradnorm_al.tasks import MetricAccumulator, Task, reduce_elements
from gradnorm_al.train import TrainConfig

IGNORE = 255


class _Confusion(MetricAccumulator):
    def __init__(self, num_classes: int) -> None:
        self.c = num_classes
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, output, target):
        pred, target = output.argmax(dim=1).flatten(), target.flatten()
        valid = target != IGNORE
        self.matrix += torch.bincount(
            target[valid] * self.c + pred[valid], minlength=self.c * self.c
        ).reshape(self.c, self.c)

    def compute(self):
        m = self.matrix.double()
        inter, union = m.diag(), m.sum(0) + m.sum(1) - m.diag()
        present = union > 0
        return {
            "miou": float((inter[present] / union[present]).mean()),
            "pixel_accuracy": float(inter.sum() / m.sum()),
        }


class DenseToyTask(Task):
    """Per-pixel classes with an ignore index; mIoU over classes present; pixel accuracy."""

    name = "dense-toy"
    metrics = ("miou", "pixel_accuracy")

    def __init__(self, num_classes: int = 3, reduction: str = "mean") -> None:
        self.num_classes, self.reduction = num_classes, reduction

    def loss(self, output, target):
        return F.cross_entropy(output, target, ignore_index=IGNORE)

    def per_sample_loss(self, output, target):
        pixels = F.cross_entropy(output, target, ignore_index=IGNORE, reduction="none")
        return reduce_elements(pixels, "mean", valid=target != IGNORE)

    def metric_accumulator(self):
        return _Confusion(self.num_classes)

    def collate(self, labels):
        masks = torch.stack([torch.as_tensor(m, dtype=torch.int64) for m in labels])
        bad = (masks != IGNORE) & ((masks < 0) | (masks >= self.num_classes))
        if bad.any():
            raise DataError(f"mask value {int(masks[bad][0])} is not a class or {IGNORE}")
        return masks


class TinyFCN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 3, 1))

    def forward(self, x):
        return self.net(x)


def _toy(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g)
    masks = (x[:, 0] * 3).long().clamp(max=2)
    masks[:, 0, :] = IGNORE  # the first row of every image is unlabelled
    return x, masks


def test_reduce_elements_by_hand():
    v = torch.tensor([[[1.0, 2.0], [3.0, 6.0]], [[0.0, 0.0], [0.0, 5.0]]])
    valid = torch.tensor([[[True, True], [False, True]], [[False, False], [False, False]]])
    assert reduce_elements(v, "mean").tolist() == [3.0, 1.25]
    assert reduce_elements(v, "sum").tolist() == [12.0, 5.0]
    assert reduce_elements(v, "max").tolist() == [6.0, 5.0]
    assert reduce_elements(v, "mean", valid).tolist() == [3.0, 0.0]  # (1 + 2 + 6) / 3; none valid
    assert reduce_elements(v, "max", valid).tolist() == [6.0, 0.0]
    assert reduce_elements(torch.tensor([1.0, 2.0]), "max").tolist() == [1.0, 2.0]


def test_a_dense_task_runs_through_the_learner_and_the_loop(tmp_path):
    x, masks = _toy()
    test = TensorDataset(*_toy(16, seed=1))
    learner = ActiveLearner(
        TinyFCN,
        TensorDataset(x, masks),
        DenseToyTask(),
        "entropy-gradnorm",
        oracle=DatasetOracle(masks),
        train=TrainConfig(epochs=3, lr=0.1, batch_size=8),
    )
    schedule = LoopConfig(cycles=3, initial_fraction=0.25, budget_fraction=0.125)
    store = ResultsStore(tmp_path)
    records = run_trial(learner, test=test, schedule=schedule, trial=0, on_cycle=store.add)
    assert list(records[0].metrics) == [
        "test_miou", "test_pixel_accuracy", "train_miou", "train_pixel_accuracy"
    ]  # fmt: skip
    assert all(0.0 <= v <= 1.0 for r in records for v in r.metrics.values())
    header = (tmp_path / "results.csv").read_text().splitlines()[0].split(",")
    assert header[5:9] == ["test_miou", "test_pixel_accuracy", "train_miou", "train_pixel_accuracy"]
    assert [r.num_labeled for r in records] == [12, 18, 24]


def test_dense_gradnorm_scores_equal_one_backward_per_image():
    """Per-image gradient norm of the mean pixel entropy, from the batched engine, against a
    plain backward pass per image (float64)."""
    torch.manual_seed(0)
    x, masks = _toy(20)
    model = TinyFCN().double()
    learner = ActiveLearner(
        model,
        TensorDataset(x.double(), masks),
        DenseToyTask(),
        "entropy-gradnorm",
        train=TrainConfig(epochs=1, batch_size=8),
    )
    learner.update(np.arange(6), masks[:6])
    learner.fit()
    picked = learner.query(14)  # every unlabelled image, best first
    reference = []
    for i in picked:
        model.zero_grad()
        entropy_loss(model(x[i : i + 1].double())).sum().backward()
        reference.append(sum(float(p.grad.norm()) for p in model.parameters()))
    scores = learner.last_scores
    assert np.max(np.abs(scores - reference)) <= 1e-10 * np.max(np.abs(reference))


@pytest.mark.parametrize("reduction", ["mean", "max"])
def test_uncertainty_scores_use_the_tasks_reduction(reduction):
    torch.manual_seed(0)
    x, masks = _toy(24)
    learner = ActiveLearner(
        TinyFCN(),
        TensorDataset(x, masks),
        DenseToyTask(reduction=reduction),
        "entropy",
        train=TrainConfig(epochs=1, batch_size=8),
    )
    learner.update(np.arange(8), masks[:8])
    learner.fit()
    picked = learner.query(16)
    with torch.no_grad():
        p = F.softmax(learner.model(x[picked]).double(), dim=1)
        pixel = -(p * p.log()).sum(dim=1).flatten(1)
    expected = pixel.mean(dim=1) if reduction == "mean" else pixel.amax(dim=1)
    assert torch.allclose(torch.as_tensor(learner.last_scores), expected, rtol=1e-6)
    assert np.all(np.diff(learner.last_scores) <= 0)


def test_classification_labels_are_checked():
    task = ClassificationTask(3)
    assert task.collate([0, 2, 1]).tolist() == [0, 2, 1]
    with pytest.raises(DataError, match="out of range"):
        task.collate([0, 3])
    with pytest.raises(DataError, match="booleans"):
        task.collate(np.array([True, False]))
    assert task.result_columns() == ("test_accuracy", "train_accuracy")
