"""BADGE (Ash et al., ICLR 2020): k-means++ seeding over gradient embeddings.

Gradient embedding of a candidate ``x`` (``p = softmax(logits)``, ``yhat = argmax p``,
``h = model.embed(x)`` the penultimate features [d]):

    g(x) = (p - e_yhat) (x) h,   flattened class-major to [C * d],

the gradient of ``CE(W h + b, yhat)`` w.r.t. the last linear layer's weight ``W`` [C, d]. As in
the published code (JordanAsh/badge, ``get_grad_embedding``) the bias gradient is left out, and
the published sign (``e_yhat - p``) is flipped, which changes no distance.

Selection, as the published ``init_centers``: the first centre is the candidate with the largest
``||g||``; each next one is drawn with probability proportional to ``D^2``, its squared distance
to the nearest chosen centre, never re-picking a chosen one. All from the factors, never building
the [M, C * d] matrix: ``||g_i||^2 = ||u_i||^2 ||h_i||^2``, ``<g_i, g_j> = <u_i, u_j> <h_i, h_j>``
and ``||g_i - g_j||^2 = ||g_i||^2 + ||g_j||^2 - 2 <g_i, g_j>`` clamped at 0, in float64.

Deviation: if every unchosen candidate is at distance 0 from the centres (all ``D^2 = 0``; the
published code stops in the debugger there), the next one is drawn uniformly among the unchosen.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import STRATEGIES, SelectionContext, Strategy
from .common import features, probabilities


def badge_embeddings_factors(
    probs: torch.Tensor | np.ndarray, feats: torch.Tensor | np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two factors of the gradient embeddings, ``g_i = u_i (x) h_i``.

    Parameters
    ----------
    probs : [N, C] softmax probabilities.
    feats : [N, d] (or [N, ...], flattened) penultimate-layer features.

    Returns
    -------
    u : float64 [N, C], ``p - onehot(argmax p)`` (ties: the first class).
    h : float64 [N, d], the features. Both on the device of ``probs`` / ``feats``.
    """
    p = torch.as_tensor(probs).to(torch.float64)
    h = torch.as_tensor(feats).to(device=p.device, dtype=torch.float64)
    h = h.reshape(len(h), -1)
    if p.dim() != 2 or len(p) != len(h):
        raise ValueError(f"expected probs [N, C] and feats [N, d], got {p.shape} and {h.shape}")
    u = p.clone()
    rows = torch.arange(len(p), device=p.device)
    u[rows, p.argmax(dim=1)] -= 1.0
    return u, h


def gradient_sq_norms(u: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """[N] ``||g_i||^2 = ||u_i||^2 ||h_i||^2``."""
    return (u * u).sum(dim=1) * (h * h).sum(dim=1)


def gradient_sq_dists_to(
    u: torch.Tensor, h: torch.Tensor, j: int | torch.Tensor, sq_norms: torch.Tensor | None = None
) -> torch.Tensor:
    """[N] squared distances ``||g_i - g_j||^2`` from every embedding to embedding ``j``.

    ``sq_norms`` : :func:`gradient_sq_norms` of ``(u, h)``, if already computed.
    """
    sq = gradient_sq_norms(u, h) if sq_norms is None else sq_norms
    idx = torch.as_tensor(j, device=u.device).reshape(1)
    inner = (u @ u[idx].T).squeeze(1) * (h @ h[idx].T).squeeze(1)
    return (sq + sq[idx] - 2.0 * inner).clamp_min_(0.0)


def _draw(weights: np.ndarray, rng: np.random.Generator) -> int:
    """One index drawn with probability ``weights / weights.sum()`` (weights >= 0, sum > 0).

    Inverse CDF on a sequential float64 cumsum: an index of weight 0 can never be returned (its
    cdf equals its predecessor's), and ``u * total < total`` for ``u < 1``."""
    cdf = np.cumsum(weights)
    return int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))


def kmeans_pp_factorised(
    u: torch.Tensor, h: torch.Tensor, k: int, rng: np.random.Generator
) -> np.ndarray:
    """BADGE's k-means++ seeding over ``g_i = u_i (x) h_i``: int64 [k] positions, in pick order.

    First the largest ``||g||`` (ties: the first position), then ``k - 1`` draws with probability
    proportional to ``D^2`` (squared distance to the nearest chosen centre) from ``rng``; chosen
    positions get weight 0. If all remaining weights are 0, uniform over the unchosen.
    Memory: [N] per step on the device of ``u`` (plus an [N] copy on the CPU for the draw).
    """
    n = len(u)
    if not 0 <= k <= n:
        raise ValueError(f"cannot pick {k} of {n} candidates")
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    sq = gradient_sq_norms(u, h)
    chosen = [int(torch.argmax(sq))]  # torch.argmax returns the first maximal position
    taken = np.zeros(n, dtype=bool)
    taken[chosen[0]] = True
    min_d2 = gradient_sq_dists_to(u, h, chosen[0], sq)
    while len(chosen) < k:
        w = min_d2.cpu().numpy().copy()
        w[taken] = 0.0  # exactly 0, whatever the rounding of a point's distance to itself
        if not w.sum() > 0:
            w = (~taken).astype(np.float64)
        c = _draw(w, rng)
        chosen.append(c)
        taken[c] = True
        min_d2 = torch.minimum(min_d2, gradient_sq_dists_to(u, h, c, sq))
    return np.asarray(chosen, dtype=np.int64)


@STRATEGIES.register("badge")
class BadgeStrategy(Strategy):
    """BADGE: k-means++ seeding over the candidates' gradient embeddings (model in eval mode)."""

    def select(self, ctx: SelectionContext, k: int) -> np.ndarray:
        probs = probabilities(ctx).to(ctx.device)
        feats = features(ctx, ctx.candidates).to(ctx.device)
        u, h = badge_embeddings_factors(probs, feats)
        return ctx.candidates[kmeans_pp_factorised(u, h, k, ctx.rng)]
