"""The batched per-sample gradient-norm engine: a forward and an input-gradient backward per chunk.

How it works. Forward hooks on every module that owns trainable parameters keep the module's input
and register a hook on its output tensor; one ``autograd.grad`` of ``loss.sum()`` (never w.r.t.
the parameters, so no weight-gradient GEMM runs) delivers each such output's gradient,
and the layer rule in :mod:`.layers` turns (input, output gradient) into per-sample squared norms.
In eval mode samples do not interact, so row n of every output gradient is sample n's alone.

Nothing upstream of the first parameterised modules requires grad: the backward differentiates
against the gradient edges of their outputs (taken when they are made, so that later in-place
changes do not move them), so neither the weight nor the input gradient of a first layer is
computed, and nothing is added to the forward pass. When such a first-layer convolution's output
is read only by an eval-mode BatchNorm, not even the BatchNorm's input gradient is formed: the
convolution's rule takes the BatchNorm's output gradient and its per-channel scale.

Exactness guards. The autograd graph is walked to find every trainable parameter the loss reaches;
each must be owned by a module that ran exactly once and whose rule covered it, and must feed the
graph through exactly one edge. Anything else (tied or shared weights, a module called twice,
parameters used outside their module, BatchNorm without running statistics) makes the chunk fall
back to the exact ``torch.func`` path with one warning. Modules without a rule get an exact
per-module fallback (per-sample vector-Jacobian products of that module via ``torch.func``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.func import functional_call, vjp, vmap

from .common import LossFn, check_norm, eval_mode, first_output, reduce_squared_norms
from .functional import per_sample_grad_norms_functional
from .layers import (
    Rule,
    batchnorm_backward,
    batchnorm_rule,
    conv_rule,
    rule_for,
    squared_norms,
)

#: fraction of the device's free memory one chunk may use when no chunk size is given
MEMORY_FRACTION = 0.25
MAX_AUTO_CHUNK = 1024


class FallbackWarning(UserWarning):
    """The engine used a slower exact fallback for some modules or for the whole model."""


class _NeedsWholeModelFallback(Exception):
    pass


class _FusedBatchNorm(torch.autograd.Function):
    """An eval-mode BatchNorm whose backward hands the engine the per-sample squared norms of the
    module's weight and bias gradients together with the input gradient, from one batch-norm
    backward (the batch folded into the channels), instead of a backward for the input gradient
    and a second pass over the same tensors for the rule. The forward is the module's own
    computation, so the output is bit-identical."""

    @staticmethod
    def forward(ctx, x, weight, bias, module, engine):
        ctx.save_for_backward(x)
        ctx.module, ctx.engine = module, engine
        return F.batch_norm(
            x, module.running_mean, module.running_var, weight, bias, False, 0.0, module.eps
        )

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        grad_in = ctx.engine._batchnorm_backward(ctx.module, x, grad, ctx.needs_input_grad[0])
        return grad_in, None, None, None, None


@dataclass
class _Call:
    """What one hooked module saw in the forward pass."""

    module: nn.Module
    rule: Rule | None
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    versions: tuple = ()
    out_grads: dict[int, torch.Tensor] = field(default_factory=dict)
    n_outputs: int = 0
    result: dict[str, torch.Tensor] | None = None


def _owned(module: nn.Module) -> dict[str, nn.Parameter]:
    # the module's own parameters (what named_parameters(recurse=False) yields, read directly:
    # this runs for every module on every call)
    return {n: p for n, p in module._parameters.items() if p is not None and p.requires_grad}


def _reached_parameters(
    root: torch.autograd.graph.Node | None, watched: dict[tuple, int]
) -> tuple[dict[int, int], set[torch.autograd.graph.Node]]:
    """id(leaf tensor) -> number of graph edges into its AccumulateGrad node, for every leaf that
    requires grad and that the loss reaches; and the set of graph nodes the loss reaches.
    ``watched`` maps (node, output number) keys to 0 and gets the number of reached edges into
    each (how many graph nodes read that output)."""
    edges: dict[int, int] = {}
    seen: set[torch.autograd.graph.Node] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for child, nr in node.next_functions:
            if child is None:
                continue
            if hasattr(child, "variable"):
                key = id(child.variable)
                edges[key] = edges.get(key, 0) + 1
            elif (child, nr) in watched:
                watched[child, nr] += 1
            stack.append(child)
    return edges, seen


class _Engine:
    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        self.model, self.loss_fn = model, loss_fn
        # one walk over the modules (this runs on every call): the trainable parameters in
        # model.named_parameters() order (shared ones once), and each module's own trainable ones
        self.modules: list[nn.Module] = []
        self.names: list[str] = []
        self.params: list[nn.Parameter] = []
        self.hooked: dict[nn.Module, Rule | None] = {}
        self.owned: dict[nn.Module, dict[str, nn.Parameter]] = {}
        owners: dict[int, int] = {}
        for prefix, module in model.named_modules():
            self.modules.append(module)
            owned = _owned(module)
            for name, p in owned.items():
                owners[id(p)] = owners.get(id(p), 0) + 1
                if owners[id(p)] == 1:
                    self.names.append(f"{prefix}.{name}" if prefix else name)
                    self.params.append(p)
            if owned:
                self.hooked[module] = rule_for(module)
                self.owned[module] = owned
        self.column = {id(p): i for i, p in enumerate(self.params)}
        self.tied = any(count > 1 for count in owners.values())
        self.no_running_stats = any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None
            for m in self.hooked
        )
        self.fallback_types = sorted(
            {type(m).__name__ for m, r in self.hooked.items() if r is None}
        )
        # eval-mode BatchNorms whose backward the engine runs itself (see _FusedBatchNorm): their
        # input's gradient edge and their own graph node, per chunk
        self.fusable = [m for m, r in self.hooked.items() if r is batchnorm_rule]
        self.fused: dict[nn.Module, tuple[GradientEdge, torch.autograd.graph.Node]] = {}
        # fused BatchNorms that alone read the output of a first-layer convolution: that
        # convolution's rule runs in the BatchNorm's backward (see _batchnorm_backward)
        self.first_layer: dict[nn.Module, _Call] = {}
        self.active = False
        self.calls: dict[nn.Module, _Call] = {}
        self.reused = False

    # ------------------------------------------------------------------ hooks
    def _forward_hook(self, module, args, kwargs, output):
        if not self.active:
            return None
        if module in self.calls:
            self.reused = True
            return None
        call = _Call(module, self.hooked[module])
        self.calls[module] = call
        tensor_args = tuple(a for a in args if isinstance(a, torch.Tensor))
        call.args, call.kwargs = tuple(args), dict(kwargs)
        call.versions = tuple(a._version for a in tensor_args)
        outputs = (output,) if isinstance(output, torch.Tensor) else output
        if not isinstance(outputs, (tuple, list)):
            raise _NeedsWholeModelFallback(f"{type(module).__name__} returns {type(output)}")
        call.n_outputs = len(outputs)
        if module in self.fused:
            return None  # its backward delivers the result itself
        root = not any(a.requires_grad for a in tensor_args)
        for i, out in enumerate(outputs):
            if not (isinstance(out, torch.Tensor) and out.requires_grad):
                continue
            if root:
                # nothing upstream requires grad: the backward stops at this output's edge and
                # hands its gradient over directly (no hook: the edge is captured, not run)
                self.roots.append((get_gradient_edge(out), call, i))
            else:
                out.register_hook(self._grad_hook(call, i))
        return None

    def _grad_hook(self, call: _Call, index: int) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            self._receive(call, index, grad)

        return hook

    def _receive(self, call: _Call, index: int, grad: torch.Tensor, scale=None) -> None:
        if call.rule is not None:
            # compute at once and drop the gradient: memory stays at one layer's worth
            call.result = self._apply_rule(call, grad, scale)
            call.args, call.kwargs = (), {}  # the input is no longer needed: free it now
        else:
            call.out_grads[index] = grad.detach()

    def _batchnorm_backward(
        self, module: nn.modules.batchnorm._BatchNorm, x, grad, input_grad: bool
    ) -> torch.Tensor | None:
        """The backward of a fused BatchNorm: its per-sample squared norms, and its input gradient
        when needed. When the input is the output of a first-layer convolution read by nothing
        else, that gradient (grad times weight / sqrt(var + eps) per channel) would only feed the
        convolution's rule: the rule gets ``grad`` and the per-channel scale instead, the full
        input gradient is never formed, and None goes back (no gradient flows further)."""
        conv = self.first_layer.get(module)
        grad_in, result = batchnorm_backward(module, x, grad, input_grad and conv is None)
        call = self.calls[module]
        call.result, call.args, call.kwargs = result, (), {}
        if conv is not None:
            # fused BatchNorms own a weight (one without affine parameters is not hooked)
            scale = module.weight * torch.rsqrt(module.running_var + module.eps)
            self._receive(conv, 0, grad, scale=scale.detach())
        return grad_in

    def _fused_forward(self, module: nn.modules.batchnorm._BatchNorm) -> Callable:
        stock = type(module).forward

        def forward(x: torch.Tensor) -> torch.Tensor:
            # only where the input gradient is needed anyway (a first layer keeps the plain path)
            if (
                not self.active
                or module in self.calls
                or module.training
                or not x.requires_grad
                or x.dtype not in (torch.float32, torch.float64)
            ):
                return stock(module, x)
            module._check_input_dim(x)
            out = _FusedBatchNorm.apply(x, module.weight, module.bias, module, self)
            self.fused[module] = (get_gradient_edge(x), out.grad_fn)
            return out

        return forward

    # ------------------------------------------------------------------ per-layer work
    def _check_unmodified(self, call: _Call) -> None:
        tensors = [a for a in call.args if isinstance(a, torch.Tensor)]
        if tuple(a._version for a in tensors) != call.versions:
            raise _NeedsWholeModelFallback(
                f"the input of {type(call.module).__name__} was modified in place after use"
            )

    def _apply_rule(self, call: _Call, grad: torch.Tensor, scale=None) -> dict[str, torch.Tensor]:
        self._check_unmodified(call)
        a = call.args[0]
        compute = torch.float64 if grad.dtype == torch.float64 else torch.float32
        if a.is_floating_point():
            a = a.detach().to(compute)
        if scale is not None:  # only conv_rule takes one (see _batchnorm_backward)
            return call.rule(call.module, a, grad.detach().to(compute), scale=scale.to(compute))
        return call.rule(call.module, a, grad.detach().to(compute))

    def _apply_fallback(self, call: _Call) -> dict[str, torch.Tensor]:
        """Exact per-sample gradients of one module's own parameters: vmap over samples of the
        vector-Jacobian product of the module (its children run with their current weights)."""
        self._check_unmodified(call)
        module, owned = call.module, self.owned[call.module]
        if not call.out_grads:
            return {}
        args = [a.detach() if isinstance(a, torch.Tensor) else a for a in call.args]
        batched = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        params = {n: p.detach() for n, p in owned.items()}

        def one(sample_args, cotangents):
            full = list(args)
            for i, value in zip(batched, sample_args):
                full[i] = value.unsqueeze(0)

            def f(p):
                out = functional_call(module, p, tuple(full), call.kwargs, strict=False)
                outs = (out,) if isinstance(out, torch.Tensor) else tuple(out)
                return tuple(outs[i] for i in sorted(call.out_grads))

            _, pullback = vjp(f, params)
            (grads,) = pullback(tuple(c.unsqueeze(0) for c in cotangents))
            return grads

        cotangents = tuple(call.out_grads[i] for i in sorted(call.out_grads))
        self.active = False  # children's hooks must not record the re-run
        grads = vmap(one)(tuple(args[i] for i in batched), cotangents)
        # children's parameters still require grad, so the results may carry a graph: detach
        return {name: squared_norms(g.detach()) for name, g in grads.items()}

    # ------------------------------------------------------------------ one chunk
    def chunk(self, x: torch.Tensor) -> torch.Tensor:
        """float64 [n, T] per-tensor squared norms for the samples of ``x``."""
        if self.tied or self.no_running_stats:
            raise _NeedsWholeModelFallback(
                "tied parameters" if self.tied else "BatchNorm without running statistics"
            )
        self.calls, self.roots, self.reused = {}, [], False
        self.fused, self.first_layer = {}, {}
        handles = [
            m.register_forward_hook(self._forward_hook, with_kwargs=True) for m in self.hooked
        ]
        try:
            for module in self.fusable:
                module.forward = self._fused_forward(module)
            self.active = True
            # the input itself does not require grad: the backward ends at the output edges of
            # the first modules, so no gradient w.r.t. the raw input is ever computed
            loss = self.loss_fn(first_output(self.model(x.detach())))
            if loss.shape != (x.shape[0],):
                raise ValueError(
                    f"loss_fn must return one loss per sample [{x.shape[0]}], "
                    f"got shape {tuple(loss.shape)}"
                )
            if self.reused:
                raise _NeedsWholeModelFallback("a module is called more than once per forward")
            readers = {(edge.node, edge.output_nr): 0 for edge, _, _ in self.roots}
            edges, nodes = _reached_parameters(loss.grad_fn, readers)
            roots = [r for r in self.roots if r[0].node in nodes]
            for bn, (edge, node) in self.fused.items():
                for root_edge, call, _ in roots:
                    if (
                        call.rule is conv_rule
                        and (edge.node, edge.output_nr) == (root_edge.node, root_edge.output_nr)
                        and readers[edge.node, edge.output_nr] == 1
                        and node in nodes
                    ):
                        self.first_layer[bn] = call
            if roots:
                grads = torch.autograd.grad(loss.sum(), [r[0] for r in roots], allow_unused=True)
                for (_, call, index), grad in zip(roots, grads):
                    if grad is not None:
                        self._receive(call, index, grad)
            self.active = False
            columns: dict[int, torch.Tensor] = {}
            for module, call in self.calls.items():
                result = call.result if call.rule is not None else self._apply_fallback(call)
                for name, p in self.owned[module].items():
                    if id(p) not in edges:
                        continue
                    if call.rule is not None and edges[id(p)] != 1:
                        raise _NeedsWholeModelFallback(
                            f"a parameter of {type(module).__name__} is also used outside it"
                        )
                    if result is None or name not in result:
                        raise _NeedsWholeModelFallback(
                            f"no gradient reached the output of {type(module).__name__}"
                        )
                    columns[self.column[id(p)]] = result[name]
            missing = [
                n
                for i, (n, p) in enumerate(zip(self.names, self.params))
                if id(p) in edges and i not in columns
            ]
            if missing:
                raise _NeedsWholeModelFallback(f"parameters used outside their module: {missing}")
            zeros = None
            if len(columns) < len(self.params):
                zeros = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
            return torch.stack([columns.get(i, zeros) for i in range(len(self.params))], dim=1)
        finally:
            self.active = False
            for h in handles:
                h.remove()
            for module in self.fusable:
                vars(module).pop("forward", None)
            self.calls, self.fused, self.first_layer = {}, {}, {}


def _auto_chunk(x: torch.Tensor, n_params: int) -> int:
    """Samples per chunk from the device's free memory and a rough per-sample footprint."""
    if x.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(x.device)
    else:
        try:
            import os

            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            free = 2 * 2**30
    # activations and their gradients are a few hundred times the input for common CNNs;
    # materialised per-sample gradients of the largest layers are bounded by the parameter count
    per_sample = max(1, x[0].numel()) * x.element_size() * 400 + n_params * 4
    return int(max(1, min(MAX_AUTO_CHUNK, MEMORY_FRACTION * free // per_sample)))


def per_sample_grad_norms(
    model: nn.Module,
    inputs: torch.Tensor,
    loss_fn: LossFn,
    norm: str = "tensor-sum",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Norm of each sample's loss gradient w.r.t. the model's trainable parameters.

    Parameters
    ----------
    model : evaluated in eval mode (BatchNorm uses running statistics); its parameters, buffers,
        modes and ``.grad`` are left as they were, hooks are removed even on errors.
    inputs : [N, ...] on the model's device.
    loss_fn : maps the model output's logits [n, ...] to a per-sample loss [n].
    norm : "tensor-sum" (sum over parameter tensors of their L2 norms) | "l2" (global L2 norm)
        -> float64 [N]; "per-tensor" -> float64 [N, T], one column per trainable parameter tensor
        in ``model.named_parameters()`` order (parameters the loss does not reach: 0).
    chunk_size : samples per forward/backward; memory is bounded by it. Default: picked from the
        free memory of the device.
    """
    check_norm(norm)
    engine = _Engine(model, loss_fn)
    n = inputs.shape[0]
    if n == 0:
        empty = torch.zeros(0, len(engine.params), dtype=torch.float64, device=inputs.device)
        return reduce_squared_norms(empty, norm)
    if chunk_size is None:
        chunk_size = _auto_chunk(inputs, sum(p.numel() for p in engine.params))
    if engine.fallback_types:
        warnings.warn(
            "per-sample gradient norms: no batched rule for "
            f"{', '.join(engine.fallback_types)}; using the exact torch.func fallback for them",
            FallbackWarning,
            stacklevel=2,
        )
    rows = []
    with eval_mode(model, engine.modules):
        for start in range(0, n, chunk_size):
            x = inputs[start : start + chunk_size]
            try:
                rows.append(engine.chunk(x))
            except _NeedsWholeModelFallback as why:
                warnings.warn(
                    f"per-sample gradient norms: {why}; using the exact torch.func path for the "
                    "whole model",
                    FallbackWarning,
                    stacklevel=2,
                )
                rows.append(
                    per_sample_grad_norms_functional(model, x, loss_fn, norm="per-tensor").pow(2)
                )
    return reduce_squared_norms(rows[0] if len(rows) == 1 else torch.cat(rows), norm)
