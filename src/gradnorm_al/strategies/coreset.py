"""Core-set selection (Sener & Savarese, ICLR 2018), the k-center greedy version.

In the penultimate-layer feature space (``model.embed``, eval mode), with the labelled samples as
the initial centres, repeat ``k`` times: pick the candidate farthest from its nearest centre,
``argmax_j min_i ||f_j - f_i||``, and make it a centre. (The paper's robust MIP refinement is not
implemented; the greedy version is the 2-approximation the paper and most re-implementations use.)

Distances: exact Euclidean, computed in float64 on the context's device through
``||a - b||^2 = ||a||^2 + ||b||^2 - 2 <a, b>`` clamped at 0. float64 keeps the cancellation error
of that expansion around 1e-16 of the squared norms (float32 would leave ~1e-7, enough to reorder
near-ties), and one dtype on every device makes cpu and cuda pick the same samples up to rounding.
Squared distances are compared directly (the square root is monotone, so the argmax is the same).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ConfigError
from .base import STRATEGIES, SelectionContext, Strategy
from .common import features

#: Rows per side of one block of pairwise distances: at most ``chunk_size x chunk_size`` floats
#: (2048^2 float64 = 32 MiB) exist at once when measuring candidates against labelled samples.
DEFAULT_CHUNK_SIZE = 2048


def _sq_dists(a: torch.Tensor, b: torch.Tensor, a_sq: torch.Tensor, b_sq: torch.Tensor):
    """[n, m] squared Euclidean distances between the rows of ``a`` [n, d] and ``b`` [m, d],
    given their squared norms ``a_sq`` [n] and ``b_sq`` [m]; clamped at 0 (rounding)."""
    return (a_sq[:, None] + b_sq[None, :] - 2.0 * (a @ b.T)).clamp_min_(0.0)


def min_sq_dists(
    points: torch.Tensor, centres: torch.Tensor, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> torch.Tensor:
    """[M] squared distance from each row of ``points`` [M, d] to its nearest row of ``centres``
    [L, d], L >= 1, computed in ``chunk_size x chunk_size`` blocks (never an M x L matrix).

    Both must have the same dtype and device; the result is on that device.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    if len(centres) == 0:
        raise ValueError("min_sq_dists needs at least one centre")
    p_sq = (points * points).sum(dim=1)
    c_sq = (centres * centres).sum(dim=1)
    out = torch.empty(len(points), dtype=points.dtype, device=points.device)
    for i in range(0, len(points), chunk_size):
        rows = slice(i, i + chunk_size)
        best = None
        for j in range(0, len(centres), chunk_size):
            cols = slice(j, j + chunk_size)
            block = _sq_dists(points[rows], centres[cols], p_sq[rows], c_sq[cols])
            nearest = block.min(dim=1).values
            best = nearest if best is None else torch.minimum(best, nearest)
        out[rows] = best
    return out


def k_center_greedy(
    candidate_feats: torch.Tensor | np.ndarray,
    center_feats: torch.Tensor | np.ndarray | None,
    k: int,
    *,
    rng: np.random.Generator | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> np.ndarray:
    """Greedy k-center selection: int64 [k] positions into ``candidate_feats``, in pick order.

    Parameters
    ----------
    candidate_feats : [M, d] features of the points to choose from. The computation runs in
        float64 on this tensor's device.
    center_feats : [L, d] features of the points already covered (the labelled set), or None /
        L = 0 for none.
    k : how many to pick, 0 <= k <= M.
    rng : picks the first point uniformly (``rng.integers(M)``) when there are no centres;
        required then, unused otherwise.
    chunk_size : block size of the candidate x centre distance computation.

    Each step picks ``argmax_j min_c ||x_j - x_c||`` over the centres so far (ties: the first
    position) and adds it to the centres, updating the [M] minimum distances with its distances
    only. Picked points are excluded explicitly, so duplicated features never cause a repeat.
    """
    x = torch.as_tensor(candidate_feats).to(torch.float64)
    x = x.flatten(1) if x.dim() > 1 else x.reshape(len(x), -1)
    m = len(x)
    if not 0 <= k <= m:
        raise ValueError(f"cannot pick {k} of {m} candidates")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    x_sq = (x * x).sum(dim=1)
    chosen: list[torch.Tensor] = []

    def dists_to(c: torch.Tensor) -> torch.Tensor:
        # [M] squared distances to the candidate at position c (a 1-element index tensor)
        return (x_sq + x_sq[c] - 2.0 * (x @ x[c].T).squeeze(1)).clamp_min_(0.0)

    has_centres = center_feats is not None and len(center_feats) > 0
    if has_centres:
        centres = torch.as_tensor(center_feats).to(device=x.device, dtype=torch.float64)
        min_d = min_sq_dists(x, centres.reshape(len(centres), -1), chunk_size=chunk_size)
    else:
        if rng is None:
            raise ValueError("no centres to start from: pass rng to draw the first point")
        first = torch.tensor([int(rng.integers(m))], device=x.device)
        chosen.append(first)
        min_d = dists_to(first)
        min_d.index_fill_(0, first, -1.0)
    while len(chosen) < k:
        # kept on the device as a 1-element tensor: no host sync per step
        c = torch.argmax(min_d).reshape(1)  # first maximal position on ties
        chosen.append(c)
        min_d = torch.minimum(min_d, dists_to(c))
        min_d.index_fill_(0, c, -1.0)  # below every distance: never picked again
    return torch.cat(chosen).cpu().numpy().astype(np.int64)


@STRATEGIES.register("core-set")
class CoreSetStrategy(Strategy):
    """Core-set (k-center greedy) over penultimate-layer features of labelled + candidates."""

    def __init__(self, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ConfigError(
                f"core-set chunk_size must be a positive integer, got {chunk_size!r}; "
                f"use e.g. {DEFAULT_CHUNK_SIZE}"
            )
        self.chunk_size = chunk_size

    def select(self, ctx: SelectionContext, k: int) -> np.ndarray:
        cand = features(ctx, ctx.candidates).to(ctx.device, torch.float64)
        lab = features(ctx, ctx.labeled).to(ctx.device, torch.float64) if len(ctx.labeled) else None
        pos = k_center_greedy(cand, lab, k, rng=ctx.rng, chunk_size=self.chunk_size)
        return ctx.candidates[pos]
