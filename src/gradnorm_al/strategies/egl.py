"""Expected gradient length (Settles, Craven & Ray, NIPS 2007; Settles 2009 survey, sec. 3.3).

The expected norm of the training gradient the candidate would produce if labelled, the unknown
label drawn from the model's own prediction:

    EGL(x) = sum_y p(y|x) * || grad_theta CE(f(x), y) ||

over every trainable parameter ``theta`` of the network, ``p = softmax(f(x))`` a constant weight
(detached), model in eval mode. ``norm="l2"`` is the classic global L2 norm; ``"tensor-sum"``
(sum over parameter tensors of each tensor's L2 norm) matches the gradnorm strategies' published
norm, for like-for-like comparisons.

All C labels of a batch go through one call of the per-sample engine: each input is repeated C
times and row (b, y) gets the loss CE(f(x_b), y).
"""

from __future__ import annotations

import warnings
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .._torch import eval_mode, first_output
from ..data.batching import iter_batches
from ..errors import ConfigError
from ..options import OneOf
from ..pergrad import FallbackWarning, per_sample_grad_norms
from ..pergrad.common import LossFn
from .base import STRATEGIES, ScoringStrategy, SelectionContext

EGL_NORMS = ("l2", "tensor-sum")


def _check_egl_norm(norm: str) -> None:
    if norm not in EGL_NORMS:
        raise ConfigError(f"unknown EGL norm {norm!r}; use one of {', '.join(EGL_NORMS)}")


class _Misaligned(Exception):
    """The engine called the loss on other rows than the whole chunk (its exact fallback)."""


def _row_label_loss(labels: torch.Tensor) -> LossFn:
    """Loss giving row r the cross-entropy with label ``labels[r]`` -> [rows]."""

    def loss_fn(logits: torch.Tensor) -> torch.Tensor:
        # the engine's whole-model fallback evaluates one sample at a time (vmap), where the row
        # of a label is unknown: refuse, and let the caller take the per-label path
        if logits.shape[0] != labels.shape[0]:
            raise _Misaligned
        return F.cross_entropy(logits, labels, reduction="none")

    return loss_fn


def _fixed_label_loss(label: int) -> LossFn:
    def loss_fn(logits: torch.Tensor) -> torch.Tensor:
        target = torch.full((logits.shape[0],), label, dtype=torch.long, device=logits.device)
        return F.cross_entropy(logits, target, reduction="none")

    return loss_fn


def _egl_batch(
    model: nn.Module, x: torch.Tensor, num_classes: int | None, norm: str
) -> torch.Tensor:
    """EGL of the B inputs ``x`` (on the model's device and dtype) -> float64 [B]."""
    with torch.no_grad(), eval_mode(model):
        logits = first_output(model(x))
    if logits.dim() != 2:
        raise ConfigError(
            f"expected gradient length needs classifier logits [n, C], got shape "
            f"{tuple(logits.shape)}"
        )
    n_rows, n_classes = logits.shape
    if num_classes is not None and n_classes != num_classes:
        raise ConfigError(
            f"the model returns {n_classes} logits but num_classes is {num_classes}; pass the "
            "model's number of classes"
        )
    # detached float64 weights: p is a constant of the expectation, not differentiated
    p = F.softmax(logits.double(), dim=1)
    rows = x.repeat_interleave(n_classes, dim=0)  # row b * C + y is sample b with label y
    labels = torch.arange(n_classes, device=x.device).repeat(n_rows)
    try:
        # one chunk = all rows, so the loss sees exactly the rows the labels were made for
        norms = per_sample_grad_norms(
            model, rows, _row_label_loss(labels), norm=norm, chunk_size=rows.shape[0]
        ).view(n_rows, n_classes)
    except _Misaligned:
        # the engine fell back to its per-sample torch.func path (and warned once): one call per
        # label, whose loss needs no row alignment, is exact there too
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FallbackWarning)
            norms = torch.stack(
                [
                    per_sample_grad_norms(
                        model, x, _fixed_label_loss(y), norm=norm, chunk_size=n_rows
                    )
                    for y in range(n_classes)
                ],
                dim=1,
            )
    return (p * norms.to(p.device)).sum(dim=1)


def expected_gradient_lengths(
    model: nn.Module,
    inputs: torch.Tensor,
    num_classes: int | None = None,
    norm: str = "l2",
    *,
    batch_size: int = 128,
) -> torch.Tensor:
    """Expected gradient length of every input, float64 [N] on the CPU.

    ``EGL(x) = sum_y p(y|x) ||grad_theta CE(f(x), y)||`` over all trainable parameters, with
    ``p = softmax(f(x))`` detached and the model in eval mode (parameters, buffers, modes and
    ``.grad`` are left as they were).

    Parameters
    ----------
    model : a classifier returning logits [n, C] (or a tuple / dict holding them).
    inputs : [N, ...]; moved to the model's device (and dtype, if floating point).
    num_classes : C, checked against the logits when given.
    norm : "l2" (global L2 norm, the classic definition) or "tensor-sum".
    batch_size : about this many (input, label) rows per engine call: max(1, batch_size // C)
        inputs at a time.
    """
    _check_egl_norm(norm)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    if num_classes is not None and num_classes < 1:
        raise ConfigError(f"num_classes must be at least 1, got {num_classes}")
    if len(inputs) == 0:
        return torch.zeros(0, dtype=torch.float64)
    device, dtype = _device_dtype(model)
    n_classes = num_classes
    if n_classes is None:
        # C sets the batch size: read it off one sample's logits (shape checked per batch)
        with torch.no_grad(), eval_mode(model):
            n_classes = first_output(model(_to(inputs[:1], device, dtype))).shape[-1]
    per_call = max(1, batch_size // n_classes)
    out = [
        _egl_batch(
            model, _to(inputs[start : start + per_call], device, dtype), num_classes, norm
        ).cpu()
        for start in range(0, len(inputs), per_call)
    ]
    return torch.cat(out)


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        return p.device, p.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def _to(x: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return x.to(device, dtype=dtype if x.is_floating_point() else None)


@STRATEGIES.register("egl")
class EGLStrategy(ScoringStrategy):
    """Top-K candidates by :func:`expected_gradient_lengths`."""

    nonnegative_scores = True  # norms, entropies, disagreements
    per_candidate = True
    dense_reason = (
        "the expected gradient length sums a gradient norm over every possible label, and a "
        "segmentation label is a whole mask (C ** pixels of them): intractable; use "
        "entropy-gradnorm"
    )

    def __init__(self, norm: Annotated[str, OneOf(EGL_NORMS)] = "l2") -> None:
        self.norm = norm

    def score_granule(self, ctx: SelectionContext) -> int:
        return max(1, ctx.batch_size // ctx.num_classes)

    def score(self, ctx: SelectionContext) -> np.ndarray:
        per_call = self.score_granule(ctx)
        _, dtype = _device_dtype(ctx.model)
        batches = iter_batches(ctx.pool, per_call, ctx.candidates)
        if ctx.progress:
            total = -(-len(ctx.candidates) // per_call)
            batches = tqdm(batches, desc="egl", total=total, leave=False, unit="batch")
        scores = []
        for x, _ in batches:
            x = _to(x, ctx.device, dtype)
            scores.append(_egl_batch(ctx.model, x, ctx.num_classes, self.norm).cpu())
        return torch.cat(scores).numpy()
