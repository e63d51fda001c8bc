"""Tasks: what differs between kinds of supervision.

A :class:`Task` tells the learner, the training loop and the strategies everything that depends
on the shape of the labels: the training loss, the evaluation metrics, how labels are checked and
stacked, which columns the results get, and how a dense per-element unsupervised loss (one value
per pixel or voxel) becomes one number per sample (``reduction``: mean, sum or max over the
elements, as baal's heuristics offer).

:class:`ClassificationTask` (one label per sample, logits ``[N, C]``) is the task implemented
and :class:`SegmentationTask` (one class per pixel, logits ``[N, C, H, W]``, an ignore index,
mIoU and pixel accuracy) are the tasks implemented here.

Dense tasks (``dense = True``) give one prediction per element, not per sample: a strategy that
needs one ``[N, C]`` prediction (or features, votes) per sample refuses them with a
:class:`ConfigError` (see ``Strategy.supports_dense``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .data.base import check_labels, mask_value_problem
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
    """Collects ``(outputs, targets)`` batches and computes a task's metrics at the end.

    An accumulator that can add another's counts defines ``merge(other)``; evaluation under
    torchrun then splits the data between the processes and merges their accumulators (without
    it, every process evaluates all the data)."""

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
    dense : whether outputs hold one prediction per element (pixel, voxel), ``[N, C, ...]``,
        rather than one per sample, ``[N, C]``.
    """

    name: str = "task"
    metrics: tuple[str, ...] = ()
    num_classes: int
    reduction: str = "mean"
    dense: bool = False

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


def _check_num_classes(num_classes: Any) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    return num_classes


def _check_reduction(reduction: Any) -> str:
    if reduction not in REDUCTIONS:
        raise ConfigError(f"unknown reduction {reduction!r}; use one of {', '.join(REDUCTIONS)}")
    return str(reduction)


class _Accuracy(MetricAccumulator):
    def __init__(self) -> None:
        self.correct = 0
        self.total = 0

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        pred = output.argmax(dim=1).cpu()
        self.correct += int((pred == target.cpu()).sum())
        self.total += len(target)

    def merge(self, other: _Accuracy) -> None:
        self.correct += other.correct
        self.total += other.total

    def compute(self) -> dict[str, float]:
        return {"accuracy": self.correct / self.total if self.total else float("nan")}


class ClassificationTask(Task):
    """One class index per sample; logits ``[N, C]``; top-1 accuracy; cross-entropy."""

    name = "classification"
    metrics = ("accuracy",)

    def __init__(self, num_classes: int, reduction: str = "mean") -> None:
        self.num_classes = _check_num_classes(num_classes)
        self.reduction = _check_reduction(reduction)

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


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None = None
) -> torch.Tensor:
    """int64 [C, C] counts, row = true class, column = predicted class, over every element of
    ``target`` (any shape; ``pred`` the same shape) whose value is not ``ignore_index``."""
    pred, target = pred.flatten().cpu().long(), target.flatten().cpu().long()
    if ignore_index is not None:
        keep = target != ignore_index
        pred, target = pred[keep], target[keep]
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def miou_and_pixel_accuracy(matrix: torch.Tensor) -> dict[str, float]:
    """mIoU and pixel accuracy of a confusion matrix [C, C] (rows true, columns predicted).

    IoU of class c = TP / (TP + FP + FN) = m[c, c] / (row c + column c - m[c, c]); the mean is over
    the classes present in the prediction or the target (union > 0), so a class absent from both
    neither counts as 0 nor as 1. Pixel accuracy = trace / total. NaN where nothing was counted.
    """
    m = matrix.double()
    inter = m.diag()
    union = m.sum(dim=0) + m.sum(dim=1) - inter
    present = union > 0
    total = m.sum()
    return {
        "miou": float((inter[present] / union[present]).mean()) if present.any() else float("nan"),
        "pixel_accuracy": float(inter.sum() / total) if total > 0 else float("nan"),
    }


class _SegmentationMetrics(MetricAccumulator):
    def __init__(self, num_classes: int, ignore_index: int) -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        pred = output.argmax(dim=1)
        self.matrix += confusion_matrix(pred, target, self.num_classes, self.ignore_index)

    def merge(self, other: _SegmentationMetrics) -> None:
        self.matrix += other.matrix

    def compute(self) -> dict[str, float]:
        return miou_and_pixel_accuracy(self.matrix)


class SegmentationTask(Task):
    """One class index per pixel: logits ``[N, C, H, W]``, masks ``[N, H, W]`` of integers
    (:meth:`collate` holds them as :attr:`mask_dtype`).

    * loss: pixel cross-entropy, pixels labelled ``ignore_index`` left out (mean over the valid
      pixels of the batch); ``per_sample_loss``: each image's mean over its valid pixels (0 for
      an image without one);
    * metrics: ``miou`` (mean IoU over the classes present in the prediction or the target, the
      ignore index excluded) and ``pixel_accuracy`` (over the valid pixels), accumulated as one
      confusion matrix over the whole set; results columns ``test_miou``,
      ``test_pixel_accuracy``, ``train_miou``, ``train_pixel_accuracy``;
    * unsupervised scores (entropy, entropy-gradnorm, ...) are per pixel, reduced to one per
      image with ``reduction`` (mean, sum or max) over the valid pixels. At scoring time the
      masks are unknown, so every pixel counts as valid (``reduce(values)`` without ``valid``);
      a caller with a validity mask of its own (e.g. padding) passes it as ``valid``.
    """

    name = "segmentation"
    metrics = ("miou", "pixel_accuracy")
    dense = True

    def __init__(self, num_classes: int, ignore_index: int = 255, reduction: str = "mean") -> None:
        self.num_classes = _check_num_classes(num_classes)
        self.reduction = _check_reduction(reduction)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise ConfigError(f"ignore_index must be an integer, got {ignore_index!r}")
        if 0 <= ignore_index < num_classes:
            raise ConfigError(
                f"ignore_index {ignore_index} is a class of the {num_classes}; use a value "
                "outside [0, num_classes) (255 by convention)"
            )
        self.ignore_index = ignore_index

    def __repr__(self) -> str:
        return (
            f"SegmentationTask(num_classes={self.num_classes}, ignore_index={self.ignore_index}, "
            f"reduction={self.reduction!r})"
        )

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = target != self.ignore_index
        if not valid.any():  # F.cross_entropy would give NaN (0 / 0)
            return output.sum() * 0.0
        return F.cross_entropy(output, target.long(), ignore_index=self.ignore_index)

    def per_sample_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.long()
        pixels = F.cross_entropy(output, target, ignore_index=self.ignore_index, reduction="none")
        return reduce_elements(pixels, "mean", valid=target != self.ignore_index)

    def metric_accumulator(self) -> MetricAccumulator:
        return _SegmentationMetrics(self.num_classes, self.ignore_index)

    def collate(self, labels: Sequence[Any]) -> torch.Tensor:
        if len(labels) == 0:
            return torch.from_numpy(np.zeros((0, 0, 0), dtype=self.mask_dtype))
        masks = []
        for i, label in enumerate(labels):
            arr = np.asarray(label.detach().cpu() if isinstance(label, torch.Tensor) else label)
            if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
                raise DataError(
                    f"mask {i}: masks must hold integer class indices, got dtype {arr.dtype}; "
                    "read masks as index (or palette) images, not RGB or float"
                )
            if arr.ndim != 2:
                raise DataError(
                    f"mask {i}: expected one mask [H, W] per sample, got shape {arr.shape}"
                )
            if masks and arr.shape != masks[0].shape:
                raise DataError(
                    f"mask {i} has size {arr.shape} but mask 0 has {masks[0].shape}; masks of "
                    "one batch must be the same size (resize or crop them like their images)"
                )
            masks.append(arr.astype(np.int64))
        stacked = np.stack(masks)
        problem = mask_value_problem(stacked, self.num_classes, self.ignore_index)
        if problem is not None:
            raise DataError(
                f"mask {problem}; fix the masks, raise num_classes, or map unlabelled pixels to "
                "the ignore index"
            )
        return torch.from_numpy(stacked.astype(self.mask_dtype))

    @property
    def mask_dtype(self) -> type:
        """How labelled masks are held (learner, checkpoints): uint8 where every class and the
        ignore index fit in it (8x less than int64: 2 MB per full Cityscapes mask, not 16 MB),
        else int64. The losses and metrics read either."""
        return np.uint8 if self.num_classes <= 255 and 0 <= self.ignore_index <= 255 else np.int64
