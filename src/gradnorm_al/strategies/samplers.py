"""Samplers: how ``k`` candidates are picked, given per-candidate scores or none.

A strategy is a scorer composed with a sampler (``"SCORER@SAMPLER"`` on the command line and in
YAML, e.g. ``entropy-gradnorm@power``). Registered samplers:

* ``top-k`` (the default of every scorer): the ``k`` highest scores.
* ``k-center``: greedy k-center over penultimate-layer features (``model.embed``), the labelled
  samples as the initial centres (Sener & Savarese, ICLR 2018; the core-set strategy).
* ``kmeans++``: k-means++ seeding over BADGE's gradient embeddings (Ash et al., ICLR 2020; the
  badge strategy).
* ``softmax``, ``power``, ``soft-rank``: stochastic batch acquisition (Kirsch et al., TMLR 2023):
  draw ``k`` candidates without replacement with probability proportional to ``exp(beta * s)``,
  ``s ** beta`` or ``rank ** -beta`` (rank 1 = highest score), by the Gumbel-top-k trick.
* ``uniform``: ``k`` candidates uniformly without replacement (the random strategy).

With a scorer, ``k-center`` and ``kmeans++`` first keep the ``prefilter * k`` highest-scoring
candidates (default 10k) and diversify among them; alone (core-set, badge) they see every
candidate. Every random choice comes from the context's seeded ``rng``. Hyper-parameters are
declared once, on the constructors' signatures, and checked by ``create_strategy``.

Distances (k-center and k-means++) are exact Euclidean, in float64 on the context's device, through
``||a - b||^2 = ||a||^2 + ||b||^2 - 2 <a, b>`` clamped at 0: float64 keeps the cancellation error
around 1e-16 of the squared norms (float32 would leave ~1e-7, enough to reorder near-ties).

k-means++ over gradient embeddings (BADGE): with ``p = softmax(logits)``, ``yhat = argmax p`` and
``h = model.embed(x)``, ``g(x) = (p - e_yhat) (x) h``, the gradient of ``CE(W h + b, yhat)`` w.r.t.
the last linear layer's weight (bias left out and sign flipped, as in the published code; neither
changes a distance). The first centre is the candidate with the largest ``||g||``; each next one is
drawn with probability proportional to its squared distance to the nearest chosen centre, never
re-picking one. All from the factors, never building the [M, C * d] matrix:
``||g_i||^2 = ||u_i||^2 ||h_i||^2`` and ``<g_i, g_j> = <u_i, u_j> <h_i, h_j>``. If every unchosen
candidate is at distance 0 (the published code stops in the debugger there), the next one is drawn
uniformly among the unchosen.

Dense tasks (segmentation, a :class:`~gradnorm_al.models.DenseTaskModel`): ``k-center`` uses
``model.embed``, the feature map averaged over its positions [N, D]. For ``kmeans++`` the
embedding is still the gradient of the loss under the predicted labels w.r.t. the last layer's
weight, here the 1x1 convolution ``classifier`` [C, D]: the loss of an image is the task's
reduction (mean, sum or max over the pixels) of the per-pixel ``CE(z_q, yhat_q)``, ``z`` the
upsampled logits and ``yhat_q`` each pixel's argmax. The classifier runs before the bilinear
upsampling, which is linear, so ``G = sum_r delta_r (x) f_r`` over the feature-map positions
``r``, with ``f_r`` the features there and ``delta`` [C, h, w] the upsampling's adjoint applied to
the per-pixel ``w_q (p_q - e_yhat_q)`` (``w_q`` the reduction's weight of pixel q: ``1/(H W)``
for the mean, 1 for the sum, 1 at the arg-max pixel for the max, split evenly among tied maxima as
torch's ``amax`` does); :func:`dense_gradient_embeddings` gets ``delta`` by autograd on the
low-resolution logits, one batched pass. ``G`` is a sum of ``h w`` outer products, not one, so it
is held explicitly: float64 [M, C * D], ``8 C D`` bytes per candidate (DRN-D-22 on Cityscapes,
C = 19 and D = 512: 78 kB per image, 0.23 GB for the 2,975 training images, 0.78 GB for 10,000),
on the context's device; k-means++ then runs on it exactly (no approximation).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._torch import first_output
from ..errors import ConfigError
from ..options import PositiveFloat, PositiveInt, Range
from .base import SAMPLERS, Sampler, SelectionContext, top_k_positions
from .common import features, map_batches, probabilities

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


def _dense_classifier(model: nn.Module) -> nn.Conv2d:
    head = getattr(model, "classifier", None)
    if not (
        isinstance(head, nn.Conv2d)
        and head.kernel_size == (1, 1)
        and head.stride == (1, 1)
        and head.padding == (0, 0)
        and head.groups == 1
    ):
        raise ConfigError(
            f"badge on a dense task needs the model's last layer as a 1x1 convolution "
            f"`classifier` (see gradnorm_al.models.DenseTaskModel); {type(model).__name__} has "
            f"{type(head).__name__ if head is not None else 'none'}"
        )
    return head


def dense_gradient_embeddings(
    model: nn.Module, x: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """float64 [B, C, D]: per image of the batch ``x``, the gradient w.r.t. the weight of the
    1x1 convolution ``model.classifier`` (as [C, D]) of ``reduce(CE(z, yhat))``: the per-pixel
    cross-entropy [B, H, W] of the logits ``z = model(x)`` under each pixel's argmax, reduced to
    [B] by ``reduce`` (the task's reduction). See the module docs.

    One forward pass (model modes are the caller's), the classifier's input (features [B, D, h,
    w]) and output (logits [B, C, h, w]) taken by a forward hook; ``z`` must be the bilinear
    upsampling (``align_corners=False``) of those logits to the input size (the
    :class:`~gradnorm_al.models.DenseTaskModel` contract), which is checked against the model's
    output: ConfigError otherwise. The gradient is taken in float64.
    """
    head = _dense_classifier(model)
    seen: dict[str, torch.Tensor] = {}

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        seen["features"], seen["logits"] = inputs[0].detach(), output.detach()

    handle = head.register_forward_hook(hook)
    try:
        with torch.no_grad():
            out = first_output(model(x)).detach()
    finally:
        handle.remove()
    if "features" not in seen:
        raise ConfigError(
            f"badge: {type(model).__name__}.classifier was not called by the model's forward"
        )
    low = seen["logits"].double().requires_grad_()
    with torch.enable_grad():
        z = F.interpolate(low, size=out.shape[2:], mode="bilinear", align_corners=False)
        scale = out.detach().abs().amax().double().clamp_min(1.0)
        if z.shape != out.shape or (z.detach() - out.double()).abs().amax() > 1e-4 * scale:
            raise ConfigError(
                f"badge on a dense task needs logits = bilinear upsampling of "
                f"classifier(features) to the input size (the DenseTaskModel contract); "
                f"{type(model).__name__}'s output differs from it"
            )
        ce = F.cross_entropy(z, z.detach().argmax(dim=1), reduction="none")  # [B, H, W]
        (delta,) = torch.autograd.grad(reduce(ce).sum(), low)  # [B, C, h, w]
    feats = seen["features"].double()
    return torch.einsum("bcr,bdr->bcd", delta.flatten(2), feats.flatten(2))


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


def _prefiltered(scores: np.ndarray | None, k: int, prefilter: float) -> np.ndarray | None:
    """Positions of the ``ceil(prefilter * k)`` highest scores (in candidate order), or None for
    every candidate."""
    if scores is None:
        return None
    keep = min(len(scores), math.ceil(prefilter * k))
    if keep >= len(scores):
        return None
    return np.sort(top_k_positions(scores, keep))


#: at least as many candidates as the budget survive the prefilter
Prefilter = Annotated[float, Range(ge=1)]


@SAMPLERS.register("k-center")
class KCenterSampler(Sampler):
    """Greedy k-center over ``model.embed`` features; the labelled samples are the first centres.
    Dense models' ``embed`` is their feature map averaged over its positions."""

    name = "k-center"
    needs_scores = False
    supports_dense = True  # pooled features, one vector per image

    def __init__(self, chunk_size: PositiveInt = DEFAULT_CHUNK_SIZE, prefilter: Prefilter = 10.0):
        self.chunk_size, self.prefilter = chunk_size, prefilter

    def sample(self, ctx: SelectionContext, k: int, scores: np.ndarray | None) -> np.ndarray:
        keep = _prefiltered(scores, k, self.prefilter)
        rows = ctx.candidates if keep is None else ctx.candidates[keep]
        cand = features(ctx, rows).to(ctx.device, torch.float64)
        lab = features(ctx, ctx.labeled).to(ctx.device, torch.float64) if len(ctx.labeled) else None
        pos = k_center_greedy(cand, lab, k, rng=ctx.rng, chunk_size=self.chunk_size)
        return pos if keep is None else keep[pos]


@SAMPLERS.register("kmeans++")
class KMeansPPSampler(Sampler):
    """k-means++ seeding over the candidates' gradient embeddings (BADGE); for dense tasks the
    explicit [C * D] embeddings of :func:`dense_gradient_embeddings`."""

    name = "kmeans++"
    needs_scores = False
    supports_dense = True  # gradient of the reduced per-pixel loss w.r.t. the 1x1 classifier

    def __init__(self, prefilter: Prefilter = 10.0) -> None:
        self.prefilter = prefilter

    def sample(self, ctx: SelectionContext, k: int, scores: np.ndarray | None) -> np.ndarray:
        keep = _prefiltered(scores, k, self.prefilter)
        rows = ctx.candidates if keep is None else ctx.candidates[keep]
        if ctx.task is not None and ctx.task.dense:
            # explicit embeddings g [M, C * D]: k-means++ on g is the factorised one with h = 1
            embed = map_batches(
                ctx, rows, lambda x: dense_gradient_embeddings(ctx.model, x, ctx.reduce)
            )
            u = embed.flatten(1).to(ctx.device)
            h = torch.ones(len(u), 1, dtype=u.dtype, device=u.device)
        else:
            probs = probabilities(ctx, rows).to(ctx.device)
            feats = features(ctx, rows).to(ctx.device)
            u, h = badge_embeddings_factors(probs, feats)
        pos = kmeans_pp_factorised(u, h, k, ctx.rng)
        return pos if keep is None else keep[pos]


@SAMPLERS.register("uniform")
class UniformSampler(Sampler):
    """``k`` candidates uniformly without replacement (scores, if any, are ignored)."""

    name = "uniform"
    needs_scores = False
    supports_dense = True

    def sample(self, ctx: SelectionContext, k: int, scores: np.ndarray | None) -> np.ndarray:
        return ctx.rng.choice(len(ctx.candidates), size=k, replace=False)


STOCHASTIC = ("softmax", "power", "soft-rank")


def stochastic_log_weights(scores: np.ndarray, mode: str, beta: float) -> np.ndarray:
    """float64 [M] log sampling weights of stochastic batch acquisition (Kirsch et al. 2023).

    ``softmax``: ``beta * s``; ``power``: ``beta * log s`` (scores must be >= 0; a score of 0 gets
    weight 0); ``soft-rank``: ``-beta * log rank`` with rank 1 the highest score (ties: the earlier
    candidate ranks higher). NaN scores get weight 0.
    """
    s = np.asarray(scores, dtype=np.float64)
    nan = np.isnan(s)
    if mode == "softmax":
        logw = beta * np.where(nan, 0.0, s)
    elif mode == "power":
        if (s[~nan] < 0).any():
            raise ConfigError(
                "power sampling needs non-negative scores (weights s ** beta); this scorer gives "
                "negative ones: use softmax or soft-rank sampling"
            )
        with np.errstate(divide="ignore"):
            logw = beta * np.log(np.where(nan, 0.0, s))
    elif mode == "soft-rank":
        ranks = np.empty(len(s), dtype=np.float64)
        ranks[top_k_positions(s, len(s))] = np.arange(1, len(s) + 1)
        logw = -beta * np.log(ranks)
    else:
        raise ConfigError(f"unknown stochastic mode {mode!r}; use one of {', '.join(STOCHASTIC)}")
    return np.where(nan, -np.inf, logw)


def gumbel_top_k(log_weights: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` distinct positions drawn without replacement with probability proportional to
    ``exp(log_weights)`` (Gumbel-top-k); positions of weight 0 come last, in candidate order."""
    keys = log_weights + rng.gumbel(size=len(log_weights))
    return top_k_positions(keys, k)


class StochasticSampler(Sampler):
    """Stochastic batch acquisition: ``k`` draws without replacement, weights from the scores."""

    mode = "softmax"
    supports_dense = True  # weights from the scores alone

    def __init__(self, beta: PositiveFloat = 1.0) -> None:
        self.beta = float(beta)
        self.name = self.mode

    def sample(self, ctx: SelectionContext, k: int, scores: np.ndarray | None) -> np.ndarray:
        assert scores is not None
        return gumbel_top_k(stochastic_log_weights(scores, self.mode, self.beta), k, ctx.rng)


@SAMPLERS.register("softmax")
class SoftmaxSampler(StochasticSampler):
    """Weights ``exp(beta * score)``."""

    mode = "softmax"


@SAMPLERS.register("power")
class PowerSampler(StochasticSampler):
    """Weights ``score ** beta`` (scores >= 0)."""

    mode = "power"
    needs_nonnegative_scores = True


@SAMPLERS.register("soft-rank")
class SoftRankSampler(StochasticSampler):
    """Weights ``rank ** -beta``, rank 1 the highest score."""

    mode = "soft-rank"
