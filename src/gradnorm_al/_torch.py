"""Small torch helpers shared by pergrad, train, strategies and analyses (the bottom layer).

Nothing here knows about active learning: model modes, model outputs, where a model lives, and
seeded random streams that leave the caller's stream as it was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .errors import ConfigError


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


@contextlib.contextmanager
def eval_mode(model: nn.Module, modules: list[nn.Module] | None = None) -> Iterator[nn.Module]:
    """Put every submodule in eval mode and restore each one's own mode afterwards.

    Meanwhile the model's recurrent layers (``nn.RNNBase``) run without cuDNN: cuDNN's RNN
    backward refuses eval mode ("cudnn RNN backward can only be called in training mode"), and
    every caller of this back-propagates in eval mode. CUDA's own kernels compute the same
    function; cuDNN stays on for every other layer.
    """
    modes = [(m, m.training) for m in (model.modules() if modules is None else modules)]
    hooks = [
        hook
        for m in model.modules()
        if isinstance(m, nn.RNNBase)
        for hook in (
            m.register_forward_pre_hook(_cudnn_off),
            m.register_forward_hook(_cudnn_back, always_call=True),
        )
    ]
    try:
        if not any(mode for _, mode in modes):  # already in eval mode: nothing to change
            yield model
            return
        model.eval()
        try:
            yield model
        finally:
            for m, mode in modes:
                m.training = mode
    finally:
        for hook in hooks:
            hook.remove()


#: cuDNN's flag before each recurrent forward that ``eval_mode`` switched it off for
_CUDNN_BEFORE: list[bool] = []


def _cudnn_off(module: nn.Module, args: object) -> None:
    _CUDNN_BEFORE.append(torch.backends.cudnn.enabled)
    torch.backends.cudnn.enabled = False


def _cudnn_back(module: nn.Module, args: object, output: object) -> None:
    if _CUDNN_BEFORE:
        torch.backends.cudnn.enabled = _CUDNN_BEFORE.pop()


#: the mixed-precision modes of training and scoring: none (the model's dtype) or bfloat16 autocast
AMP_MODES = ("none", "bf16")


def autocast(device: torch.device | str, amp: str) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on ``device`` for ``amp="bf16"`` (CUDA, and the CPU); nothing for
    ``"none"``."""
    if amp == "none":
        return contextlib.nullcontext()
    if amp != "bf16":
        raise ConfigError(f"unknown amp mode {amp!r}; use one of {', '.join(AMP_MODES)}")
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of the model's first parameter (CPU and the default dtype if it has
    none)."""
    for p in model.parameters():
        return p.device, p.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def model_dtype(model: nn.Module) -> torch.dtype:
    return model_device_dtype(model)[1]


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the module's state (``state_dict`` alone would alias the live tensors)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@contextlib.contextmanager
def seeded_torch(device: torch.device | str, seed: int) -> Iterator[None]:
    """Seed torch's generators for CPU and ``device`` with ``seed`` for the body and restore their
    previous states afterwards (the caller's random stream is left as it was)."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        with torch.random.fork_rng(devices=[index]):
            torch.default_generator.manual_seed(seed)
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
            yield
    elif device.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            yield
    else:
        with torch.random.fork_rng(device_type=device.type):
            torch.manual_seed(seed)
            yield


@contextlib.contextmanager
def seeded_cpu(seed: int) -> Iterator[None]:
    """``torch.manual_seed(seed)`` for the body on a forked CPU stream (CUDA streams untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
