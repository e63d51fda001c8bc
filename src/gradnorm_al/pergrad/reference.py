"""The slow, obviously-correct reference: one backward pass per sample."""

from __future__ import annotations

import torch
from torch import nn

from .common import LossFn, check_norm, eval_mode, first_output, reduce_squared_norms


def per_sample_grad_norms_loop(
    model: nn.Module, inputs: torch.Tensor, loss_fn: LossFn, norm: str = "tensor-sum"
) -> torch.Tensor:
    """Per-sample gradient norms by back-propagating each sample alone (batch of one).

    Parameters the loss does not reach contribute nothing. Returns float64 [N] (or [N, T] for
    ``norm="per-tensor"``, T = number of trainable parameter tensors). ``.grad`` is not touched.
    """
    check_norm(norm)
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    with eval_mode(model):
        for x in inputs:
            loss = loss_fn(first_output(model(x.unsqueeze(0)))).sum()
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            rows.append(
                torch.stack(
                    [
                        torch.zeros((), dtype=torch.float64, device=x.device)
                        if g is None
                        else g.to(torch.float64).pow(2).sum()
                        for g in grads
                    ]
                )
            )
    squared = torch.stack(rows) if rows else torch.zeros(0, len(params), dtype=torch.float64)
    return reduce_squared_norms(squared, norm)
