"""Batched exact per-sample gradient norms of ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN``.

:func:`recurrent_forward` runs a recurrent module (the same computation as its own forward, one
layer and direction at a time, so that every layer's input and hidden sequence are kept) inside
an autograd function whose backward runs back-propagation through time itself and reports,
through a ``record(param_name, squared_norms)`` callback, float64 [N] per-sample squared gradient
norms of every trainable parameter, while the input gradient (and the initial state's, when it
requires grad) flows on as usual. No parameter gradient is formed for the batch.

Forward. LSTM and GRU layers run a step at a time in a short Python loop (the input projection
of all steps is one large product first; per step one product with W_hh and five or six
element-wise operations) and keep their gate activations, so that the backward recomputes
nothing: on the CPU this costs less than the native fused kernel plus recomputing the gates'
pre-activations from the kept hidden sequence (two more large products), which was measured
first (the lstm-text benchmark: 140 against 216 ms of CPU time per chunk). An LSTM's gate rows
are reordered (o, i, f, g) inside (a per-sample norm does not depend on the order of a
gradient's rows). RNN layers run the native kernel: their backward needs only the hidden
sequence (tanh' = 1 - h^2, relu' = [h > 0]).

Backward, per layer (top first) and direction, with X [T, N, E] the layer's input and H_prev
[T, N, H] the state each step read: a Python loop over the steps, from the last, forms the gate
pre-activation gradients dZ_t with a handful of operations per step (the recurrent product and
two or three element-wise ones; whatever does not depend on the gradient is computed for all
steps at once, in place of the kept gates). Then, per sample, W_ih's gradient is
sum_t dZ_t x_t^T and W_hh's sum_t dZ_t h_{t-1}^T: their squared norms come from the Gram
identity or from the materialised per-sample gradients, whichever is cheaper for the shapes (as
for ``nn.Linear``, with T tokens), the Gram matrices of dZ shared by both; b_ih and b_hh both
get sum_t dZ_t. A GRU's new gate reads ``r * (W_hn h + b_hn)``: the recurrent weight and bias of
that gate get the pre-activation gradient times r, the input ones without. The layer below gets
``dX = dZ W_ih`` (summed over directions).

Not handled here (the caller keeps the module's own forward and an exact fallback): LSTMs with
``proj_size > 0``, PackedSequence inputs, unbatched (2-D) inputs, dtypes other than float32 and
float64, and training mode with dropout between layers (the engine scores in eval mode, where
dropout is off). See :func:`unsupported`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from .composite import Composite, CompositeContext, register
from .layers import squared_norms, use_ghost

Record = Callable[[str, Tensor], None]

#: the RNN layers' native kernels (LSTM and GRU layers run a step at a time: _LOOPED)
_NATIVE = {"RNN_TANH": torch._VF.rnn_tanh, "RNN_RELU": torch._VF.rnn_relu}


def unsupported(module: nn.RNNBase, input=None, hx=None) -> str | None:
    """Why :func:`recurrent_forward` cannot run ``module`` (on ``input``), or None when it can;
    worded to follow the module's type name ("LSTM has proj_size > 0 ...")."""
    if type(module).forward not in (nn.LSTM.forward, nn.GRU.forward, nn.RNN.forward):
        return "overrides forward"
    if module.mode not in ("LSTM", "GRU", *_NATIVE):
        return f"has an unknown mode {module.mode!r}"
    if getattr(module, "proj_size", 0) > 0:
        return "has proj_size > 0 (no batched rule for projections)"
    if module.training and module.dropout > 0 and module.num_layers > 1:
        return "has dropout between layers active (training mode)"
    if input is None:
        return None
    if isinstance(input, PackedSequence):
        return "reads a PackedSequence"
    if not isinstance(input, Tensor) or input.dim() != 3:
        return "reads an input that is not a batched 3-D tensor"
    if input.dtype not in (torch.float32, torch.float64):
        return f"reads {input.dtype} (the batched rule takes float32 and float64)"
    states = hx if isinstance(hx, tuple) else (hx,)
    if any(s is not None and (not isinstance(s, Tensor) or s.dim() != 3) for s in states):
        return "reads an initial state that is not a batched 3-D tensor"
    return None


def recurrent_forward(
    module: nn.RNNBase,
    input: Tensor,
    hx: Tensor | tuple[Tensor, Tensor] | None,
    record: Record,
    anchor: Tensor | None = None,
) -> tuple[Tensor, Tensor | tuple[Tensor, Tensor]]:
    """``module(input, hx)`` (the same computation, up to float rounding), whose backward calls
    ``record(name, squared_norms)`` (float64 [N], sample n's squared gradient norm) once for
    every trainable parameter of ``module`` (names as in ``module.named_parameters()``) and
    passes the gradients of ``input`` and ``hx`` on. Parameter gradients are not computed:
    the parameters get None. ``anchor``: a tensor that requires grad, one more input of the
    autograd function (its gradient is None): differentiating against it runs the backward
    where nothing else upstream requires grad. The caller checks :func:`unsupported` first."""
    lstm = module.mode == "LSTM"
    layers, directions = module.num_layers, 2 if module.bidirectional else 1
    x = input.transpose(0, 1) if module.batch_first else input  # time-major [T, N, E]
    n = x.shape[1]
    if hx is None:
        zeros = x.new_zeros(layers * directions, n, module.hidden_size)
        h0, c0 = zeros, (zeros if lstm else None)
    elif lstm:
        h0, c0 = hx
    else:
        h0, c0 = hx, None
    module.check_forward_args(input, (h0, c0) if lstm else h0, None)
    names = module._flat_weights_names
    trainable = frozenset(
        name for name, p in zip(names, module._flat_weights) if p is not None and p.requires_grad
    )
    spec = (module.mode, layers, directions, module.bias, names, trainable, record)
    out, h_n, c_n = _Recurrent.apply(spec, x, h0, c0, anchor, *module._flat_weights)
    if module.batch_first:
        out = out.transpose(0, 1)
    return out, ((h_n, c_n) if lstm else h_n)


class _Recurrent(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec, x, h0, c0, anchor, *weights):
        mode, layers, directions, bias = spec[:4]
        per_dir = len(weights) // (layers * directions)
        hidden = h0.shape[2]
        inp = x.detach()
        h0_, c0_ = h0.detach(), None if c0 is None else c0.detach()
        outs, kept, h_n, c_n = [], [], [], []
        for layer in range(layers):
            first = layer * directions
            w = [p.detach() for p in weights[first * per_dir : (first + directions) * per_dir]]
            if mode in _LOOPED:
                out = inp.new_empty(inp.shape[0], inp.shape[1], directions * hidden)
                for direction in range(directions):
                    k = first + direction
                    state, h_last, c_last = _LOOPED[mode](
                        inp,
                        h0_[k],
                        None if c0 is None else c0_[k],
                        w[direction * per_dir : (direction + 1) * per_dir],
                        direction == 1,
                        out[:, :, direction * hidden : (direction + 1) * hidden],
                    )
                    kept.append(state)
                    h_n.append(h_last)
                    c_n.append(c_last)
            else:  # an RNN's backward needs nothing but its hidden sequence
                rows = slice(first, first + directions)
                out, h_last = _NATIVE[mode](
                    inp, h0_[rows], w, bias, 1, 0.0, False, directions == 2, False
                )
                kept.extend([None] * directions)
                h_n.extend(h_last.unbind(0))
            inp = out
            outs.append(out)
        ctx.spec, ctx.kept = spec, kept
        ctx.save_for_backward(x, h0, c0, *outs, *weights)
        ctx.set_materialize_grads(False)
        return outs[-1], torch.stack(h_n), None if c0 is None else torch.stack(c_n)

    @staticmethod
    def backward(ctx, d_out, d_hn, d_cn):
        mode, layers, directions, bias, names, trainable, record = ctx.spec
        saved = ctx.saved_tensors
        x, h0, c0 = saved[:3]
        outs = saved[3 : 3 + layers]
        weights = [w.detach() for w in saved[3 + layers :]]
        per_dir = len(weights) // (layers * directions)
        hidden = h0.shape[2]
        d_h0 = [None] * (layers * directions)
        d_c0 = [None] * (layers * directions)
        for layer in reversed(range(layers)):
            inp = x if layer == 0 else outs[layer - 1]
            need_input = layer > 0 or ctx.needs_input_grad[1]
            d_inp = None
            for direction in range(directions):
                k = layer * directions + direction
                cols = slice(direction * hidden, (direction + 1) * hidden)
                w = weights[k * per_dir : (k + 1) * per_dir]
                dirs = _Direction(
                    inp,
                    outs[layer][:, :, cols],
                    h0[k],
                    None if c0 is None else c0[k],
                    None if d_out is None else d_out[:, :, cols],
                    None if d_hn is None else d_hn[k],
                    None if d_cn is None else d_cn[k],
                    reverse=direction == 1,
                )
                if mode == "LSTM":
                    d_in, d_rec, w_ih, d_h0[k], d_c0[k] = _lstm_backward(dirs, ctx.kept[k])
                elif mode == "GRU":
                    d_in, d_rec, d_h0[k] = _gru_backward(dirs, ctx.kept[k], w[1])
                    w_ih = w[0]
                else:
                    d_in, d_h0[k] = _rnn_backward(dirs, w[1], relu=mode == "RNN_RELU")
                    d_rec, w_ih = d_in, w[0]
                ctx.kept[k] = None  # free it now
                own = names[k * per_dir : (k + 1) * per_dir]
                _record(record, trainable, own, inp, dirs.h_prev, d_in, d_rec)
                if need_input:
                    step = torch.matmul(d_in, w_ih)
                    d_inp = step if d_inp is None else d_inp.add_(step)
            d_out = d_inp
        d_x = d_out if ctx.needs_input_grad[1] else None
        d_h0 = _stack(d_h0) if ctx.needs_input_grad[2] else None
        d_c0 = _stack(d_c0) if ctx.needs_input_grad[3] else None
        return (None, d_x, d_h0, d_c0, None, *[None] * len(weights))


def _stack(grads: list) -> Tensor | None:
    if all(g is None for g in grads):
        return None
    like = next(g for g in grads if g is not None)
    return torch.stack([torch.zeros_like(like) if g is None else g for g in grads])


def _steps(t: Tensor, reverse: bool) -> list[Tensor]:
    """The [T, ...] tensor ``t`` as a list of its steps, in the order a direction runs them."""
    out = list(t.unbind(0))
    if reverse:
        out.reverse()
    return out


class _Direction:
    """One direction of one layer, time-major: its input x [T, N, E], hidden sequence h
    [T, N, H], initial state h0 (c0) [N, H], and the gradients reaching its output sequence
    (or None), final hidden state and final cell state (or None). ``h_prev`` [T, N, H] is the
    state each step read. ``steps(t)``: see :func:`_steps`."""

    def __init__(self, x, h, h0, c0, d_out, d_hn, d_cn, reverse: bool) -> None:
        self.x, self.h, self.h0, self.c0 = x, h, h0, c0
        self.d_out, self.d_hn, self.d_cn = d_out, d_hn, d_cn
        self.reverse = reverse
        self.h_prev = self.shifted(h, h0)

    def shifted(self, seq: Tensor, first: Tensor) -> Tensor:
        """``seq`` [T, N, H] one step later: step t sees the value of the step before it."""
        if self.reverse:
            return torch.cat([seq[1:], first.unsqueeze(0)])
        return torch.cat([first.unsqueeze(0), seq[:-1]])

    def steps(self, t: Tensor) -> list[Tensor]:
        return _steps(t, self.reverse)

    def last_grad(self) -> Tensor | None:
        """The gradient reaching the hidden state of the last step run (output and h_n)."""
        d = self.d_out
        last = 0 if self.reverse else -1
        if d is None:
            return self.d_hn
        return d[last] if self.d_hn is None else d[last] + self.d_hn


def _linear_input(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """x [T, N, E] @ w^T + b: [T, N, G], one product (x may be a strided view)."""
    t_len, n, e = x.shape
    flat = x.reshape(t_len * n, e)
    out = torch.mm(flat, w.t()) if b is None else torch.addmm(b, flat, w.t())
    return out.view(t_len, n, -1)


_sigmoid_backward = torch.ops.aten.sigmoid_backward.grad_input  # grad * y (1 - y), out=
_tanh_backward = torch.ops.aten.tanh_backward.grad_input  # grad * (1 - y^2), out=

#: an LSTM's gate rows (i, f, g, o) reordered to (o, i, f, g): the sigmoid gates are one block,
#: and in the backward the gates that take the cell's gradient are one block too (a per-sample
#: norm does not depend on the order of a gradient's rows)
_OIFG = [3, 0, 1, 2]


def _oifg(t: Tensor) -> Tensor:
    return t.view(4, -1, *t.shape[1:])[_OIFG].reshape(t.shape)


def _lstm_forward(x, h0, c0, w, reverse: bool, out: Tensor):
    """One direction of one LSTM layer, a step at a time, writing its hidden sequence into
    ``out`` [T, N, H]; keeps the gate activations [T, N, 4, H] (o, i, f, g), the cell states and
    their tanh [T, N, H] for the backward (which then needs no pre-activation recomputed: that
    would cost two more large products than the native kernel's forward saves)."""
    t_len, n, hidden = out.shape
    w_ih, w_hh = _oifg(w[0]), _oifg(w[1])
    gates = _linear_input(x, w_ih, _oifg(w[2] + w[3]) if len(w) == 4 else None)
    gates = gates.view(t_len, n, 4, hidden)
    c, tc = torch.empty_like(out), torch.empty_like(out)
    flat, gs = _steps(gates.view(t_len, n, 4 * hidden), reverse), _steps(gates, reverse)
    cs, tcs, hs = _steps(c, reverse), _steps(tc, reverse), _steps(out, reverse)
    w_hh_t = w_hh.t()
    h, cell = h0, c0
    for k in range(t_len):
        flat[k].addmm_(h, w_hh_t)
        g = gs[k]
        g[:, :3].sigmoid_()
        g[:, 3].tanh_()
        cell = torch.mul(g[:, 2], cell, out=cs[k]).addcmul_(g[:, 1], g[:, 3])
        h = torch.mul(g[:, 0], torch.tanh(cell, out=tcs[k]), out=hs[k])
    return (gates, c, tc, w_ih, w_hh), h, cell


def _gru_forward(x, h0, c0, w, reverse: bool, out: Tensor):
    """One direction of one GRU layer, a step at a time, writing its hidden sequence into
    ``out``; keeps the gates (r, z, n) [T, N, 3, H] and the recurrent products W_hh h + b_hh
    [T, N, 3, H] for the backward."""
    t_len, n, hidden = out.shape
    bias = len(w) == 4
    gi = _linear_input(x, w[0], w[2] if bias else None).view(t_len, n, 3, hidden)
    gh = torch.empty_like(gi)
    gis, ghs, hs = _steps(gi, reverse), _steps(gh, reverse), _steps(out, reverse)
    gh_flat = _steps(gh.view(t_len, n, 3 * hidden), reverse)
    w_hh_t = w[1].t()
    h = h0
    for k in range(t_len):
        if bias:
            torch.addmm(w[3], h, w_hh_t, out=gh_flat[k])
        else:
            torch.mm(h, w_hh_t, out=gh_flat[k])
        g, r = gis[k], ghs[k]
        rz = g[:, :2].add_(r[:, :2]).sigmoid_()
        new = g[:, 2].addcmul_(rz[:, 0], r[:, 2]).tanh_()
        h = torch.addcmul(new, rz[:, 1], h - new, out=hs[k])  # (1 - z) n + z h
    return (gi, gh), h, None


_LOOPED = {"LSTM": _lstm_forward, "GRU": _gru_forward}


def _lstm_backward(d: _Direction, kept):
    """Gate pre-activation gradients dZ [T, N, 4H] (gates o, i, f, g; also those of the
    recurrent part), the input weight in that order, and the gradients of h0 and c0. The kept
    gate activations become, in place, the factors of dZ that do not depend on the gradient,
    then dZ, a step at a time."""
    gates, c, tc, w_ih, w_hh = kept
    t_len, n, _, hidden = gates.shape
    o, i, f, g = gates.unbind(2)
    cells = d.steps(torch.ops.aten.tanh_backward(o, tc))  # dc_t gets dh_t o_t (1 - tanh(c_t)^2)
    fs = d.steps(f.clone())  # and dc_{t+1} f_{t+1}
    # dZ_o = dh tanh(c) o(1-o), dZ_i = dc g i(1-i), dZ_f = dc c_{t-1} f(1-f), dZ_g = dc i (1-g^2)
    _sigmoid_backward(tc, o, grad_input=o)
    _sigmoid_backward(d.shifted(c, d.c0), f, grad_input=f)
    slope_g = torch.ops.aten.tanh_backward(i, g)
    _sigmoid_backward(g, i, grad_input=i)
    g.copy_(slope_g)
    flat = d.steps(gates.view(t_len, n, 4 * hidden))
    og, ifg = d.steps(o), d.steps(gates[:, :, 1:])
    d_outs = None if d.d_out is None else d.steps(d.d_out)
    dh = d.last_grad()
    if dh is None:
        dh = gates.new_zeros(n, hidden)
    dc = dh * cells[-1] if d.d_cn is None else torch.addcmul(d.d_cn, dh, cells[-1])
    for k in range(t_len - 1, -1, -1):
        if k < t_len - 1:
            if d_outs is None:
                dh = torch.mm(flat[k + 1], w_hh)
            else:
                dh = torch.addmm(d_outs[k], flat[k + 1], w_hh)
            dc = torch.addcmul(dc * fs[k + 1], dh, cells[k])
        og[k].mul_(dh)
        ifg[k].mul_(dc.unsqueeze(1))
    dz = gates.view(t_len, n, 4 * hidden)
    return dz, dz, w_ih, torch.mm(flat[0], w_hh), dc * fs[0]


def _gru_backward(d: _Direction, kept, w_hh):
    """Gradients of the input part [T, N, 3H] and of the recurrent part [T, N, 3H] of the gate
    pre-activations (they differ in the new gate, whose recurrent part is scaled by r), and h0's
    gradient. The kept buffers become these gradients in place."""
    gi, gh = kept
    t_len, n, _, hidden = gi.shape
    r, z, new = gi.unbind(2)
    # h_t = (1 - z) n + z h_{t-1}: dn_pre = dh (1-z)(1-n^2), dz_pre = dh (h_{t-1} - n) z(1-z),
    # dr_pre = dn_pre (W_hn h + b_hn) r(1-r); the recurrent new-gate part gets dn_pre r
    dn = torch.ops.aten.tanh_backward(1 - z, new)
    rec = gh  # becomes the factors of the recurrent part's gradient, then that gradient
    _sigmoid_backward(dn * gh[:, :, 2], r, grad_input=rec[:, :, 0])
    torch.mul(dn, r, out=rec[:, :, 2])
    _sigmoid_backward(d.h_prev - new, z, grad_input=rec[:, :, 1])
    dh_all = torch.empty_like(dn)
    dhs, recs, zs = d.steps(dh_all), d.steps(rec), d.steps(z)
    rec_flat = d.steps(rec.view(t_len, n, 3 * hidden))
    d_outs = None if d.d_out is None else d.steps(d.d_out)
    last = d.last_grad()
    if last is None:
        dhs[-1].zero_()
    else:
        dhs[-1].copy_(last)
    for k in range(t_len - 1, -1, -1):
        recs[k].mul_(dhs[k].unsqueeze(1))
        if k > 0:
            if d_outs is None:
                torch.mul(dhs[k], zs[k], out=dhs[k - 1])
            else:
                torch.addcmul(d_outs[k - 1], dhs[k], zs[k], out=dhs[k - 1])
            dhs[k - 1].addmm_(rec_flat[k], w_hh)
    d_h0 = torch.addmm(dhs[0] * zs[0], rec_flat[0], w_hh)
    d_in = gi  # r and z are no longer needed: the input part's gradient takes their place
    d_in[:, :, :2] = rec[:, :, :2]
    torch.mul(dh_all, dn, out=d_in[:, :, 2])
    return d_in.view(t_len, n, 3 * hidden), rec.view(t_len, n, 3 * hidden), d_h0


def _rnn_backward(d: _Direction, w_hh, relu: bool):
    """Pre-activation gradients [T, N, H] and h0's gradient of a tanh or relu RNN (the
    activation's derivative is read off the hidden sequence: no pre-activation is needed)."""
    t_len, n, hidden = d.h.shape
    slope = (d.h > 0).to(d.h.dtype) if relu else 1 - d.h * d.h
    dz = torch.empty_like(slope)
    dzs, slopes = d.steps(dz), d.steps(slope)
    d_outs = None if d.d_out is None else d.steps(d.d_out)
    w_hh_d = w_hh
    dh = d.last_grad()
    if dh is None:
        dh = dz.new_zeros(n, hidden)
    for k in range(t_len - 1, -1, -1):
        if k < t_len - 1:
            dh = (
                torch.mm(dzs[k + 1], w_hh_d)
                if d_outs is None
                else (torch.addmm(d_outs[k], dzs[k + 1], w_hh_d))
            )
        torch.mul(dh, slopes[k], out=dzs[k])
    return dz, torch.mm(dzs[0], w_hh_d)


def _record(record: Record, trainable, names, x, h_prev, d_in, d_rec) -> None:
    """Per-sample squared norms of one direction's parameters: weight_ih from (x, d_in),
    weight_hh from (h_prev, d_rec), bias_ih from d_in and bias_hh from d_rec summed over time."""
    grams: dict[int, Tensor] = {}
    done: dict[int, Tensor] = {}
    pairs = [(x, d_in), (h_prev, d_rec), (None, d_in), (None, d_rec)]
    for name, (a, g) in zip(names, pairs):
        if name not in trainable:
            continue
        if a is None:
            if id(g) not in done:
                done[id(g)] = squared_norms(g.sum(dim=0))
            record(name, done[id(g)])
        else:
            record(name, _weight_sq_norms(a, g, grams))


def _weight_sq_norms(a: Tensor, g: Tensor, grams: dict[int, Tensor]) -> Tensor:
    """float64 [N]: squared norms of sum_t g_t a_t^T per sample, for a [T, N, p], g [T, N, q]
    time-major; by the Gram identity or materialised, whichever costs fewer flops. ``grams``
    caches g's per-sample Gram matrices (shared by the input and recurrent weights)."""
    t_len, _, p = a.shape
    q = g.shape[2]
    a_n, g_n = a.transpose(0, 1), g.transpose(0, 1)  # [N, T, .]
    if t_len == 1:
        return squared_norms(a[0]) * squared_norms(g[0])
    if use_ghost(t_len * t_len * (p + q), t_len * p * q):
        if id(g) not in grams:
            grams[id(g)] = torch.bmm(g_n, g_n.transpose(1, 2)).flatten(1)
        gram_a = torch.bmm(a_n, a_n.transpose(1, 2)).flatten(1)
        return torch.linalg.vecdot(gram_a, grams[id(g)]).double()
    return squared_norms(torch.bmm(g_n.transpose(1, 2), a_n))


class RecurrentComposite(Composite):
    """The engine's composite rule for nn.LSTM / nn.GRU / nn.RNN (see :mod:`.composite`): the
    module's forward by :func:`recurrent_forward`, whose backward adds the norms."""

    def forward(self, module: nn.RNNBase, ctx: CompositeContext, input, hx=None):
        why = unsupported(module, input, hx)
        if why is not None:
            ctx.fallback(why)
        first = 0 if module.batch_first else 1
        states = [] if hx is None else list(hx) if isinstance(hx, tuple) else [hx]
        for tensor, dim in [(input, first)] + [(s, 1) for s in states]:
            ctx.batch(tensor, dim)
        # a tensor made for the purpose, passed to the autograd function: the engine
        # differentiates against it, so the backward runs even where nothing upstream requires
        # grad (it would stop at this module's outputs) or where upstream is not on the path to
        # what the engine differentiates against otherwise
        anchor = input.new_zeros((), requires_grad=True).view(())
        ctx.on_grad(anchor, lambda grad: None)
        out, state = recurrent_forward(module, input, hx, ctx.add, anchor)
        for tensor, dim in [(out, first)] + [(s, 1) for s in _leaves(state)]:
            ctx.batch(tensor, dim)
        return out, state


def _leaves(state) -> list[Tensor]:
    return list(state) if isinstance(state, tuple) else [state]


@register
def _recurrent_composite(module: nn.Module) -> Composite | None:
    if isinstance(module, nn.RNNBase) and unsupported(module) is None:
        return RecurrentComposite()
    return None
