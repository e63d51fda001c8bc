"""Helpers the strategies share: batched inference over pool rows, probabilities, features."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._torch import eval_mode, first_output, model_dtype, seeded_torch
from ..data.batching import iter_batches
from ..errors import ConfigError, NonFiniteError
from .base import SelectionContext


@torch.no_grad()
def map_batches(
    ctx: SelectionContext,
    indices: np.ndarray,
    fn: Callable[[torch.Tensor], torch.Tensor],
    *,
    model: nn.Module | None = None,
) -> torch.Tensor:
    """``fn(x)`` over the pool rows ``indices`` in batches of ``ctx.batch_size``, model (the
    context's by default) in eval mode; results concatenated on the CPU in the order of
    ``indices``. A NaN or infinite result raises :class:`~gradnorm_al.errors.NonFiniteError`:
    nothing downstream ranks or clusters such values silently."""
    model = ctx.model if model is None else model
    dtype = model_dtype(model)
    out = []
    with eval_mode(model):
        for x, _ in iter_batches(ctx.pool, ctx.batch_size, np.asarray(indices, dtype=np.int64)):
            x = x.to(ctx.device, dtype=dtype if x.is_floating_point() else None)
            out.append(fn(x).cpu())
    if not out:
        raise ValueError("no samples to run the model on")
    result = torch.cat(out)
    if result.is_floating_point():
        bad = ~torch.isfinite(result.reshape(len(result), -1)).all(dim=1)
        if bad.any():
            raise NonFiniteError(
                f"the model's outputs for {int(bad.sum())} of {len(result)} samples are not "
                "finite (NaN or infinite): the model diverged or the data holds such values"
            )
    return result


def probabilities(
    ctx: SelectionContext, indices: np.ndarray | None = None, model: nn.Module | None = None
) -> torch.Tensor:
    """float64 [n, C] softmax probabilities of the pool rows ``indices`` (default: the
    candidates), eval mode."""
    model = ctx.model if model is None else model
    idx = ctx.candidates if indices is None else indices
    logits = map_batches(ctx, idx, lambda x: first_output(model(x)), model=model)
    return F.softmax(logits.double(), dim=1)


def features(
    ctx: SelectionContext, indices: np.ndarray, model: nn.Module | None = None
) -> torch.Tensor:
    """[n, d] penultimate-layer features ``model.embed(x)`` of the pool rows ``indices``."""
    model = ctx.model if model is None else model
    embed = getattr(model, "embed", None)
    if not callable(embed):
        raise ConfigError(
            f"this strategy needs penultimate-layer features, but {type(model).__name__} has no "
            "embed(x) method; give the model one (see gradnorm_al.models.TaskModel)"
        )
    return map_batches(ctx, indices, lambda x: embed(x).flatten(1), model=model)


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of each row of probabilities [n, C] -> [n]; 0 log 0 = 0."""
    return -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(dim=1)


__all__ = ["entropy", "features", "map_batches", "model_dtype", "probabilities", "seeded_torch"]
