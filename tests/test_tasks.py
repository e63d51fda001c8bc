"""Tasks: classification and segmentation (dense outputs [N, C, H, W], ignore index 255,
mIoU), through the learner, the loop and every strategy."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from gradnorm_al import (
    ActiveLearner,
    ClassificationTask,
    ConfigError,
    DataError,
    DatasetOracle,
    SegmentationTask,
)
from gradnorm_al.data.shapes import synthetic_shapes
from gradnorm_al.experiment.results import ResultsStore
from gradnorm_al.loop import LoopConfig, run_trial
from gradnorm_al.models import create_model
from gradnorm_al.strategies import STRATEGIES, create_strategy, dense_strategies
from gradnorm_al.strategies.gradnorm import entropy_loss
from gradnorm_al.tasks import confusion_matrix, miou_and_pixel_accuracy, reduce_elements
from gradnorm_al.train import TrainConfig

IGNORE = 255


class TinyFCN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 3, 1))

    def forward(self, x):
        return self.net(x)


def _toy(n=48, seed=0):
    x, masks = synthetic_shapes(n, 8, seed=seed)
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


def test_segmentation_runs_through_the_learner_and_the_loop(tmp_path):
    x, masks = _toy()
    test = TensorDataset(*_toy(16, seed=1))
    learner = ActiveLearner(
        TinyFCN,
        TensorDataset(x, masks),
        SegmentationTask(3),
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
        SegmentationTask(3),
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
        SegmentationTask(3, reduction=reduction),
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


def test_miou_against_a_confusion_matrix_by_hand():
    """Two 1x3 images, 4 classes (class 3 appears nowhere), one ignored pixel predicted 0.

    true  [0 0 1] [1 2 255]   rows true, columns predicted:  [[1 1 0 0]
    pred  [0 1 1] [1 1 0  ]                                   [0 2 0 0]
                                                              [0 1 0 0]
                                                              [0 0 0 0]]
    IoU_0 = 1 / (2 + 1 - 1) = 1/2, IoU_1 = 2 / (2 + 4 - 2) = 1/2, IoU_2 = 0 / (1 + 0 - 0) = 0,
    class 3 has union 0 and is left out: mIoU = 1/3; pixel accuracy = 3 / 5.
    """
    target = torch.tensor([[[0, 0, 1]], [[1, 2, IGNORE]]])
    pred = torch.tensor([[[0, 1, 1]], [[1, 1, 0]]])
    expected = [[1, 1, 0, 0], [0, 2, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]
    assert confusion_matrix(pred, target, 4, IGNORE).tolist() == expected
    assert miou_and_pixel_accuracy(torch.tensor(expected)) == pytest.approx(
        {"miou": 1 / 3, "pixel_accuracy": 3 / 5}
    )
    task = SegmentationTask(4)
    acc = task.metric_accumulator()
    logits = F.one_hot(pred, 4).permute(0, 3, 1, 2).float()  # argmax = pred
    for i in range(2):  # accumulated over batches, not averaged per batch
        acc.update(logits[i : i + 1], target[i : i + 1])
    assert acc.compute() == pytest.approx({"miou": 1 / 3, "pixel_accuracy": 3 / 5})
    assert task.result_columns() == (
        "test_miou", "test_pixel_accuracy", "train_miou", "train_pixel_accuracy"
    )  # fmt: skip


def test_segmentation_loss_leaves_out_the_ignore_index():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([[[0, 1], [2, IGNORE]], [[IGNORE] * 2] * 2])
    task = SegmentationTask(3)
    log_p = F.log_softmax(logits, dim=1)
    nll = [-log_p[0, c, i, j] for (i, j), c in [((0, 0), 0), ((0, 1), 1), ((1, 0), 2)]]
    first = sum(nll) / 3
    assert torch.allclose(task.per_sample_loss(logits, target), torch.stack([first, first * 0]))
    assert torch.allclose(task.loss(logits, target), first)  # mean over the 3 valid pixels
    none_valid = task.loss(logits, torch.full((2, 2, 2), IGNORE))
    assert float(none_valid.detach()) == 0.0 and none_valid.requires_grad  # not NaN


def test_segmentation_masks_are_checked():
    task = SegmentationTask(3)
    masks = task.collate(
        [np.array([[0, 1], [2, IGNORE]], dtype=np.uint8), torch.zeros(2, 2, dtype=torch.int32)]
    )
    assert masks.dtype == torch.uint8 and masks.shape == (2, 2, 2)  # 8x smaller than int64
    assert masks.tolist() == [[[0, 1], [2, IGNORE]], [[0, 0], [0, 0]]]
    # classes or an ignore index beyond uint8: int64
    wide = SegmentationTask(300, ignore_index=-1).collate([np.array([[299, -1]])])
    assert wide.dtype == torch.int64 and wide.tolist() == [[[299, -1]]]
    # the losses read either dtype alike
    logits = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    assert torch.equal(task.loss(logits, masks), task.loss(logits, masks.long()))
    assert torch.equal(
        task.per_sample_loss(logits, masks), task.per_sample_loss(logits, masks.long())
    )
    with pytest.raises(DataError, match=r"mask value 7 is neither a class in \[0, 3\).*fix"):
        task.collate([np.array([[0, 7], [7, 1]])])
    with pytest.raises(DataError, match="mask value -1"):
        task.collate(torch.tensor([[[-1, 0]]]))
    with pytest.raises(DataError, match="integer class indices"):
        task.collate([np.zeros((2, 2), dtype=np.float32)])
    with pytest.raises(DataError, match=r"mask 1 has size \(3, 2\)"):
        task.collate([np.zeros((2, 2), dtype=int), np.zeros((3, 2), dtype=int)])
    with pytest.raises(DataError, match=r"one mask \[H, W\]"):
        task.collate([np.zeros(4, dtype=int)])
    with pytest.raises(ConfigError, match="ignore_index 2 is a class"):
        SegmentationTask(3, ignore_index=2)
    with pytest.raises(ConfigError, match="unknown reduction"):
        SegmentationTask(3, reduction="median")


def test_synthetic_shapes_are_seeded():
    x, masks = synthetic_shapes(4, 12, seed=3)
    assert x.shape == (4, 3, 12, 12) and x.dtype == torch.float32
    assert masks.shape == (4, 12, 12) and masks.dtype == torch.int64
    assert set(masks.unique().tolist()) <= {0, 1, 2} and 0.0 <= x.min() <= x.max() <= 1.0
    again, masks_again = synthetic_shapes(4, 12, seed=3)
    assert torch.equal(x, again) and torch.equal(masks, masks_again)
    assert not torch.equal(masks, synthetic_shapes(4, 12, seed=4)[1])


#: what runs on segmentation: strategies that reduce per-pixel scores with the task's reduction,
#: diversity on pooled features or the classifier's gradient, and vaal (images only)
DENSE = {
    "random",
    "entropy",
    "margin",
    "least-confidence",
    "entropy-gradnorm",
    "mc-dropout",
    "core-set",
    "badge",
    "vaal",
}
SPECS = [*STRATEGIES.names(), "entropy@power", "entropy-gradnorm@kmeans++", "margin@k-center"]
#: CPU-sized settings for the strategies that sample or train something
TINY = {
    "mc-dropout": {"samples": 3},
    "vaal": {"iterations": 2, "batch_size": 4, "latent_dim": 4, "width": 4, "hidden": 8},
}


@pytest.mark.parametrize("spec", SPECS)
def test_every_strategy_runs_or_refuses_on_segmentation(spec):
    x, masks = _toy(12)
    name = spec.partition("@")[0]
    runs = name in DENSE

    def learner():
        # fcn-small: the diversity strategies need its embed / 1x1 classifier
        return ActiveLearner(
            lambda: create_model("fcn-small", num_classes=3, in_channels=3, width=4),
            TensorDataset(x, masks),
            SegmentationTask(3),
            create_strategy(spec, **TINY.get(name, {})),
            train=TrainConfig(epochs=1, batch_size=4),
        )

    if not runs:
        with pytest.raises(
            ConfigError, match=re.escape(f"strategy {spec} cannot run on the segmentation")
        ):
            learner()
        return
    active = learner()
    active.update(np.arange(4), masks[:4])
    active.fit()
    picked = active.query(3)
    assert len(set(picked.tolist())) == 3 and set(picked.tolist()) <= set(range(4, 12))


def test_expected_gradnorm_is_refused_for_segmentation_with_the_reason():
    with pytest.raises(ConfigError, match=r"C times the entropy.*paper uses entropy-gradnorm"):
        ActiveLearner(TinyFCN, TensorDataset(*_toy(4)), SegmentationTask(3), "expected-gradnorm")
    assert set(dense_strategies()) == DENSE  # a new strategy must choose, and this test with it
