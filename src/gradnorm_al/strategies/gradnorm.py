"""The method of Wang et al. (AAAI 2022): select the candidates whose unsupervised loss has the
largest gradient norm w.r.t. the model parameters.

Two losses stand in for the unknown label (``z`` = logits, ``p = softmax(z)``):

* entropy (Eq. 7):  ``L(x) = -sum_i p_i log p_i``
* expected (Eq. 6): ``L(x) = sum_i p_i CE(z, i)``, with ``p`` attached to the graph as in the
  published code. Since ``CE(z, i) = -log p_i`` this *is* the entropy, value and gradient, so both
  schemes rank identically; with ``p`` detached the gradient w.r.t. the logits is
  ``sum_i p_i (p - e_i) = 0`` and every score would be 0. Both facts are tested.

Score: the norm of dL/dtheta over every trainable parameter the loss reaches, model in eval mode:
``norm="tensor-sum"`` (published code: sum over parameter tensors of each tensor's L2 norm) or
``norm="l2"`` (the global L2 norm of Eq. 5).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .._torch import model_device_dtype
from ..data.batching import iter_batches
from ..errors import ConfigError
from ..options import OneOf
from ..pergrad import per_sample_grad_norms
from ..pergrad.common import check_norm
from ..tasks import REDUCTIONS, Task, reduce_elements
from .base import STRATEGIES, ScoringStrategy, SelectionContext

SCHEMES = ("entropy", "expected")
#: The norms that give one score per sample (``per-tensor`` gives one per parameter tensor).
SCALAR_NORMS = ("tensor-sum", "l2")
#: the strategies that follow a run's ``norm`` option
GRADNORM_SCORERS = ("entropy-gradnorm", "expected-gradnorm")
ScalarNorm = Annotated[str, OneOf(SCALAR_NORMS)]


def entropy_loss(logits: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Prediction entropy per sample, [N, C, ...] -> [N], via log_softmax (stable); dense outputs
    are reduced over their elements with ``reduction`` (mean, sum or max)."""
    log_p = F.log_softmax(logits, dim=1)
    return reduce_elements(-(log_p.exp() * log_p).sum(dim=1), reduction)


def expected_ce_loss(
    logits: torch.Tensor, *, detach_p: bool = False, reduction: str = "mean"
) -> torch.Tensor:
    """Eq. 6 literally: ``sum_i p_i * CE(logits, i)`` per sample, [N, C, ...] -> [N].

    ``detach_p=False`` is the published code (and equals :func:`entropy_loss`); ``detach_p=True``
    treats the label distribution as a constant, which makes the logit gradient exactly zero.
    """
    p = F.softmax(logits, dim=1)
    if detach_p:
        p = p.detach()
    num_classes = logits.shape[1]
    label_shape = (logits.shape[0], *logits.shape[2:])
    total = torch.zeros(label_shape, dtype=logits.dtype, device=logits.device)
    for i in range(num_classes):
        label = torch.full(label_shape, i, dtype=torch.long, device=logits.device)
        total = total + p[:, i] * F.cross_entropy(logits, label, reduction="none")
    return reduce_elements(total, reduction)


SCHEME_LOSSES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "entropy": entropy_loss,
    "expected": expected_ce_loss,
}


def _input_batches(data: Dataset | DataLoader | torch.Tensor, batch_size: int) -> Iterator:
    if isinstance(data, torch.Tensor):
        for start in range(0, len(data), batch_size):
            yield data[start : start + batch_size]
    elif isinstance(data, DataLoader):
        for item in data:
            yield item[0] if isinstance(item, (tuple, list)) else item
    else:
        for x, _ in iter_batches(data, batch_size):
            yield x


def gradnorm_scores(
    model: nn.Module,
    data: Dataset | DataLoader | torch.Tensor,
    *,
    scheme: str = "entropy",
    norm: str = "tensor-sum",
    batch_size: int = 128,
    device: str | torch.device | None = None,
    progress: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    """Gradient-norm score of every sample of ``data``, float64 [N] on the CPU, in data order.

    Parameters
    ----------
    model : a classifier returning logits [n, C] (or [n, C, ...] for dense outputs), a tuple whose
        first item is the logits, or a dict with a "logits" / "out" entry. Scored in eval mode; its
        parameters, buffers, train/eval modes, device and ``.grad`` are left as they were.
    data : a Dataset yielding tensors or ``(input, target)`` tuples (targets are ignored), a
        DataLoader (iterated as it is), or a tensor of inputs [N, ...].
    scheme : "entropy" (Eq. 7) or "expected" (Eq. 6, identical ranking, see module docs).
    norm : "tensor-sum" (published code) or "l2" (Eq. 5).
    device : where to compute; default the model's device.
    reduction : for dense outputs [n, C, ...], how per-element losses become one per sample
        (mean, sum or max) before the gradient is taken.
    """
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
    check_norm(norm)
    if norm == "per-tensor":
        raise ConfigError("gradnorm_scores needs a scalar norm: use 'tensor-sum' or 'l2'")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    if reduction not in REDUCTIONS:
        raise ConfigError(f"unknown reduction {reduction!r}; use one of {', '.join(REDUCTIONS)}")
    scheme_loss = SCHEME_LOSSES[scheme]

    def loss_fn(logits: torch.Tensor) -> torch.Tensor:
        return scheme_loss(logits, reduction=reduction)

    home, dtype = model_device_dtype(model)
    target = torch.device(device) if device is not None else home
    if target != home:
        model.to(target)
    try:
        scores = []
        batches: Iterable = _input_batches(data, batch_size)
        if progress:
            batches = tqdm(batches, desc=f"{scheme}-gradnorm", leave=False, unit="batch")
        for x in batches:
            x = x.to(target, dtype=dtype if x.is_floating_point() else None)
            scores.append(per_sample_grad_norms(model, x, loss_fn, norm=norm).cpu())
    finally:
        if target != home:
            model.to(home)
    return torch.cat(scores) if scores else torch.zeros(0, dtype=torch.float64)


class GradnormStrategy(ScoringStrategy):
    """Top-K candidates by :func:`gradnorm_scores`."""

    nonnegative_scores = True  # norms, entropies, disagreements
    supports_dense = True  # per-pixel losses reduced with the task's reduction (entropy only)
    per_candidate = True

    def __init__(
        self,
        scheme: Annotated[str, OneOf(SCHEMES)] = "entropy",
        norm: ScalarNorm = "tensor-sum",
    ) -> None:
        self.scheme = scheme
        self.norm = norm
        self.supports_dense = scheme == "entropy"

    def unsupported_task(self, task: Task | None) -> str | None:
        if self.scheme == "expected" and task is not None and task.dense:
            return (
                "the expected loss (Eq. 6) takes a cross-entropy for each of the C classes at "
                "every pixel (C full label maps per image: C times the entropy's memory and "
                "time, too costly at segmentation sizes, and with p attached it equals the "
                "entropy anyway); the paper uses entropy-gradnorm (Eq. 7) for segmentation: "
                "use entropy-gradnorm"
            )
        return super().unsupported_task(task)

    def score(self, ctx: SelectionContext) -> np.ndarray:
        return gradnorm_scores(
            ctx.model,
            ctx.candidate_data(),
            scheme=self.scheme,
            norm=self.norm,
            batch_size=ctx.batch_size,
            device=ctx.device,
            progress=ctx.progress,
            reduction=ctx.task.reduction if ctx.task is not None else "mean",
        ).numpy()


@STRATEGIES.register("entropy-gradnorm")
def entropy_gradnorm(norm: ScalarNorm = "tensor-sum") -> GradnormStrategy:
    """Eq. 7: gradient norm of the prediction entropy."""
    return GradnormStrategy("entropy", norm)


@STRATEGIES.register("expected-gradnorm")
def expected_gradnorm(norm: ScalarNorm = "tensor-sum") -> GradnormStrategy:
    """Eq. 6: gradient norm of the expected cross-entropy (p attached, as published)."""
    return GradnormStrategy("expected", norm)
