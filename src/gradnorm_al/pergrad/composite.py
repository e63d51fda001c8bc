"""Composite rules: per-sample squared norms for modules whose parameters are read by operations
inside their own forward that are not calls of a submodule (``nn.MultiheadAttention`` reads its
``out_proj`` weight through ``F.multi_head_attention_forward``; a vision transformer broadcasts
a positional table and a class token over the batch).

A plain rule (:mod:`.layers`) sees one module's input and output gradient. A composite instead
re-implements the module's forward, returning the same values as the stock forward (up to float
rounding), and while doing so taps the intermediate tensors whose gradients give its parameters'
per-sample gradients. During a chunk the engine replaces the module's forward at instance level by
``composite.forward(module, ctx, *args, **kwargs)``; the probe forward and any other call use the
stock forward. Through ``ctx`` (see :class:`CompositeContext`) the composite

* taps a tensor: ``ctx.on_grad(t, fn)``; ``fn(grad)`` runs in the engine's backward with the
  gradient of the summed loss w.r.t. ``t`` (detached, float64 for float64 models, float32
  otherwise) and adds float64 [N] per-sample squared norms with ``ctx.add(name, sq)``; several
  contributions to one parameter add up (they must be disjoint parts of its gradient, e.g. the
  row blocks of a packed projection). The engine makes the backward reach every tap: a tensor
  computed from parameters only (a table broadcast over the batch) or from inputs that do not
  require grad (a first module) is differentiated against directly;
* keeps what a tap's ``fn`` reads: ``ctx.keep(t)`` returns ``t`` detached (in the compute dtype);
  an in-place change of it before the backward sends the chunk to the exact whole-model path;
* declares its layout: ``ctx.batch(t, dim)`` for each batched input and output tensor (``dim``
  holds ``per_sample`` x the batch); the engine checks it against the shapes of two batch sizes
  and falls back to the whole-model path where they disagree; an undeclared tensor leaf must not
  depend on the batch size;
* refuses: ``ctx.fallback(why)`` (an unbatched input, a training-mode dropout, ...): the chunk
  goes to the exact whole-model path with one :class:`~.engine.FallbackWarning`.

A tap that never fires (its tensor does not reach the loss) contributed a zero gradient. The
engine's guards stay: every parameter the composite claims (``Composite.parameters``) must be read
only by graph nodes made during the module's forward (autograd sequence numbers), the module must
run once per forward, and a claimed parameter that the loss reaches must receive a contribution.

Composites register themselves with :func:`register`, by a matcher that returns the composite for
a module (or None); :func:`composite_for` asks them in order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NoReturn, Protocol

import torch
from torch import nn


class CompositeContext(Protocol):
    """What a composite's forward may ask of the engine (see the module docstring)."""

    def on_grad(self, tensor: torch.Tensor, fn: Callable[[torch.Tensor], None]) -> None: ...

    def add(self, name: str, squared: torch.Tensor) -> None: ...

    def wants(self, name: str) -> bool: ...

    def keep(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def batch(self, tensor: torch.Tensor | None, dim: int, per_sample: int = 1) -> None: ...

    def fallback(self, why: str) -> NoReturn: ...


class Composite:
    """Base class of composite rules (see the module docstring)."""

    def parameters(self, module: nn.Module) -> dict[str, nn.Parameter]:
        """The trainable parameters the composite's forward reads, named relative to ``module``
        (``"out_proj.weight"`` for a child's). Default: all of the module's, children included:
        the children are then not hooked on their own (their forward may never run)."""
        return {n: p for n, p in module.named_parameters() if p.requires_grad}

    def forward(self, module: nn.Module, ctx: CompositeContext, *args, **kwargs):
        raise NotImplementedError


Matcher = Callable[[nn.Module], "Composite | None"]
_MATCHERS: list[Matcher] = []


def register(matcher: Matcher) -> Matcher:
    """Add a matcher (module -> composite or None); usable as a decorator."""
    _MATCHERS.append(matcher)
    return matcher


def composite_for(module: nn.Module) -> Composite | None:
    for matcher in _MATCHERS:
        composite = matcher(module)
        if composite is not None:
            return composite
    return None
