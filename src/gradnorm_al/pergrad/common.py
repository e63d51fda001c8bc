"""Helpers shared by the per-sample gradient-norm implementations."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .._torch import eval_mode, first_output
from ..errors import ConfigError

__all__ = ["NORMS", "LossFn", "check_norm", "eval_mode", "first_output", "reduce_squared_norms"]

#: "tensor-sum": sum over parameter tensors of each tensor's L2 norm (the published code);
#: "l2": the global L2 norm over all parameters (Eq. 5 of the paper);
#: "per-tensor": one L2 norm per parameter tensor, [N, n_tensors].
NORMS = ("tensor-sum", "l2", "per-tensor")

LossFn = Callable[[torch.Tensor], torch.Tensor]


def check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ConfigError(f"unknown norm {norm!r}; use one of {', '.join(NORMS)}")


def reduce_squared_norms(squared: torch.Tensor, norm: str) -> torch.Tensor:
    """Reduce per-tensor squared norms [N, T] (float64) to the requested norm.

    Squares are summed before the root so that nothing is lost to float32 ``torch.norm`` rounding.
    """
    if norm == "tensor-sum":
        return squared.sqrt().sum(dim=1)
    if norm == "l2":
        return squared.sum(dim=1).sqrt()
    if norm == "per-tensor":
        return squared.sqrt()
    check_norm(norm)
    raise AssertionError("unreachable")
