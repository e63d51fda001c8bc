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

Where the batch is. A rule takes row n of its module's input and output for sample n, which holds
only where dim 0 of both is the batch. Shapes at one batch size cannot tell: a positional table
``pos[:L]`` broadcast over the batch, or an ``nn.Embedding`` of ``arange(L)``, has L rows, and
with N == L it looks batched (a naive rule is then silently wrong). So every hooked module's
input and output leaves are compared at two batch sizes: the chunk's N and a second size m (an
earlier chunk of this call, else one no-grad probe forward of the chunk's first sample, before
the chunk's forward; two samples if one is inconclusive, e.g. for a model that squeezes). The one
dimension that is N there and m here holds the batch; a leaf whose shapes are equal holds none,
whatever N is, so a coincidence N == L cannot hide it. An output without the batch sends the chunk
to the whole-model path; a rule whose module has the batch in another dimension (a
sequence-first layout) gives way to the per-module fallback, which slices each input and output
leaf along its own batch dimension. With N == 1 the sample's gradient is the batch gradient and
nothing needs splitting. The probe costs about one forward of one sample per call (~1% of a
smallcnn chunk of 64 on the CPU). Not covered: a model whose output for a sample depends on the
sample's position in the batch, or that mixes samples in eval mode (no per-sample gradient is
defined then; the reference is one backward per sample).

Composite rules (:mod:`.composite`). Some modules read their parameters through operations of
their own forward rather than through children's forwards: ``nn.MultiheadAttention`` (its
``out_proj`` weight goes to ``F.multi_head_attention_forward``), torchvision's vision transformer
(a positional table and a class token broadcast over the batch). During a chunk such a module's
forward is replaced, at instance level, by its composite's re-implementation, which returns the
stock forward's values and taps intermediate tensors (projection outputs, the broadcast views of
the tables); the gradient of each tap goes through the layer rules (the linear rule for the
attention projections, with T = sequence length) and the contributions to a parameter add up. A
tap the backward would not reach (computed from parameters only, or from inputs that do not
require grad) is differentiated against directly, like the first modules' outputs. The composite
declares where the batch is in its inputs and outputs; the two-batch-size shape check must agree,
else the whole model falls back. Covered: ``nn.MultiheadAttention`` (packed or separate
projections, biases, ``add_bias_kv``, ``add_zero_attn``, every mask, ``need_weights``,
``is_causal``, ``batch_first`` either way), hence ``nn.TransformerEncoderLayer`` /
``nn.TransformerEncoder`` (the fused inference paths are never taken: the chunk runs with grad,
the probe with the fast path off), and torchvision's ``VisionTransformer`` and its ``Encoder``.
Position-wise rules (Linear, LayerNorm, Embedding) take the batch from whatever leading dimension
holds it (a sequence-first [L, N, E] layout), moved to the front.

Recurrent layers (:mod:`.recurrent`). ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` (tanh or relu; any
number of layers, either direction, ``batch_first`` or not, with or without bias, an initial
state given or not, which may itself depend on the input) have a composite whose forward is the
same computation, one layer and direction at a time, keeping what the backward needs, inside an
autograd function whose backward runs back-propagation through time in a short Python loop over
the steps and adds every parameter's per-sample squared norms (from the gate pre-activation
gradients: Gram identity or materialised, as for a Linear over the steps) while the input and
initial-state gradients flow on; no parameter gradient is formed. The batch is where
``batch_first`` says (dim 1 of the states). Where nothing upstream requires grad, a tap on a
tensor made for the purpose and passed to that function makes the backward run it. LSTMs with
``proj_size > 0`` keep the per-module fallback below; unbatched inputs and dtypes other than
float32 / float64 the whole-model one, as a PackedSequence.

Exactness guards. The autograd graph is walked to find every trainable parameter the loss reaches;
each must be owned by a module that ran exactly once and whose rule covered it, and must feed the
graph through exactly one edge; a parameter of a module without a rule, or of a composite
rule, must be read only by graph nodes its module's forward made (autograd sequence numbers,
taken in a pre-hook and the forward hook of such modules only, bracket that forward). A
composite's tap that the loss reaches but that did not run sends the chunk to the whole-model
path too (never counted as zero). Anything else (tied or shared weights, a module
called twice, parameters used outside their module, BatchNorm without running statistics, an output
without the batch, a PackedSequence, a composite whose layout or input it does not support, e.g.
an unbatched attention call) makes the chunk fall back to an exact whole-model path with
one warning: ``torch.func``, or one plain backward pass per sample where torch.func cannot run the
model (recurrent layers). Modules without a rule get an exact per-module fallback: per-sample
vector-Jacobian products of that module via ``torch.func`` (vmap), or, for the recurrent layers
without a batched rule (their kernels do not run under vmap) and wherever vmap fails, one
autograd backward of the module per sample. Every fallback emits
:class:`FallbackWarning`; no path returns a number that is not exact.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NoReturn

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.func import functional_call, vjp, vmap
from torch.nn.utils.rnn import PackedSequence
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from . import attention, recurrent  # noqa: F401  (register the attention and recurrent composites)
from .common import LossFn, check_norm, eval_mode, first_output, reduce_squared_norms
from .composite import Composite
from .functional import per_sample_grad_norms_functional
from .layers import (
    Rule,
    batchnorm_backward,
    batchnorm_rule,
    conv_rule,
    embedding_rule,
    layernorm_rule,
    linear_rule,
    rule_for,
    squared_norms,
)
from .reference import per_sample_grad_norms_loop

#: rules that treat every dimension before the features alike (see _positionwise_dim)
_POSITIONWISE = (linear_rule, layernorm_rule, embedding_rule)

#: fraction of the device's free memory one chunk may use when no chunk size is given
MEMORY_FRACTION = 0.25
MAX_AUTO_CHUNK = 1024


class FallbackWarning(UserWarning):
    """The engine used a slower exact fallback for some modules or for the whole model."""


class _NeedsWholeModelFallback(Exception):
    pass


_Shapes = tuple[tuple, tuple]
_MIXED = "mixed"  # a leaf whose shape depends on the batch size in some other way


def _shapes(leaves: list) -> tuple:
    return tuple(tuple(t.shape) if isinstance(t, torch.Tensor) else None for t in leaves)


def _batch_dim(shape: tuple | None, n: int, other: tuple | None, m: int) -> int | str | None:
    """The dimension of a leaf that holds the batch, from its shapes at two batch sizes n != m:
    the one dimension that is n in the first and m in the second; None when the shapes are equal
    (nothing in it depends on the batch: a positional table, a mask, a non-tensor); _MIXED for
    anything else (a flattened batch, two batch-sized dimensions, a changed rank)."""
    if shape is None or other is None:
        return None if shape is None and other is None else _MIXED
    if len(shape) != len(other):
        return _MIXED
    differ = [d for d, (a, b) in enumerate(zip(shape, other)) if a != b]
    if not differ:
        return None
    if len(differ) == 1 and shape[differ[0]] == n and other[differ[0]] == m:
        return differ[0]
    return _MIXED


def _leaves(tree) -> list:
    return [tree] if isinstance(tree, torch.Tensor) else tree_leaves(tree)


def _narrow(t, dim: int | None, k: int):
    return t if dim is None or not isinstance(t, torch.Tensor) else t.narrow(dim, k, 1)


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
    #: (shapes of the tensor leaves of (args, kwargs), of the output's leaves): None for others
    shapes: _Shapes = ((), ())
    #: output leaves that require grad (flat pytree indices)
    grad_outputs: tuple[int, ...] = ()
    out_grads: dict[int, torch.Tensor] = field(default_factory=dict)
    #: the batch dimension of every input / output leaf (None: not batched, passed whole)
    in_dims: list[int | None] = field(default_factory=list)
    out_dims: list[int | None] = field(default_factory=list)
    result: dict[str, torch.Tensor] | None = None
    skip: bool = False  # none of its parameters reaches the loss
    #: composite rules only: the context its forward filled, and the layout it declared per
    #: input / output leaf ((batch dim, samples per batch entry) or None: not batched)
    ctx: _CompositeContext | None = None
    layout: tuple[list, list] = ([], [])
    #: position-wise rules (see _POSITIONWISE): the dimension of the input and output gradient
    #: that holds the batch (moved to dim 0 for the rule); None: a chunk of one sample in any
    #: layout (a batch dimension of 1 is put in front)
    batch_dim: int | None = 0


def _positionwise_dim(call: _Call, d: int | None) -> bool:
    """Whether a position-wise rule may take the batch from dimension ``d`` of its module's
    input and output (None: a chunk of one sample): Linear, Embedding and LayerNorm treat every
    dimension before their feature (or normalised) dimensions alike, so moving the batch to the
    front changes nothing (a sequence-first layout [L, N, E], as in nn.TransformerEncoderLayer
    with batch_first=False)."""
    ins = call.shapes[0]
    if call.rule not in _POSITIONWISE or not ins or ins[0] is None:
        return False
    features = {linear_rule: 1, embedding_rule: 0}.get(call.rule)
    if features is None:  # layernorm_rule
        features = len(call.module.normalized_shape)
    return d is None or d < len(ins[0]) - features


class _Tap:
    """A composite's gradient tap: hands the gradient of one tensor to its function, once."""

    def __init__(self, ctx: _CompositeContext, fn: Callable[[torch.Tensor], None], node) -> None:
        self.ctx, self.fn, self.node, self.fired = ctx, fn, node, False

    def __call__(self, grad: torch.Tensor) -> None:
        self.ctx.check_kept()
        self.fired = True
        compute = torch.float64 if grad.dtype == torch.float64 else torch.float32
        self.fn(grad.detach().to(compute))


class _CompositeContext:
    """The engine's side of :class:`~.composite.CompositeContext` for one call of a composite
    module in one chunk (see :mod:`.composite` for the contract)."""

    def __init__(self, engine: _Engine, module: nn.Module, start: int) -> None:
        self.engine, self.module = engine, module
        self.claimed = engine.owned[module]
        self.start = start  # autograd sequence number at the start of the module's forward
        self.sums: dict[str, torch.Tensor] = {}
        self.kept: list[tuple[torch.Tensor, int]] = []
        self.layout: dict[int, tuple[int, int]] = {}

    # the API composites use
    def on_grad(self, tensor: torch.Tensor, fn: Callable[[torch.Tensor], None]) -> None:
        if not (isinstance(tensor, torch.Tensor) and tensor.requires_grad):
            return  # nothing trainable behind it: no contribution
        node = tensor.grad_fn
        if node is None:  # a parameter itself: its gradient is the batch's, not a sample's
            self.fallback("taps a leaf tensor")
        tap = _Tap(self, fn, node)
        engine = self.engine
        if self._reached(node):
            # the backward runs this tensor's node anyway (something it reads leads to a
            # module output or tap the engine differentiates against): a hook, freed at once
            tensor.register_hook(tap)
            engine.hooked_taps.append(tap)
        else:
            # computed from parameters only (a table broadcast over the batch) or from inputs
            # that do not require grad (a first module): the backward would stop short of it,
            # so it is differentiated against directly
            engine.targets.append((get_gradient_edge(tensor), tap))
        engine.reaching.add(node)

    def add(self, name: str, squared: torch.Tensor) -> None:
        if name not in self.claimed:
            if name not in dict(self.module.named_parameters()):
                raise KeyError(f"{type(self.module).__name__} has no parameter {name!r}")
            return  # frozen
        self.sums[name] = squared if name not in self.sums else self.sums[name] + squared

    def wants(self, name: str) -> bool:
        return name in self.claimed

    def keep(self, tensor: torch.Tensor) -> torch.Tensor:
        kept = tensor.detach()  # shares the version counter: in-place changes are seen
        self.kept.append((kept, kept._version))
        if kept.is_floating_point() and kept.dtype not in (torch.float32, torch.float64):
            kept = kept.float()
        return kept

    def batch(self, tensor: torch.Tensor | None, dim: int, per_sample: int = 1) -> None:
        if isinstance(tensor, torch.Tensor):
            self.layout[id(tensor)] = (dim % tensor.dim(), per_sample)

    def fallback(self, why: str) -> NoReturn:
        raise _NeedsWholeModelFallback(f"{type(self.module).__name__} {why}")

    # the engine's side
    def check_kept(self) -> None:
        if any(t._version != v for t, v in self.kept):
            self.fallback("had an input modified in place after use")

    def _reached(self, node) -> bool:
        """Whether the backward will run ``node``: some node it reads (transitively) is a module
        output or tap the engine differentiates against or hooks, or was made before this
        module's forward started (every such node of the loss's graph leads to one: the first
        modules' outputs are differentiated against, and composites keep it so). A node read
        only through parameters is not (its gradient would only accumulate into them)."""
        stack = [child for child, _ in node.next_functions if child is not None]
        seen: set = set()
        while stack:
            child = stack.pop()
            if child in seen:
                continue
            seen.add(child)
            if child in self.engine.reaching:
                return True
            if hasattr(child, "variable"):  # a leaf (a parameter)
                continue
            if child._sequence_nr() < self.start:
                return True
            stack.extend(c for c, _ in child.next_functions if c is not None)
        return False


def _owned(module: nn.Module) -> dict[str, nn.Parameter]:
    # the module's own parameters (what named_parameters(recurse=False) yields, read directly:
    # this runs for every module on every call)
    return {n: p for n, p in module._parameters.items() if p is not None and p.requires_grad}


def _reached_parameters(
    root: torch.autograd.graph.Node | None,
    watched: dict[tuple, int],
    tracked: dict[int, list[int]] | None = None,
) -> tuple[dict[int, int], set[torch.autograd.graph.Node]]:
    """id(leaf tensor) -> number of graph edges into its AccumulateGrad node, for every leaf that
    requires grad and that the loss reaches; and the set of graph nodes the loss reaches.
    ``watched`` maps (node, output number) keys to 0 and gets the number of reached edges into
    each (how many graph nodes read that output). ``tracked`` maps ids of leaves to empty lists
    and gets the sequence numbers (creation order) of the reached nodes that read each."""
    edges: dict[int, int] = {}
    tracked = {} if tracked is None else tracked
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
                if key in tracked:
                    tracked[key].append(node._sequence_nr())
            elif (child, nr) in watched:
                watched[child, nr] += 1
            stack.append(child)
    return edges, seen


def _check_layout(call: _Call, n: int, m: int | None, other: tuple | None) -> None:
    """A composite rule's declared layout against the shapes its inputs and outputs had at
    batch sizes n and m (``other``; None for n = 1, where only the sizes are checked): a leaf
    declared (dim, k) must have n k entries in dim at n and m k at m, the same shape elsewhere;
    any other leaf must not depend on the batch size. Raises _NeedsWholeModelFallback otherwise
    (a composite cannot give way to the per-module fallback)."""
    name = type(call.module).__name__
    for shapes, shapes_m, declared in zip(call.shapes, other or (None, None), call.layout):
        for i, (shape, layout) in enumerate(zip(shapes, declared)):
            if layout is None:
                ok = other is None or _batch_dim(shape, n, shapes_m[i], m) is None
            else:
                dim, k = layout
                ok = shape is not None and dim < len(shape) and shape[dim] == n * k
                if ok and other is not None:
                    shape_m = shapes_m[i]
                    ok = (
                        shape_m is not None
                        and len(shape_m) == len(shape)
                        and shape_m[dim] == m * k
                        and all(a == b for d, (a, b) in enumerate(zip(shape, shape_m)) if d != dim)
                    )
            if not ok:
                raise _NeedsWholeModelFallback(
                    f"{name} does not carry the batch where its composite rule expects it"
                )


class _Engine:
    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        self.model, self.loss_fn = model, loss_fn
        # one walk over the modules (this runs on every call): the trainable parameters in
        # model.named_parameters() order (shared ones once), and each module's own trainable ones
        self.modules: list[nn.Module] = []
        self.names: list[str] = []
        self.params: list[nn.Parameter] = []
        self.hooked: dict[nn.Module, Rule | Composite | None] = {}
        self.owned: dict[nn.Module, dict[str, nn.Parameter]] = {}
        owners: dict[int, int] = {}
        claimed: set[int] = set()  # ids of parameters a composite rule covers
        self.conflict = ""
        for prefix, module in model.named_modules():
            self.modules.append(module)
            owned = _owned(module)
            for name, p in owned.items():
                owners[id(p)] = owners.get(id(p), 0) + 1
                if owners[id(p)] == 1:
                    self.names.append(f"{prefix}.{name}" if prefix else name)
                    self.params.append(p)
            if not owned:
                continue
            covered = [id(p) in claimed for p in owned.values()]
            if all(covered):  # a child whose parameters its composite parent reads itself
                continue
            if any(covered):
                self.conflict = f"{type(module).__name__} is covered in part by a composite rule"
            rule = rule_for(module)
            if isinstance(rule, Composite):
                # a composite owns what its forward reads, its children's parameters included
                # (names relative to the module: "out_proj.weight"); modules come in
                # named_modules() order, parents before children
                owned = {n: p for n, p in rule.parameters(module).items() if p.requires_grad}
                claimed.update(id(p) for p in owned.values())
            self.hooked[module] = rule
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
        # modules without a rule: the autograd sequence numbers at the start and end of their
        # forward, per chunk (a node created in between was created by their forward)
        # Composite rules too: their parameters must be read only inside their forward.
        self.windowed = [m for m, r in self.hooked.items() if r is None or isinstance(r, Composite)]
        self.composites = [m for m, r in self.hooked.items() if isinstance(r, Composite)]
        # per chunk: composite contexts between a composite's forward and its forward hook; the
        # taps that run as hooks in the backward, those the backward differentiates against, and
        # the graph nodes known to be run or reached by the backward (see _CompositeContext)
        self.pending: dict[nn.Module, _CompositeContext] = {}
        self.hooked_taps: list[_Tap] = []
        self.targets: list[tuple[GradientEdge, _Tap]] = []
        self.reaching: set = set()
        self.windows: dict[nn.Module, list[int]] = {}
        self.tick = torch.zeros((), requires_grad=True)
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
        # shapes seen by the hooked modules per batch size (this call's chunks and probe)
        self.probing = False
        self.probe_calls: dict[nn.Module, _Shapes] = {}
        self.observed: dict[int, dict[nn.Module, _Shapes]] = {}
        self.notes: set[str] = set()  # modules sent to a fallback on the way (one warning each)

    # ------------------------------------------------------------------ hooks
    def _forward_hook(self, module, args, kwargs, output):
        if self.probing:  # a batch of another size: shapes only (see _batch_dims)
            if module not in self.probe_calls:
                self.probe_calls[module] = (
                    _shapes(tree_leaves((args, kwargs))),
                    _shapes(_leaves(output)),
                )
            return None
        if not self.active:
            return None
        if module in self.calls:
            self.reused = True
            return None
        if module in self.windows:
            self.windows[module].append(self._stamp())
        call = _Call(module, self.hooked[module])
        self.calls[module] = call
        inputs = tree_leaves((args, kwargs))
        outputs = _leaves(output)
        if any(isinstance(t, PackedSequence) for t in (*args, output, *_leaves(output))):
            raise _NeedsWholeModelFallback(
                f"{type(module).__name__} reads or returns a PackedSequence"
            )
        tensor_args = [a for a in inputs if isinstance(a, torch.Tensor)]
        call.args, call.kwargs = tuple(args), dict(kwargs)
        call.versions = tuple(a._version for a in tensor_args)
        call.shapes = (_shapes(inputs), _shapes(outputs))
        if isinstance(call.rule, Composite):
            ctx = self.pending.pop(module, None)
            if ctx is None:
                raise _NeedsWholeModelFallback(
                    f"the composite rule of {type(module).__name__} did not run"
                )
            call.ctx, call.args, call.kwargs = ctx, (), {}
            # its taps deliver the gradients: nothing to hook on its outputs
            call.layout = tuple(
                [ctx.layout.get(id(t)) if isinstance(t, torch.Tensor) else None for t in leaves]
                for leaves in (inputs, outputs)
            )
            return None
        if module in self.fused:
            call.grad_outputs = (0,)
            return None  # its backward delivers the result itself
        root = not any(a.requires_grad for a in tensor_args)
        grad_outputs = []
        for i, out in enumerate(outputs):
            if not (isinstance(out, torch.Tensor) and out.requires_grad):
                continue
            grad_outputs.append(i)
            if root:
                # nothing upstream requires grad: the backward stops at this output's edge and
                # hands its gradient over directly (no hook: the edge is captured, not run)
                self.roots.append((get_gradient_edge(out), call, i))
                self.reaching.add(out.grad_fn)
            else:
                out.register_hook(self._grad_hook(call, i))
        call.grad_outputs = tuple(grad_outputs)
        return None

    def _pre_hook(self, module, args) -> None:
        if self.active and module not in self.windows:
            self.windows[module] = [self._stamp()]

    def _stamp(self) -> int:
        """The autograd sequence number of a node made now (nodes are numbered in creation
        order, per thread)."""
        with torch.enable_grad():
            return (self.tick * 1).grad_fn._sequence_nr()

    def _check_windows(self, tracked: dict[int, list[int]]) -> None:
        """A parameter of a module without a rule must be read only by nodes its module's forward
        made: the per-module fallback differentiates that forward alone (a use outside it, e.g.
        ``h * act.weight`` next to ``act(h)``, would be missed: 20% off before this check)."""
        for module, window in self.windows.items():
            if len(window) != 2:
                continue
            start, end = window
            for p in self.owned[module].values():
                if any(not start < nr < end for nr in tracked.get(id(p), ())):
                    raise _NeedsWholeModelFallback(
                        f"a parameter of {type(module).__name__} is also used outside it"
                    )

    def _grad_hook(self, call: _Call, index: int) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            self._receive(call, index, grad)

        return hook

    def _receive(self, call: _Call, index: int, grad: torch.Tensor, scale=None) -> None:
        if call.skip:
            return
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

    def _composite_forward(self, module: nn.Module) -> Callable:
        composite, stock = self.hooked[module], type(module).forward

        def forward(*args, **kwargs):
            # the probe and any call but the first of a chunk run the stock forward (a second
            # call is then seen by the forward hook: the whole model falls back)
            if not self.active or module in self.calls or module in self.pending:
                return stock(module, *args, **kwargs)
            ctx = _CompositeContext(self, module, self.windows[module][0])
            self.pending[module] = ctx
            return composite.forward(module, ctx, *args, **kwargs)

        return forward

    # ------------------------------------------------------------------ per-layer work
    def _check_unmodified(self, call: _Call) -> None:
        leaves = tree_leaves((call.args, call.kwargs))  # as in _forward_hook
        if tuple(a._version for a in leaves if isinstance(a, torch.Tensor)) != call.versions:
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
        grad = grad.detach().to(compute)
        if call.batch_dim is None:
            a, grad = a.unsqueeze(0), grad.unsqueeze(0)
        elif call.batch_dim:
            a, grad = a.movedim(call.batch_dim, 0), grad.movedim(call.batch_dim, 0)
        return call.rule(call.module, a, grad)

    def _apply_fallback(self, call: _Call) -> dict[str, torch.Tensor]:
        """Exact per-sample gradients of one module's own parameters: the vector-Jacobian product
        of the module for each sample alone (its children run with their current weights), every
        input and output leaf sliced along its own batch dimension (leaves without one are passed
        whole). vmap over samples where torch.func can run the module; otherwise (recurrent
        layers, or whatever vmap fails on) one plain autograd backward per sample."""
        self._check_unmodified(call)
        if not call.out_grads:
            return {}
        module, owned = call.module, self.owned[call.module]
        leaves, spec = tree_flatten((call.args, call.kwargs))
        leaves = [a.detach() if isinstance(a, torch.Tensor) else a for a in leaves]
        outs = sorted(call.out_grads)
        cotangents = [call.out_grads[i] for i in outs]
        out_dims = [call.out_dims[i] for i in outs]
        in_dims = [
            d if isinstance(leaf, torch.Tensor) else None for d, leaf in zip(call.in_dims, leaves)
        ]
        self.active = False  # children's hooks must not record the re-run
        if not isinstance(module, nn.RNNBase) and any(d is not None for d in in_dims):
            try:
                return self._vmap_fallback(
                    module, owned, leaves, spec, in_dims, outs, cotangents, out_dims
                )
            except Exception:  # noqa: BLE001 - the loop below is exact, or raises the real error
                pass
        return self._loop_fallback(module, owned, leaves, spec, in_dims, outs, cotangents, out_dims)

    @staticmethod
    def _vmap_fallback(module, owned, leaves, spec, in_dims, outs, cotangents, out_dims):
        params = {n: p.detach() for n, p in owned.items()}
        batched = [i for i, d in enumerate(in_dims) if d is not None]

        def one(sample_leaves, sample_cotangents):
            full = list(leaves)
            for i, value in zip(batched, sample_leaves):
                full[i] = value.unsqueeze(in_dims[i])
            args, kwargs = tree_unflatten(full, spec)

            def f(p):
                flat = _leaves(functional_call(module, p, tuple(args), kwargs, strict=False))
                return tuple(flat[i] for i in outs)

            _, pullback = vjp(f, params)
            (grads,) = pullback(tuple(c.unsqueeze(d) for c, d in zip(sample_cotangents, out_dims)))
            return grads

        grads = vmap(one, in_dims=(tuple(in_dims[i] for i in batched), tuple(out_dims)))(
            tuple(leaves[i] for i in batched), tuple(cotangents)
        )
        # children's parameters still require grad, so the results may carry a graph: detach
        return {name: squared_norms(g.detach()) for name, g in grads.items()}

    @staticmethod
    def _loop_fallback(module, owned, leaves, spec, in_dims, outs, cotangents, out_dims):
        names, params = list(owned), list(owned.values())
        # with no batch dimension anywhere (a chunk of one sample) the whole call is the sample
        samples = cotangents[0].shape[out_dims[0]] if out_dims[0] is not None else 1
        rows: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        for k in range(samples):
            args, kwargs = tree_unflatten([_narrow(a, d, k) for a, d in zip(leaves, in_dims)], spec)
            with torch.enable_grad():
                flat = _leaves(module(*args, **kwargs))
                grads = torch.autograd.grad(
                    [flat[i] for i in outs],
                    params,
                    [_narrow(c, d, k) for c, d in zip(cotangents, out_dims)],
                    allow_unused=True,
                )
            for name, p, g in zip(names, params, grads):
                g = torch.zeros_like(p) if g is None else g.detach()
                rows[name].append(squared_norms(g.reshape(1, -1)))
        return {name: torch.cat(r) for name, r in rows.items()}

    # ------------------------------------------------------------------ where the batch is
    def _reference(self, n: int, x: torch.Tensor, m: int | None = None) -> tuple[int, dict]:
        """Shapes seen by every hooked module at a batch size m other than n: an earlier
        chunk's, or a probe: a no-grad forward of the chunk's first m samples (m = 1 unless
        asked: a forward of one sample is the cheapest)."""
        if m is None:
            for size, seen in self.observed.items():
                if size != n:
                    return size, seen
            m = 1
        if m in self.observed:
            return m, self.observed[m]
        self.probing, self.probe_calls = True, {}
        fastpath = torch.backends.mha.get_fastpath_enabled()
        try:
            # without grad, nn.MultiheadAttention and the nn.Transformer* layers may take their
            # fused inference kernels, in which submodules do not run (and nested tensors
            # replace padded ones): the probe must see the modules the chunk's forward runs
            torch.backends.mha.set_fastpath_enabled(False)
            with torch.no_grad():
                self.model(x[:m].detach())
        except Exception as error:  # noqa: BLE001
            raise _NeedsWholeModelFallback(
                f"the model failed on a probe batch of {m} ({type(error).__name__}: {error})"
            ) from error
        finally:
            self.probing = False
            torch.backends.mha.set_fastpath_enabled(fastpath)
        self.observed[m] = self.probe_calls
        return m, self.probe_calls

    def _batch_dims(self, n: int, x: torch.Tensor, edges: dict[int, int]) -> None:
        """Find the batch dimension of every input and output leaf of every hooked module whose
        parameters the loss reaches, from its shapes at this chunk's size n and at another size
        m (a dimension that is n here and m there holds the batch; a leaf of equal shapes holds
        none, whatever n is). A module whose output that carries a gradient holds no batch (a
        positional table broadcast over it, a Linear on such a table) cannot be split into
        samples: the whole model falls back. A rule needs the batch in dim 0 of its input and
        output; a module with the batch elsewhere (a sequence-first layout, a recurrent layer
        with batch_first=False) gets the exact per-module fallback. With n = 1 the one sample's
        gradient is the batch gradient: nothing is split, and a rule only needs dim 0 to be 1."""
        calls = list(self.calls.values())
        for call in calls:
            call.skip = not any(id(p) in edges for p in self.owned[call.module].values())
        calls = [c for c in calls if not c.skip]
        if n == 1:
            for call in calls:
                ins, outs = call.shapes
                call.in_dims, call.out_dims = [None] * len(ins), [None] * len(outs)
                if isinstance(call.rule, Composite):
                    _check_layout(call, n, None, None)
                elif call.rule is not None and not (
                    ins
                    and ins[0]
                    and ins[0][0] == 1
                    and all(outs[i] and outs[i][0] == 1 for i in call.grad_outputs)
                ):
                    if _positionwise_dim(call, None):
                        call.batch_dim = None  # the whole chunk is the sample
                    else:
                        self._reroute(call, "does not carry the batch in dim 0")
            return
        try:
            found = self._find_batch_dims(calls, n, *self._reference(n, x))
        except _NeedsWholeModelFallback:
            # a batch of one may change ranks (a model that squeezes its tensors): look again
            # at a batch of two before giving up on the batched path
            if n <= 2 or 2 in self.observed:
                raise
            found = self._find_batch_dims(calls, n, *self._reference(n, x, 2))
        for call, (in_dims, out_dims, reroute) in zip(calls, found):
            call.in_dims, call.out_dims = in_dims, out_dims
            if reroute and _positionwise_dim(call, in_dims[0]):
                grad_dims = {out_dims[i] for i in call.grad_outputs}
                if grad_dims == {in_dims[0]}:  # the same dimension in and out: move it
                    call.batch_dim, reroute = in_dims[0], False
            if reroute:
                self._reroute(call, "carries the batch in another dimension than 0")
        self.observed.setdefault(n, {c.module: c.shapes for c in self.calls.values()})

    @staticmethod
    def _find_batch_dims(calls: list[_Call], n: int, m: int, seen: dict) -> list[tuple]:
        """(input dims, output dims, whether a rule must give way to the per-module fallback)
        per call, from its shapes at n and at m; raises _NeedsWholeModelFallback where the
        batch cannot be split per module."""
        found = []
        for call in calls:
            name = type(call.module).__name__
            if call.module not in seen:
                raise _NeedsWholeModelFallback(f"{name} did not run on a batch of {m}")
            (ins, outs), (ins_m, outs_m) = call.shapes, seen[call.module]
            if len(ins) != len(ins_m) or len(outs) != len(outs_m):
                raise _NeedsWholeModelFallback(
                    f"the inputs or outputs of {name} depend on the batch size"
                )
            if isinstance(call.rule, Composite):  # its own layout, checked; never split here
                _check_layout(call, n, m, (ins_m, outs_m))
                found.append(([None] * len(ins), [None] * len(outs), False))
                continue
            in_dims = [_batch_dim(a, n, b, m) for a, b in zip(ins, ins_m)]
            out_dims = [_batch_dim(a, n, b, m) for a, b in zip(outs, outs_m)]
            grad_dims = [out_dims[i] for i in call.grad_outputs]
            if any(d is None for d in grad_dims):
                raise _NeedsWholeModelFallback(
                    f"the output of {name} does not carry the batch (a tensor computed without "
                    "the input, e.g. a positional table broadcast over the batch)"
                )
            if _MIXED in grad_dims or _MIXED in in_dims:
                raise _NeedsWholeModelFallback(
                    f"the batch of {name}'s inputs or outputs is not one dimension of them"
                )
            reroute = call.rule is not None and (
                in_dims[:1] != [0] or any(d != 0 for d in grad_dims)
            )
            if (call.rule is None or reroute) and all(d is None for d in in_dims):
                raise _NeedsWholeModelFallback(
                    f"the output of {name} carries the batch but none of its inputs does"
                )
            found.append((in_dims, out_dims, reroute))
        return found

    def _reroute(self, call: _Call, why: str) -> None:
        name = type(call.module).__name__
        if call.module in self.fused or isinstance(call.rule, Composite):
            raise _NeedsWholeModelFallback(f"{name} {why}")
        call.rule = None
        self.notes.add(f"{name} {why}; using the exact per-module fallback for it")

    # ------------------------------------------------------------------ one chunk
    def chunk(self, x: torch.Tensor) -> torch.Tensor:
        """float64 [n, T] per-tensor squared norms for the samples of ``x``."""
        if self.tied or self.no_running_stats or self.conflict:
            raise _NeedsWholeModelFallback(
                "tied parameters"
                if self.tied
                else self.conflict or "BatchNorm without running statistics"
            )
        self.calls, self.roots, self.reused = {}, [], False
        self.pending, self.hooked_taps, self.targets, self.reaching = {}, [], [], set()
        self.fused, self.first_layer = {}, {}
        self.windows = {}
        handles = [
            m.register_forward_hook(self._forward_hook, with_kwargs=True) for m in self.hooked
        ]
        handles += [m.register_forward_pre_hook(self._pre_hook) for m in self.windowed]
        try:
            for module in self.fusable:
                module.forward = self._fused_forward(module)
            for module in self.composites:
                module.forward = self._composite_forward(module)
            if x.shape[0] > 1 and all(size == x.shape[0] for size in self.observed):
                # the probe (see _reference) runs before the chunk's forward: between the forward
                # and the backward it would evict what the backward reads next (measured)
                self._reference(x.shape[0], x)
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
            self.active = False  # the forward is done (the probe must not record)
            readers = {(edge.node, edge.output_nr): 0 for edge, _, _ in self.roots}
            tracked = {id(p): [] for m in self.windows for p in self.owned[m].values()}
            edges, nodes = _reached_parameters(loss.grad_fn, readers, tracked)
            self._check_windows(tracked)
            self._batch_dims(x.shape[0], x, edges)
            roots = [r for r in self.roots if r[0].node in nodes]
            # composite taps the backward would not reach by itself (see _CompositeContext)
            targets = [t for t in self.targets if t[0].node in nodes]
            for bn, (edge, node) in self.fused.items():
                for root_edge, call, _ in roots:
                    if (
                        call.rule is conv_rule
                        and (edge.node, edge.output_nr) == (root_edge.node, root_edge.output_nr)
                        and readers[edge.node, edge.output_nr] == 1
                        and node in nodes
                    ):
                        self.first_layer[bn] = call
            if roots or targets:
                grads = torch.autograd.grad(
                    loss.sum(), [r[0] for r in roots] + [t[0] for t in targets], allow_unused=True
                )
                for (_, call, index), grad in zip(roots, grads):
                    if grad is not None:
                        self._receive(call, index, grad)
                for (_, tap), grad in zip(targets, grads[len(roots) :]):
                    if grad is not None:  # None: no gradient flowed (a zero one)
                        tap(grad)
            self.active = False
            for tap in self.hooked_taps:
                # a hooked tap whose node the loss reaches ran in the backward, or the engine's
                # reasoning about what the backward runs failed: never count it as zero then
                if not tap.fired and tap.node in nodes:
                    raise _NeedsWholeModelFallback(
                        f"a gradient tap of {type(tap.ctx.module).__name__} was not reached"
                    )
            columns: dict[int, torch.Tensor] = {}
            for module, call in self.calls.items():
                if call.skip:
                    continue
                if call.ctx is not None:  # a composite rule: what its taps added up
                    result = call.ctx.sums
                elif call.rule is not None:
                    result = call.result
                else:
                    result = self._apply_fallback(call)
                for name, p in self.owned[module].items():
                    if id(p) not in edges:
                        continue
                    # (a composite's parameters may feed several nodes, e.g. a packed projection
                    # split into blocks: the windows check covers them)
                    if call.rule is not None and call.ctx is None and edges[id(p)] != 1:
                        raise _NeedsWholeModelFallback(
                            f"a parameter of {type(module).__name__} is also used outside it"
                        )
                    if result is None or name not in result:
                        raise _NeedsWholeModelFallback(
                            f"no gradient reached the output of {type(module).__name__}"
                        )
                    if result[name].shape != (x.shape[0],):  # never a misaligned number
                        raise _NeedsWholeModelFallback(
                            f"{type(module).__name__} gave {tuple(result[name].shape)} norms "
                            f"for {x.shape[0]} samples"
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
            for module in self.fusable + self.composites:
                vars(module).pop("forward", None)
            self.calls, self.fused, self.first_layer = {}, {}, {}
            self.pending, self.hooked_taps, self.targets, self.reaching = {}, [], [], set()


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
            f"{', '.join(engine.fallback_types)}; using an exact per-module fallback for them "
            "(torch.func, or one backward pass per sample where torch.func cannot run them)",
            FallbackWarning,
            stacklevel=2,
        )
    rows = []
    warned: set[str] = set()

    def warn(message: str) -> None:
        if message not in warned:
            warned.add(message)
            warnings.warn(f"per-sample gradient norms: {message}", FallbackWarning, stacklevel=3)

    with eval_mode(model, engine.modules):
        for start in range(0, n, chunk_size):
            x = inputs[start : start + chunk_size]
            try:
                rows.append(engine.chunk(x))
            except _NeedsWholeModelFallback as why:
                rows.append(_whole_model(model, x, loss_fn, str(why), warn))
            for note in sorted(engine.notes):
                warn(note)
            engine.notes.clear()
    return reduce_squared_norms(rows[0] if len(rows) == 1 else torch.cat(rows), norm)


def _whole_model(
    model: nn.Module, x: torch.Tensor, loss_fn: LossFn, why: str, warn: Callable[[str], None]
) -> torch.Tensor:
    """float64 [n, T] squared norms for one chunk by an exact whole-model path: torch.func, or
    one plain backward pass per sample where torch.func cannot run the model (recurrent layers,
    whose kernels vmap cannot batch). Either is exact; neither is silent."""
    if not any(isinstance(m, nn.RNNBase) for m in model.modules()):
        try:
            squared = per_sample_grad_norms_functional(model, x, loss_fn, norm="per-tensor").pow(2)
        except Exception as error:  # noqa: BLE001 - the loop below is exact, or raises the real error
            why = f"{why}; torch.func failed ({type(error).__name__}: {error})"
        else:
            warn(f"{why}; using the exact torch.func path for the whole model")
            return squared
    warn(f"{why}; using one backward pass per sample for the whole model (exact, slow)")
    return per_sample_grad_norms_loop(model, x, loss_fn, norm="per-tensor").pow(2)
