"""Batched per-sample gradient norms of nn.LSTM / nn.GRU / nn.RNN (pergrad/recurrent.py): exact
against one backward per sample, standalone and through the engine."""

from __future__ import annotations

import copy
import itertools
import warnings

import pytest
import torch
from conftest import engine_against_loop
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from gradnorm_al.pergrad import (
    FallbackWarning,
    per_sample_grad_norms,
    per_sample_grad_norms_loop,
)
from gradnorm_al.pergrad.recurrent import recurrent_forward
from gradnorm_al.strategies import entropy_loss

EXACT = 1e-9  # float64, relative L2 over the whole result
FLOAT32 = 1e-4
CELLS = {
    "LSTM": lambda *a, **k: nn.LSTM(*a, **k),
    "GRU": lambda *a, **k: nn.GRU(*a, **k),
    "RNN-tanh": lambda *a, **k: nn.RNN(*a, nonlinearity="tanh", **k),
    "RNN-relu": lambda *a, **k: nn.RNN(*a, nonlinearity="relu", **k),
}
LAYOUTS = list(itertools.product([1, 2], [False, True], [False, True]))  # layers, bidir, b_first
T, E, H = 5, 3, 4


def _rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative L2 difference over the whole tensor (0 where both are exactly zero)."""
    diff = (ours - ref).norm().item()
    return diff / ref.norm().item() if diff else 0.0


def _initial(rnn: nn.RNNBase, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    shape = (rnn.num_layers * (2 if rnn.bidirectional else 1), n, rnn.hidden_size)
    h0 = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
    if isinstance(rnn, nn.LSTM):
        return h0, torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
    return h0


def _loss(out, state, batch_first: bool, only_h: bool) -> torch.Tensor:
    """A per-sample loss [N] reading the output sequence, h_n and (LSTM) c_n, or h_n only."""
    h_n = state[0] if isinstance(state, tuple) else state
    loss = h_n.sin().sum(dim=(0, 2))
    if only_h:
        return loss
    seq = out if batch_first else out.transpose(0, 1)
    weights = torch.linspace(-1, 1, seq.shape[1] * seq.shape[2], dtype=seq.dtype)
    loss = loss + (seq.tanh() * weights.view(seq.shape[1:])).sum(dim=(1, 2))
    if isinstance(state, tuple):
        loss = loss + state[1].pow(2).sum(dim=(0, 2))
    return loss


# ------------------------------------------------------------------------------- standalone
# (bias, initial state given, only h_n used)
VARIANTS = [(True, False, False), (False, True, False), (True, True, True)]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda c: "-".join(str(int(v)) for v in c))
@pytest.mark.parametrize("cell", list(CELLS))
def test_recurrent_forward_records_exact_norms_and_passes_gradients_on(cell, layout):
    layers, bidirectional, batch_first = layout
    n = 3
    for seed, (bias, given, only_h) in enumerate(VARIANTS):
        torch.manual_seed(seed)
        rnn = CELLS[cell](
            E, H, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first, bias=bias
        ).double()
        shape = (n, T, E) if batch_first else (T, n, E)
        x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        hx = _initial(rnn, n, seed) if given else None
        states = [] if hx is None else list(hx) if isinstance(hx, tuple) else [hx]
        params = dict(rnn.named_parameters())

        # reference: the stock module, one sample at a time, and the batch's input gradients
        rows = []
        for k in range(n):
            xk = x[k : k + 1] if batch_first else x[:, k : k + 1]
            hk = None
            if hx is not None:
                hk = (
                    tuple(s[:, k : k + 1] for s in states) if len(states) == 2 else hx[:, k : k + 1]
                )
            loss = _loss(*rnn(xk, hk), batch_first, only_h).sum()
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            rows.append([0.0 if g is None else g.pow(2).sum().item() for g in grads])
        ref = torch.tensor(rows, dtype=torch.float64)
        ref_inputs = torch.autograd.grad(
            _loss(*rnn(x, hx), batch_first, only_h).sum(), [x, *states]
        )

        got: dict[str, torch.Tensor] = {}
        out, state = recurrent_forward(rnn, x, hx, got.__setitem__)
        loss = _loss(out, state, batch_first, only_h).sum()
        inputs = torch.autograd.grad(loss, [x, *states])
        assert sorted(got) == sorted(params)
        ours = torch.stack([got[name] for name in params], dim=1)
        assert ours.dtype == torch.float64 and ours.shape == (n, len(params))
        assert _rel(ours, ref) < EXACT, (bias, given, only_h)
        for a, b in zip(inputs, ref_inputs):
            assert _rel(a, b) < EXACT, (bias, given, only_h)


def test_recurrent_forward_returns_what_the_module_returns():
    torch.manual_seed(0)
    for cell in CELLS:
        rnn = CELLS[cell](E, H, num_layers=2, bidirectional=True, batch_first=True)
        x = torch.randn(4, T, E)
        out, state = recurrent_forward(rnn, x, None, lambda name, sq: None)
        ref_out, ref_state = rnn(x)
        # the same kernels, one layer at a time: equal up to float rounding (a GEMM's blocking)
        torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-6)
        for a, b in zip(
            state if isinstance(state, tuple) else (state,),
            ref_state if isinstance(ref_state, tuple) else (ref_state,),
        ):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_frozen_parameters_are_not_recorded():
    torch.manual_seed(0)
    rnn = nn.GRU(E, H).double()
    rnn.weight_hh_l0.requires_grad_(False)
    got: dict[str, torch.Tensor] = {}
    out, h_n = recurrent_forward(
        rnn, torch.randn(T, 2, E, dtype=torch.float64), None, got.__setitem__
    )
    torch.autograd.grad(out.sum(), rnn.weight_ih_l0, allow_unused=True)
    assert sorted(got) == ["bias_hh_l0", "bias_ih_l0", "weight_ih_l0"]


# ------------------------------------------------------------------------- through the engine
class TextClassifier(nn.Module):
    """Token ids -> embedding -> recurrent layer -> linear head on the output sequence's mean
    and the last layer's final hidden state (``only_h``: the final hidden state alone)."""

    def __init__(self, cell, layers, bidirectional, batch_first, bias=True, only_h=False):
        super().__init__()
        self.batch_first, self.only_h = batch_first, only_h
        self.layers, self.directions = layers, 2 if bidirectional else 1
        self.inp = nn.Embedding(11, E)
        self.rnn = CELLS[cell](
            E, H, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first, bias=bias
        )
        width = H * self.directions * (1 if only_h else 2)
        self.fc = nn.Linear(width, 3)

    def forward(self, ids):
        h = self.inp(ids)
        if not self.batch_first:
            h = h.transpose(0, 1)
        out, state = self.rnn(h)
        hidden = state[0] if isinstance(state, tuple) else state
        last = hidden.view(self.layers, self.directions, -1, H)[-1].transpose(0, 1).flatten(1)
        if self.only_h:
            return self.fc(last)
        pooled = out.mean(dim=1 if self.batch_first else 0)
        return self.fc(torch.cat([pooled, last], dim=1))


class Features(nn.Module):
    """Float features straight into the recurrent layer (nothing upstream requires grad), an
    initial state computed from the input through a Linear, a head on the last output."""

    def __init__(self, cell, state: bool):
        super().__init__()
        self.state = state
        self.rnn = CELLS[cell](E, H, num_layers=2, batch_first=True)
        self.init = nn.Linear(E, H) if state else None
        self.fc = nn.Linear(H, 3)

    def forward(self, x):
        hx = None
        if self.state:
            h0 = torch.tanh(self.init(x[:, 0])).expand(2, -1, -1).contiguous()
            hx = (h0, torch.zeros_like(h0)) if isinstance(self.rnn, nn.LSTM) else h0
        out, _ = self.rnn(x, hx)
        return self.fc(out[:, -1])


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 11, (n, T), generator=torch.Generator().manual_seed(seed))


def _engine_vs_loop(model, x, warn: bool = False, chunk_size=None, rel: float = EXACT):
    return engine_against_loop(model, x, rel=rel, warn=warn, chunk_size=chunk_size)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda c: "-".join(str(int(v)) for v in c))
@pytest.mark.parametrize("cell", list(CELLS))
def test_engine_is_exact_without_fallback(cell, layout):
    layers, bidirectional, batch_first = layout
    torch.manual_seed(1)
    bias = not (layers == 2 and bidirectional)  # bias off in one layout per cell
    model = TextClassifier(cell, layers, bidirectional, batch_first, bias=bias).double()
    _engine_vs_loop(model, _ids(6))


@pytest.mark.parametrize("cell", list(CELLS))
def test_engine_is_exact_when_only_the_final_hidden_state_is_used(cell):
    torch.manual_seed(2)
    model = TextClassifier(cell, 2, True, True, only_h=True).double()
    _engine_vs_loop(model, _ids(5), chunk_size=2)  # chunks of 2, 2 and 1


@pytest.mark.parametrize("state", [False, True], ids=["no-state", "state-from-input"])
@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_engine_is_exact_for_a_first_layer_and_an_initial_state_from_the_input(cell, state):
    torch.manual_seed(3)
    model = Features(cell, state).double()
    x = torch.randn(4, T, E, dtype=torch.float64)
    _engine_vs_loop(model, x)


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_engine_float32_agrees_with_float64(cell):
    # against the float64 loop: oneDNN's float32 LSTM backward costs ~0.2 s a call on the CPU,
    # whatever the size, which one backward per sample would pay per sample
    torch.manual_seed(4)
    model = TextClassifier(cell, 2, True, True)
    ids = torch.randint(0, 11, (8, 12), generator=torch.Generator().manual_seed(4))
    ref = per_sample_grad_norms_loop(copy.deepcopy(model).double(), ids, entropy_loss, "l2")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        ours = per_sample_grad_norms(model, ids, entropy_loss, norm="l2")
    assert _rel(ours, ref) < FLOAT32


def test_frozen_recurrent_weights_get_zero_columns():
    torch.manual_seed(5)
    model = TextClassifier("LSTM", 1, False, True).double()
    model.rnn.weight_hh_l0.requires_grad_(False)
    _engine_vs_loop(model, _ids(4))


def test_proj_size_falls_back_loudly_and_stays_exact():
    torch.manual_seed(6)
    model = Features("LSTM", False).double()
    model.rnn = nn.LSTM(E, H, num_layers=2, proj_size=2, batch_first=True).double()
    model.fc = nn.Linear(2, 3).double()
    fallbacks = _engine_vs_loop(model, torch.randn(4, T, E, dtype=torch.float64), warn=True)
    assert any("LSTM" in m for m in fallbacks), fallbacks


class Packed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(E, H, batch_first=True)
        self.fc = nn.Linear(H, 3)

    def forward(self, x):
        lengths = torch.full((x.shape[0],), T)
        _, h_n = self.rnn(pack_padded_sequence(x, lengths, batch_first=True))
        return self.fc(h_n[-1])


def test_a_packed_sequence_falls_back_loudly_and_stays_exact():
    torch.manual_seed(7)
    fallbacks = _engine_vs_loop(
        Packed().double(), torch.randn(3, T, E, dtype=torch.float64), warn=True
    )
    assert any("PackedSequence" in m for m in fallbacks), fallbacks


class TimeAsBatch(nn.Module):
    """Feeds [N, T, E] to a sequence-first LSTM: the recurrence runs over the samples, which
    therefore interact; the engine must see that the batch is not where batch_first says."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(E, H)
        self.fc = nn.Linear(H, 3)

    def forward(self, x):
        return self.fc(self.rnn(x)[0].mean(dim=1))


def test_a_batch_where_batch_first_does_not_say_is_never_split_wrongly():
    torch.manual_seed(8)
    fallbacks = _engine_vs_loop(
        TimeAsBatch().double(), torch.randn(4, T, E, dtype=torch.float64), warn=True
    )
    assert any("whole model" in m for m in fallbacks), fallbacks


class Short(nn.Module):
    """Sequences of one step, the initial state passed by keyword, the final cell state used."""

    def __init__(self, cell: str) -> None:
        super().__init__()
        self.rnn = CELLS[cell](E, H, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(2 * H, 3)

    def forward(self, x):
        h0 = torch.tanh(x[:, :1].transpose(0, 1)).mean(dim=2, keepdim=True).expand(2, -1, H)
        hx = (h0, h0 * 0.5) if isinstance(self.rnn, nn.LSTM) else h0
        out, state = self.rnn(x, hx=hx)
        last = state[1] if isinstance(state, tuple) else state
        return self.fc(out[:, -1] + last.transpose(0, 1).flatten(1))


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_one_step_sequences_a_keyword_state_and_a_batch_of_one(cell, n):
    torch.manual_seed(9)
    _engine_vs_loop(Short(cell).double(), torch.randn(n, 1, E, dtype=torch.float64))


def test_recurrent_layers_run_without_cudnn_while_scored_and_the_flag_comes_back():
    """cuDNN's RNN backward refuses eval mode (seen on an H200: the loop and every fallback
    failed for an LSTM); under ``eval_mode`` recurrent forwards run with cuDNN off, the other
    layers with it on, and the flag is restored after each, an error included."""
    from gradnorm_al._torch import eval_mode

    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(torch.backends.cudnn.enabled)
            return x

    model = nn.Sequential(Probe(), nn.LSTM(E, H, batch_first=True))
    before = torch.backends.cudnn.enabled
    model[1].register_forward_hook(lambda m, a, out: seen.append(torch.backends.cudnn.enabled))
    with eval_mode(model):
        model(torch.randn(2, T, E))
        assert seen == [before, False]
        assert torch.backends.cudnn.enabled == before
        with pytest.raises(RuntimeError):
            model(torch.randn(2, T, E + 1))  # the LSTM raises mid-forward
        assert torch.backends.cudnn.enabled == before
    assert model.training  # modes restored
    model(torch.randn(2, T, E))  # outside: no hook left
    assert seen[-2:] == [before, before]
