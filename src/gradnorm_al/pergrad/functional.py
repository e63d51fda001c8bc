"""Per-sample gradient norms with ``torch.func`` (vmap over grad): the engine's exact fallback.

Exact for any model whose samples do not interact in eval mode. It materialises the per-sample
gradients of one chunk at a time, so memory is bounded by ``chunk_size`` x number of parameters.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from .common import LossFn, check_norm, eval_mode, first_output, reduce_squared_norms

#: bytes of per-sample gradients one chunk may hold when no chunk size is given
DEFAULT_CHUNK_BYTES = 512 * 2**20


def per_sample_grad_norms_functional(
    model: nn.Module,
    inputs: torch.Tensor,
    loss_fn: LossFn,
    norm: str = "tensor-sum",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Same contract as :func:`gradnorm_al.pergrad.engine.per_sample_grad_norms` (float64 [N], or
    [N, T] for "per-tensor"); ``chunk_size`` defaults to ~512 MiB of per-sample gradients.
    """
    check_norm(norm)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in named}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = {n: b for n, b in model.named_buffers()}
    n_samples = inputs.shape[0]
    if n_samples == 0:
        width = (0, len(named)) if norm == "per-tensor" else (0,)
        return torch.zeros(width, dtype=torch.float64, device=inputs.device)
    if chunk_size is None:
        numel = sum(p.numel() for p in params.values()) or 1
        per_sample = numel * inputs.element_size() * 2  # gradients + float64 squares headroom
        chunk_size = max(1, min(n_samples, DEFAULT_CHUNK_BYTES // per_sample))

    def sample_loss(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, ({**p, **frozen}, buffers), (x.unsqueeze(0),))
        return loss_fn(first_output(out)).sum()

    per_sample_grads = vmap(grad(sample_loss), in_dims=(None, 0))
    chunks = []
    with eval_mode(model):
        for start in range(0, n_samples, chunk_size):
            grads = per_sample_grads(params, inputs[start : start + chunk_size])
            chunks.append(
                torch.stack(
                    [g.flatten(1).to(torch.float64).pow(2).sum(dim=1) for g in grads.values()],
                    dim=1,
                )
            )
    return reduce_squared_norms(torch.cat(chunks), norm)
