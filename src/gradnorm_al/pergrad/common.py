"""Helpers shared by the per-sample gradient-norm implementations."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from ..errors import ConfigError

#: "tensor-sum": sum over parameter tensors of each tensor's L2 norm (the published code);
#: "l2": the global L2 norm over all parameters (Eq. 5 of the paper);
#: "per-tensor": one L2 norm per parameter tensor, [N, n_tensors].
NORMS = ("tensor-sum", "l2", "per-tensor")

LossFn = Callable[[torch.Tensor], torch.Tensor]


def check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ConfigError(f"unknown norm {norm!r}; use one of {', '.join(NORMS)}")


def first_output(out: object) -> torch.Tensor:
    """The logits of a model output: the tensor itself, the first item of a tuple or list, or the
    ``"logits"`` / ``"out"`` entry of a dict (torchvision segmentation
    models return ``{"out": ...}``)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out:
        return first_output(out[0])
    if isinstance(out, dict):
        for key in ("logits", "out"):
            if key in out:
                return first_output(out[key])
    raise ConfigError(
        f"cannot find logits in a model output of type {type(out).__name__}; return a tensor, a "
        "tuple whose first item is the logits, or a dict with a 'logits' or 'out' entry"
    )


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


@contextlib.contextmanager
def eval_mode(model: nn.Module, modules: list[nn.Module] | None = None) -> Iterator[nn.Module]:
    """Put every submodule in eval mode and restore each one's own mode afterwards."""
    modes = [(m, m.training) for m in (model.modules() if modules is None else modules)]
    if not any(mode for _, mode in modes):  # already in eval mode: nothing to change
        yield model
        return
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode
