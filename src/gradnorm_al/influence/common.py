"""What the influence modules share: the layout of a parameter vector, its arithmetic, the
argument checks and the labelled batches that losses and curvature products are computed over.

A "parameter vector" is a list of tensors shaped like the values of :func:`trainable_params`, in
that order.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..data.batching import iter_batches
from ..errors import ConfigError

Vector = list[torch.Tensor]
Indices = Sequence[int] | np.ndarray | None


def trainable_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's trainable parameters (``requires_grad``) by name, in ``named_parameters()``
    order: the layout of every parameter vector in this package. Raises ConfigError if none."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ConfigError(
            f"{type(model).__name__} has no trainable parameters; influence needs at least one "
            "parameter with requires_grad=True"
        )
    return params


def zeros(params: list[torch.Tensor]) -> Vector:
    return [torch.zeros_like(p, memory_format=torch.contiguous_format) for p in params]


def accumulate(total: Vector, grads: Sequence[torch.Tensor | None]) -> None:
    """total += grads in place; None is a parameter the loss does not reach (adds nothing)."""
    for acc, g in zip(total, grads):
        if g is not None:
            acc.add_(g)


@contextlib.contextmanager
def quiet_jvp() -> Iterator[None]:
    """torch's first forward-AD call scripts its JVP decompositions and warns that
    torch.jit.script is deprecated: torch's own business, nothing a caller can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
        yield


def per_sample_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per sample [N]; dense outputs [N, C, ...] average over their positions."""
    loss = F.cross_entropy(logits, targets, reduction="none")
    return loss.flatten(1).mean(dim=1) if loss.dim() > 1 else loss


def dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """Inner product of two vectors in float64 (one host synchronisation)."""
    device = a[0].device
    parts = [
        torch.dot(x.flatten().to(torch.float64), y.flatten().to(torch.float64)).to(device)
        for x, y in zip(a, b)
    ]
    return float(torch.stack(parts).sum())


def as_vector(v: Sequence[torch.Tensor], params: list[torch.Tensor], what: str) -> Vector:
    """``v`` as a detached parameter vector in the parameters' dtypes and devices."""
    if isinstance(v, torch.Tensor) or len(v) != len(params):
        given = "a single tensor" if isinstance(v, torch.Tensor) else f"{len(v)} tensors"
        raise ConfigError(
            f"{what} must be a list of {len(params)} tensors shaped like trainable_params(model), "
            f"got {given}"
        )
    out = []
    for i, (t, p) in enumerate(zip(v, params)):
        if t.shape != p.shape:
            raise ConfigError(
                f"{what}[{i}] has shape {tuple(t.shape)} but parameter {i} has "
                f"{tuple(p.shape)}; pass tensors shaped like trainable_params(model)"
            )
        out.append(t.detach().to(device=p.device, dtype=p.dtype))
    return out


def sample_count(dataset: Dataset, indices: Indices) -> int:
    n = len(dataset) if indices is None else len(indices)  # type: ignore[arg-type]
    if n == 0:
        raise ConfigError("no samples to average the loss over; pass a non-empty set of indices")
    return n


def check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")


def check_device(params: list[torch.Tensor], device: torch.device | str | None) -> None:
    """Check that a requested device is the one the parameters are on."""
    if device is None:
        return
    want, have = torch.device(device), params[0].device
    if want.type != have.type or (want.index is not None and want.index != have.index):
        raise ConfigError(
            f"device {want} differs from the model's device {have}; move the model there first "
            "or leave device unset"
        )


def to_model(x: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    return x.to(param.device, dtype=param.dtype if x.is_floating_point() else None)


def labelled_batches(
    model: nn.Module,
    dataset: Dataset,
    indices: Indices,
    batch_size: int,
    device: torch.device | str | None,
):
    """(inputs, labels) batches on the parameters' device and dtype; labels are required."""
    check_batch_size(batch_size)
    param = next(p for p in model.parameters() if p.requires_grad)
    check_device([param], device)
    for x, y in iter_batches(dataset, batch_size, indices):
        if y is None:
            raise ConfigError(
                "the dataset has no labels, but the cross-entropy needs them; pass a dataset of "
                "(input, label) pairs"
            )
        yield to_model(x, param), y.to(param.device)
