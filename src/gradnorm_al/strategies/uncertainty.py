"""Classic uncertainty sampling on the softmax of the candidates (Settles 2009 survey, sec. 3.1).

With ``p = softmax(f(x))`` over C classes, model in eval mode, and ``p_(1) >= p_(2)`` the two
largest probabilities, the scores (higher = more worth labelling, top-K selects) are

* ``entropy``:          ``H(p) = -sum_c p_c log p_c`` (nats; ``0 log 0 = 0``)
* ``margin``:           ``-(p_(1) - p_(2))``, so top-K picks the smallest margins (Scheffer et al.)
* ``least-confidence``: ``1 - max_c p_c`` (Culotta & McCallum)

None of them has a hyper-parameter or uses randomness; ties go to the earlier candidate. For dense
outputs (probabilities ``[n, C, H, W]``) each formula is taken per element and the task's
``reduction`` (mean, sum or max) makes one score per sample, as baal's heuristics do.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import STRATEGIES, ScoringStrategy, SelectionContext
from .common import entropy, probabilities


def _check_probs(probs: torch.Tensor, min_classes: int = 1) -> None:
    if probs.dim() < 2:
        raise ValueError(f"expected probabilities [n, C, ...], got shape {tuple(probs.shape)}")
    if probs.shape[1] < min_classes:
        raise ValueError(f"needs at least {min_classes} classes, got {probs.shape[1]}")


def entropy_scores(probs: torch.Tensor) -> torch.Tensor:
    """Predictive entropy ``H(p) = -sum_c p_c log p_c`` (nats) of probabilities [n, C, ...] ->
    [n, ...]."""
    _check_probs(probs)
    return entropy(probs)


def margin_scores(probs: torch.Tensor) -> torch.Tensor:
    """Negated top-2 margin ``-(p_(1) - p_(2))`` of probabilities [n, C, ...] (C >= 2) ->
    [n, ...].

    In [-1, 0]; 0 means the two most likely classes are tied."""
    _check_probs(probs, min_classes=2)
    top2 = probs.topk(2, dim=1).values
    return -(top2[:, 0] - top2[:, 1])


def least_confidence_scores(probs: torch.Tensor) -> torch.Tensor:
    """Least confidence ``1 - max_c p_c`` of probabilities [n, C, ...] -> [n, ...]; in
    [0, 1 - 1/C]."""
    _check_probs(probs)
    return 1.0 - probs.max(dim=1).values


class _ProbabilityScoring(ScoringStrategy):
    """Top-K by a formula on the float64 softmax probabilities of the candidates."""

    supports_dense = True  # per-pixel formulas, reduced with the task's reduction
    per_candidate = True

    @staticmethod
    def formula(probs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def score(self, ctx: SelectionContext) -> np.ndarray:
        return ctx.reduce(self.formula(probabilities(ctx))).numpy().astype(np.float64)


@STRATEGIES.register("entropy")
class EntropyStrategy(_ProbabilityScoring):
    """The candidates with the highest predictive entropy."""

    nonnegative_scores = True  # norms, entropies, disagreements

    formula = staticmethod(entropy_scores)


@STRATEGIES.register("margin")
class MarginStrategy(_ProbabilityScoring):
    """The candidates with the smallest gap between their two most likely classes."""

    formula = staticmethod(margin_scores)


@STRATEGIES.register("least-confidence")
class LeastConfidenceStrategy(_ProbabilityScoring):
    """The candidates whose most likely class has the lowest probability."""

    nonnegative_scores = True  # norms, entropies, disagreements

    formula = staticmethod(least_confidence_scores)
