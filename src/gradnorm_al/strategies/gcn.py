"""Sequential GCN selection (Caramalau, Bhattarai & Kim, CVPR 2021, "Sequential Graph Convolutional
Network for Active Learning"): ``uncertain-gcn`` and ``core-gcn``.

Each selection builds one graph whose nodes are the candidates followed by the labelled samples
(the published code's order), trains a small graph convolutional network (GCN) on it to tell
labelled nodes (target 1) from unlabelled ones (target 0), and selects with it:

* ``uncertain-gcn``: the candidates whose GCN score ``s = sigmoid(output)`` is closest to
  ``s_margin``, i.e. the ``k`` largest ``-|s - s_margin|`` (:func:`uncertain_gcn_scores`).
* ``core-gcn``: k-center greedy (:func:`gradnorm_al.strategies.coreset.k_center_greedy`, the
  labelled nodes as the initial centres) on the GCN's node features ``[h | z]``: the hidden layer
  ``h`` (eval mode, so no dropout) concatenated with the pre-sigmoid output ``z``, the third output
  of the published ``GCN.forward`` that the published CoreGCN uses since its April 2021 fix
  (before it, the published code ran k-center greedy on the normalised backbone features).

Published facts this follows (razvancaramalau/Sequential-GCN-for-Active-Learning):

* node inputs: the task model's penultimate features (eval mode), L2-normalised per node:
  ``x_i = f_i / ||f_i||``;
* adjacency (:func:`gcn_adjacency`): ``S = X X^T - I``, ``d_j = sum_i S_ij`` (column sums; ``S`` is
  symmetric, so these are also its row sums), ``A = S diag(1/d) + I``, i.e.
  ``A_ij = S_ij / d_j + [i = j]``;
* network (:class:`SequentialGCN`): ``h = dropout(relu(A X W1 + b1))``, ``z = A h W2 + b2``,
  ``s = sigmoid(z)``; ``W1`` is [d, hidden], ``W2`` is [hidden, 1]. (The published class also
  builds a hidden->hidden graph layer and a linear layer that its forward never uses; they are left
  out.) Parameters initialised uniform in ``±1/sqrt(fan_out)`` as published;
* loss (:func:`gcn_bce_loss`): ``-mean_{i in L} log s_i - lambda * mean_{j in U} log(1 - s_j)``;
* training: full graph, ``steps`` Adam steps (lr 1e-3, weight decay 5e-4), dropout active;
* defaults: hidden 128, dropout 0.3, lambda 1.2, s_margin 0.1, 200 steps; the published code
  builds each graph from a random subset of 10,000 unlabelled samples plus all labelled ones.

Memory: the adjacency is a DENSE ``N x N`` matrix over ``N = L + M`` nodes (L labelled, M candidate
nodes), float32 on the context's device: ``4 N^2`` bytes, about 0.48 GB for the published 10,000
candidates + 1,000 labelled, 1.6 GB for N = 20,000 and 10 GB for N = 50,000 (a whole CIFAR pool).
It is built in place (one N x N buffer) and training keeps no second copy (measured: peak 1.02 x
``4 N^2`` bytes for N = 6,000 on the CPU); the GCN's own activations are O(N * hidden). Bound N
with the loop's candidate subset (``subset_size``) or with this strategy's ``max_candidates`` (a
random subset, drawn from ``ctx.rng``, of the candidates it is given; the published value is
10,000). Each training step multiplies by the N x N matrix once per layer forward and once per layer
backward: about ``2 N^2 (hidden + 1)`` multiply-adds per step.

Numerics: the published loss takes logs of sigmoid outputs; here the same quantity is computed from
the pre-sigmoid output with ``logsigmoid`` (``log s = logsigmoid(z)``, ``log(1 - s) =
logsigmoid(-z)``), which is identical in exact arithmetic and stays finite when ``s`` saturates.
Where a column sum ``d_j`` is exactly 0 (a node orthogonal to every other node) the published
division would give NaN; that column of ``S`` is all zero, so it is left zero (the node keeps only
its self-loop).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..options import NonNegativeFloat, PositiveFloat, PositiveInt, Range
from .base import STRATEGIES, SelectionContext, Strategy, top_k
from .common import features, seeded_torch
from .samplers import k_center_greedy

# Published defaults (main.py arguments and config.py of the published code).
DEFAULT_HIDDEN = 128
DEFAULT_DROPOUT = 0.3
DEFAULT_LR = 1e-3
DEFAULT_WEIGHT_DECAY = 5e-4
DEFAULT_STEPS = 200
DEFAULT_LAMBDA_LOSS = 1.2
DEFAULT_S_MARGIN = 0.1
#: The published number of unlabelled nodes per graph (its SUBSET); not our default (module doc).
PUBLISHED_MAX_CANDIDATES = 10_000


def gcn_adjacency(feats: torch.Tensor) -> torch.Tensor:
    """The published normalised adjacency of the graph over the rows of ``feats``.

    Parameters
    ----------
    feats : [N, d] node features (any scale: each row is L2-normalised here first).

    Returns
    -------
    [N, N] ``A = S diag(1/d) + I`` with ``X`` the row-normalised features, ``S = X X^T - I`` and
    ``d_j = sum_i S_ij``: ``A_ij = S_ij / d_j + [i = j]``. Each column of ``A - I`` sums to 1
    (``A`` itself is not symmetric). A column with ``d_j = 0`` keeps ``S``'s values (all zero when
    row j is orthogonal to the others) instead of dividing by zero. Same dtype and device as
    ``feats``; dense, so ``N^2`` elements.
    """
    x = F.normalize(feats.flatten(1), dim=1)
    adj = x @ x.T
    adj.diagonal().sub_(1.0)
    col_sums = adj.sum(dim=0)
    col_sums = torch.where(col_sums == 0, torch.ones_like(col_sums), col_sums)
    adj.div_(col_sums[None, :])
    adj.diagonal().add_(1.0)
    return adj


class GraphConvolution(nn.Module):
    """One graph convolution (Kipf & Welling 2017): ``adj @ (x @ weight) + bias``.

    ``weight`` [in, out] and ``bias`` [out] start uniform in ``±1/sqrt(out)`` as published."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.empty(out_features))
        bound = 1.0 / math.sqrt(out_features)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        return adj @ (x @ self.weight) + self.bias


class SequentialGCN(nn.Module):
    """The published two-layer GCN scoring "labelled-ness" of every node.

    ``forward(x [N, d], adj [N, N])`` returns ``(scores [N], hidden [N, hidden], logits [N])`` with
    ``hidden = dropout(relu(gc1(x, adj)))``, ``logits = gc2(hidden, adj)`` and
    ``scores = sigmoid(logits)``."""

    def __init__(
        self, in_features: int, hidden: int = DEFAULT_HIDDEN, dropout: float = DEFAULT_DROPOUT
    ) -> None:
        super().__init__()
        self.gc1 = GraphConvolution(in_features, hidden)
        self.gc2 = GraphConvolution(hidden, 1)
        self.dropout = dropout

    def forward(
        self, x: torch.Tensor, adj: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden = F.dropout(F.relu(self.gc1(x, adj)), self.dropout, training=self.training)
        logits = self.gc2(hidden, adj).squeeze(1)
        return torch.sigmoid(logits), hidden, logits


def gcn_bce_loss(
    logits: torch.Tensor, labeled_mask: torch.Tensor, lambda_loss: float = DEFAULT_LAMBDA_LOSS
) -> torch.Tensor:
    """The published weighted binary cross-entropy of labelled (1) vs unlabelled (0) nodes.

    ``logits`` [N] pre-sigmoid outputs, ``labeled_mask`` bool [N] (at least one True and one
    False). With ``s = sigmoid(logits)``:
    ``-mean_{i labelled} log s_i - lambda_loss * mean_{j unlabelled} log(1 - s_j)`` (a scalar),
    computed as ``logsigmoid(z)`` and ``logsigmoid(-z)`` for stability.
    """
    labeled_mask = labeled_mask.to(torch.bool)
    return (
        -F.logsigmoid(logits[labeled_mask]).mean()
        - lambda_loss * F.logsigmoid(-logits[~labeled_mask]).mean()
    )


def train_gcn(
    x: torch.Tensor,
    adj: torch.Tensor,
    labeled_mask: torch.Tensor,
    *,
    hidden: int = DEFAULT_HIDDEN,
    dropout: float = DEFAULT_DROPOUT,
    lr: float = DEFAULT_LR,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    steps: int = DEFAULT_STEPS,
    lambda_loss: float = DEFAULT_LAMBDA_LOSS,
) -> tuple[SequentialGCN, list[float]]:
    """Train a fresh :class:`SequentialGCN` on the whole graph; returns it (eval mode) and the
    loss before each of the ``steps`` Adam steps.

    ``x`` [N, d] node inputs, ``adj`` [N, N] (:func:`gcn_adjacency`), ``labeled_mask`` bool [N].
    The network is built on ``x``'s device and dtype; its initialisation and dropout draw from
    torch's global generators, so seed them (:func:`gradnorm_al.strategies.common.seeded_torch`).
    """
    gcn = SequentialGCN(x.shape[1], hidden, dropout).to(device=x.device, dtype=x.dtype)
    mask = labeled_mask.to(device=x.device, dtype=torch.bool)
    # Adam's weight_decay adds weight_decay * w to the gradient (L2), like the published optimiser.
    opt = torch.optim.Adam(gcn.parameters(), lr=lr, weight_decay=weight_decay)
    losses = []
    gcn.train()
    for _ in range(steps):
        opt.zero_grad()
        _, _, logits = gcn(x, adj)
        loss = gcn_bce_loss(logits, mask, lambda_loss)
        loss.backward()
        opt.step()
        losses.append(loss.detach())  # one host sync at the end, not one per step
    gcn.eval()
    return gcn, torch.stack(losses).cpu().tolist() if losses else []


def uncertain_gcn_scores(
    scores: torch.Tensor | np.ndarray, s_margin: float = DEFAULT_S_MARGIN
) -> np.ndarray:
    """UncertainGCN's utility of each candidate: float64 [M] ``-|s - s_margin|`` from GCN scores
    ``s`` [M] in [0, 1]; the top-K of it are the ``k`` scores closest to the margin (the published
    code sorts ``|s - s_margin|`` in descending order and takes the last ``k``)."""
    s = torch.as_tensor(scores).detach().to("cpu", torch.float64).reshape(-1)
    return (-(s - s_margin).abs()).numpy()


@dataclass(eq=False)
class _SequentialGCNStrategy(Strategy):
    """Shared part of uncertain-gcn and core-gcn: build the graph, train the GCN.

    The hyper-parameters are the fields (the constructor's keywords), declared once with their
    constraints, which ``create_strategy`` checks."""

    _label = "gcn"
    dense_reason = (
        "not implemented for dense tasks: the published method builds its graph from a "
        "classifier's penultimate features, and pooled segmentation features are untested here "
        "(core-set uses them)"
    )

    hidden: PositiveInt = DEFAULT_HIDDEN
    dropout: Annotated[float, Range(ge=0.0, lt=1.0)] = DEFAULT_DROPOUT
    lr: PositiveFloat = DEFAULT_LR
    weight_decay: NonNegativeFloat = DEFAULT_WEIGHT_DECAY
    steps: PositiveInt = DEFAULT_STEPS
    lambda_loss: NonNegativeFloat = DEFAULT_LAMBDA_LOSS
    max_candidates: PositiveInt | None = None  # None: every candidate

    def fit_graph(
        self, ctx: SelectionContext, k: int
    ) -> tuple[np.ndarray, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Build the graph and train the GCN on it.

        Returns ``(nodes, scores, hidden, logits)``: ``nodes`` int64 [M' + L] pool indices of the
        graph's nodes (``ctx.candidates``, or the sorted random subset of ``max_candidates`` of
        them, then ``ctx.labeled``), and per node the eval-mode GCN score [M' + L], hidden features
        [M' + L, hidden] and pre-sigmoid output [M' + L], on ``ctx.device``."""
        labeled = np.asarray(ctx.labeled, dtype=np.int64)
        if len(labeled) == 0:
            raise ConfigError(
                f"{self._label} trains a GCN to tell labelled from unlabelled samples, but there "
                "are no labelled samples; start with a non-empty labelled pool"
            )
        cand = np.asarray(ctx.candidates, dtype=np.int64)
        if self.max_candidates is not None and self.max_candidates < len(cand):
            if self.max_candidates < k:
                raise ConfigError(
                    f"{self._label} max_candidates {self.max_candidates} is smaller than the "
                    f"budget {k}; raise max_candidates or lower the budget"
                )
            cand = np.sort(ctx.rng.choice(cand, size=self.max_candidates, replace=False))
        nodes = np.concatenate([cand, labeled])
        seed = int(ctx.rng.integers(0, 2**63 - 1))
        # float32 as published: halves the dense adjacency's memory compared with float64
        x = F.normalize(features(ctx, nodes).to(ctx.device, torch.float32).flatten(1), dim=1)
        adj = gcn_adjacency(x)
        mask = torch.zeros(len(nodes), dtype=torch.bool, device=ctx.device)
        mask[len(cand) :] = True
        # seeded from ctx.rng: the GCN's initialisation and dropout repeat for the same context,
        # and the caller's torch random stream is restored afterwards
        with seeded_torch(ctx.device, seed):
            gcn, _ = train_gcn(
                x,
                adj,
                mask,
                hidden=self.hidden,
                dropout=self.dropout,
                lr=self.lr,
                weight_decay=self.weight_decay,
                steps=self.steps,
                lambda_loss=self.lambda_loss,
            )
        with torch.no_grad():
            scores, hidden, logits = gcn(x, adj)
        return nodes, scores, hidden, logits


@STRATEGIES.register("uncertain-gcn")
@dataclass(eq=False)
class UncertainGCNStrategy(_SequentialGCNStrategy):
    """UncertainGCN: the candidates whose labelled-vs-unlabelled GCN score is closest to
    ``s_margin``."""

    _label = "uncertain-gcn"

    s_margin: Annotated[float, Range(ge=0.0, le=1.0)] = DEFAULT_S_MARGIN  # a sigmoid score

    def select(self, ctx: SelectionContext, k: int) -> np.ndarray:
        nodes, scores, _, _ = self.fit_graph(ctx, k)
        m = len(nodes) - len(ctx.labeled)
        return top_k(uncertain_gcn_scores(scores[:m], self.s_margin), nodes[:m], k)


@STRATEGIES.register("core-gcn")
class CoreGCNStrategy(_SequentialGCNStrategy):
    """CoreGCN: k-center greedy on the GCN's node features, labelled nodes as initial centres."""

    _label = "core-gcn"

    def select(self, ctx: SelectionContext, k: int) -> np.ndarray:
        nodes, _, hidden, logits = self.fit_graph(ctx, k)
        m = len(nodes) - len(ctx.labeled)
        # [h | z]: the published CoreGCN's features (its GCN's third output)
        feats = torch.cat([hidden, logits[:, None]], dim=1)
        pos = k_center_greedy(feats[:m], feats[m:], k, rng=ctx.rng)
        return nodes[:m][pos]
