"""Tasks: what differs between kinds of supervision.

A :class:`Task` tells the learner, the training loop and the strategies everything that depends
on the shape of the labels: the training loss, the evaluation metrics, how labels are checked and
stacked, which columns the results get, and how a dense per-element unsupervised loss (one value
per pixel or voxel) becomes one number per sample (``reduction``: mean, sum or max over the
elements, as baal's heuristics offer).

:class:`ClassificationTask` (one label per sample, logits ``[N, C]``) is the task implemented
here. The interface admits dense outputs ``[N, C, H, W]`` with an ignore index and metrics such as
mIoU; the tests prove it with a small dense task of their own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .data.base import check_labels
from .errors import ConfigError, DataError

REDUCTIONS = ("mean", "sum", "max")


def reduce_elements(
    values: torch.Tensor, reduction: str = "mean", valid: torch.Tensor | None = None
) -> torch.Tensor:
    """[N, ...] per-element values -> [N] per-sample values.

    ``valid`` (bool, same shape) masks elements out (an ignore index); a sample without a valid
    element gets 0. A tensor that is already [N] is returned as it is.
    """
    if reduction not in REDUCTIONS:
        raise ConfigError(f"unknown reduction {reduction!r}; use one of {', '.join(REDUCTIONS)}")
    if values.dim() == 1:
        return values
    flat = values.flatten(1)
    if valid is None:
        if reduction == "mean":
            return flat.mean(dim=1)
        return flat.sum(dim=1) if reduction == "sum" else flat.amax(dim=1)
    mask = valid.flatten(1)
    if reduction == "max":
        low = torch.finfo(flat.dtype).min
        out = torch.where(mask, flat, torch.full_like(flat, low)).amax(dim=1)
        return torch.where(mask.any(dim=1), out, torch.zeros_like(out))
    total = (flat * mask).sum(dim=1)
    if reduction == "sum":
        return total
    return total / mask.sum(dim=1).clamp_min(1)


class MetricAccumulator:
    """Collects ``(outputs, targets)`` batches and computes a task's metrics at the end."""

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        raise NotImplementedError


class Task:
    """What a kind of supervision defines. Subclasses implement every method.

    Attributes
    ----------
    name : the task's name.
    metrics : metric names, the first the headline (e.g. ``("accuracy",)``); results get the
        columns ``test_<metric>`` and ``train_<metric>`` for each, in this order.
    num_classes : number of classes of the labels.
    reduction : how per-element unsupervised losses become one number per sample.
    """

    name: str = "task"
    metrics: tuple[str, ...] = ()
    num_classes: int
    reduction: str = "mean"

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The scalar training loss of a batch (mean over the batch)."""
        raise NotImplementedError

    def per_sample_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """[B] the training loss of each sample of a batch."""
        raise NotImplementedError

    def metric_accumulator(self) -> MetricAccumulator:
        raise NotImplementedError

    def collate(self, labels: Sequence[Any]) -> torch.Tensor:
        """Check labels given for ``len(labels)`` samples and stack them into one tensor
        ``[len(labels), ...]``; raise :class:`DataError` naming the bad label and the fix."""
        raise NotImplementedError

    def reduce(self, values: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """[N, ...] per-element unsupervised losses -> [N] with this task's ``reduction``."""
        return reduce_elements(values, self.reduction, valid)

    def result_columns(self) -> tuple[str, ...]:
        return tuple(f"test_{m}" for m in self.metrics) + tuple(f"train_{m}" for m in self.metrics)


class _Accuracy(MetricAccumulator):
    def __init__(self) -> None:
        self.correct = 0
        self.total = 0

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        pred = output.argmax(dim=1).cpu()
        self.correct += int((pred == target.cpu()).sum())
        self.total += len(target)

    def compute(self) -> dict[str, float]:
        return {"accuracy": self.correct / self.total if self.total else float("nan")}


class ClassificationTask(Task):
    """One class index per sample; logits ``[N, C]``; top-1 accuracy; cross-entropy."""

    name = "classification"
    metrics = ("accuracy",)

    def __init__(self, num_classes: int, reduction: str = "mean") -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ConfigError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        if reduction not in REDUCTIONS:
            raise ConfigError(
                f"unknown reduction {reduction!r}; use one of {', '.join(REDUCTIONS)}"
            )
        self.num_classes = num_classes
        self.reduction = reduction

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output, target)

    def per_sample_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output, target, reduction="none")

    def metric_accumulator(self) -> MetricAccumulator:
        return _Accuracy()

    def collate(self, labels: Sequence[Any]) -> torch.Tensor:
        values = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else labels
        arr = np.asarray(values)
        if arr.dtype == bool:
            raise DataError("labels must be class indices (integers), got booleans")
        check_labels(arr, self.num_classes, "labels")
        return torch.from_numpy(arr.astype(np.int64))
