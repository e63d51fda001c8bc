"""MC dropout (Gal & Ghahramani 2016; Gal, Islam & Ghahramani 2017, "Deep Bayesian Active
Learning with Image Data"): ``T`` stochastic forward passes with dropout active approximate the
posterior predictive; the candidates are ranked by an acquisition function of the ``T``
probability vectors.

Probabilities are shaped ``[n, C, T]`` (samples, classes, iterations), as in baal, or
``[n, C, ..., T]`` for dense outputs (``[n, C, H, W, T]``: one prediction per pixel). With
``p_t = softmax(logits_t)`` and ``H`` the Shannon entropy in nats, per sample (or per pixel):

* ``"bald"`` (default): mutual information ``H[mean_t p_t] - mean_t H[p_t]`` (Houlsby et al. 2011)
* ``"max-entropy"``: predictive entropy ``H[mean_t p_t]``
* ``"variation-ratio"``: ``1 - (count over t of the modal predicted class) / T`` (Freeman 1965)

During the passes only the dropout modules (``nn.Dropout``, ``Dropout1d/2d/3d``, ``AlphaDropout``,
``FeatureAlphaDropout``) are in train mode; everything else, BatchNorm in particular, is in eval
mode, so BatchNorm normalises with its running statistics and does not update them. Every module's
mode is restored afterwards, also on errors.

The strategy accumulates the passes one at a time (:class:`PassStatistics`: sums of the
probabilities, of their entropies and the vote counts), so its memory is that of three
``[B, C, ...]`` tensors of one scoring batch whatever ``T``; stacking ``T`` passes of a
segmentation batch (``[B, C, H, W, T]`` float64) would not fit at Cityscapes sizes.

Dense tasks (segmentation): each acquisition is taken per pixel (pixel BALD, ...) and the task's
``reduction`` (mean, sum or max over the pixels) makes one score per image.

A model without any dropout layer gets one before its first training
(:meth:`MCDropoutStrategy.prepare_model`): the head ``model.classifier`` becomes
``nn.Sequential(nn.Dropout(p), classifier)``, the placement of the published Keras code (dropout
before the last dense layer). For a dense model (``fcn-small``, ``drn-d-22``: a 1x1 convolution
``classifier`` on the feature map) the same element-wise dropout drops every feature at every
position independently before the 1x1 convolution, the per-pixel counterpart of dropout before
the last dense layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._torch import first_output
from ..errors import ConfigError
from ..options import OneOf, Range
from .base import STRATEGIES, ScoringStrategy, SelectionContext
from .common import entropy, map_batches, seeded_torch

ACQUISITIONS = ("bald", "max-entropy", "variation-ratio")

#: Every dropout-family module (Dropout, Dropout1d/2d/3d, AlphaDropout, FeatureAlphaDropout).
DROPOUT_TYPES: tuple[type[nn.Module], ...] = (nn.modules.dropout._DropoutNd,)


def _as_probs(probs: torch.Tensor | np.ndarray) -> torch.Tensor:
    p = torch.as_tensor(probs, dtype=torch.float64)
    if p.dim() < 3:
        raise ValueError(
            f"expected probabilities shaped [n, C, T] (or [n, C, ..., T]), got shape "
            f"{tuple(p.shape)}"
        )
    return p


class PassStatistics:
    """Running sums over stochastic passes, from which every acquisition follows.

    :meth:`add` takes the float64 probabilities ``p_t`` [n, C, ...] of one pass. Kept: the first
    pass ``p_0`` and its entropy ``H[p_0]``, the sums of the deviations ``sum_t (p_t - p_0)``
    [n, C, ...] and ``sum_t (H[p_t] - H[p_0])`` [n, ...], and ``votes`` [n, C, ...] (int64: how
    many passes predict each class, argmax with the lowest class on ties). Memory: these, whatever
    the number of passes. Summing deviations from the first pass makes the means exactly ``p_0``
    and ``H[p_0]`` where no pass differs, so such a sample's BALD is exactly 0 (a plain sum of T
    equal values divided by T can be off by an ulp), and it keeps the cancellation in
    ``H[mean] - mean H`` small.
    """

    def __init__(self) -> None:
        self.passes = 0
        self.first: torch.Tensor | None = None
        self.first_entropy: torch.Tensor | None = None
        self.deviation_sum: torch.Tensor | None = None
        self.entropy_deviation_sum: torch.Tensor | None = None
        self.votes: torch.Tensor | None = None

    def add(self, p: torch.Tensor) -> None:
        num_classes = p.shape[1]
        # one_hot puts the class last: [n, ..., C] -> [n, C, ...]
        vote = F.one_hot(p.argmax(dim=1), num_classes).movedim(-1, 1)
        h = entropy(p)
        if self.first is None:
            self.first, self.first_entropy, self.votes = p, h, vote
            self.deviation_sum = torch.zeros_like(p)
            self.entropy_deviation_sum = torch.zeros_like(h)
        else:
            assert self.deviation_sum is not None and self.entropy_deviation_sum is not None
            assert self.first_entropy is not None and self.votes is not None
            self.deviation_sum += p - self.first
            self.entropy_deviation_sum += h - self.first_entropy
            self.votes += vote
        self.passes += 1

    def mean_probabilities(self) -> torch.Tensor:
        """``mean_t p_t`` [n, C, ...]."""
        if self.first is None or self.deviation_sum is None:
            raise ValueError("no passes were added")
        return self.first + self.deviation_sum / self.passes

    def max_entropy(self) -> torch.Tensor:
        """Predictive entropy ``H[mean_t p_t]`` (nats), float64 [n, ...]."""
        return entropy(self.mean_probabilities())

    def bald(self) -> torch.Tensor:
        """``H[mean_t p_t] - mean_t H[p_t]`` (nats), float64 [n, ...], clamped at 0."""
        predictive = self.max_entropy()  # checks that passes were added
        assert self.first_entropy is not None and self.entropy_deviation_sum is not None
        expected = self.first_entropy + self.entropy_deviation_sum / self.passes
        return (predictive - expected).clamp_min(0.0)

    def variation_ratio(self) -> torch.Tensor:
        """``1 - (votes of the modal class) / T``, float64 [n, ...]."""
        if self.votes is None:
            raise ValueError("no passes were added")
        return 1.0 - self.votes.max(dim=1).values.double() / self.passes

    def acquire(self, acquisition: str) -> torch.Tensor:
        """The acquisition ``"bald"``, ``"max-entropy"`` or ``"variation-ratio"``."""
        formulas = {
            "bald": self.bald,
            "max-entropy": self.max_entropy,
            "variation-ratio": self.variation_ratio,
        }
        if acquisition not in formulas:
            raise ValueError(f"unknown acquisition {acquisition!r}; use one of {ACQUISITIONS}")
        return formulas[acquisition]()

    @classmethod
    def of(cls, probs: torch.Tensor | np.ndarray) -> PassStatistics:
        """The statistics of stacked probabilities [n, C, ..., T]."""
        stats = cls()
        for p in _as_probs(probs).unbind(dim=-1):
            stats.add(p)
        return stats


def max_entropy_scores(probs: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Predictive entropy ``H[mean_t p_t]`` (nats), probs [n, C, ..., T] -> float64 [n, ...]."""
    return PassStatistics.of(probs).max_entropy()


def bald_scores(probs: torch.Tensor | np.ndarray) -> torch.Tensor:
    """BALD mutual information ``H[mean_t p_t] - mean_t H[p_t]`` (nats), probs [n, C, ..., T] ->
    float64 [n, ...].

    It is >= 0 by Jensen's inequality; rounding can make it a few ulps negative, so it is clamped
    at 0 (a sample whose prediction does not depend on the dropout mask scores exactly 0).
    """
    return PassStatistics.of(probs).bald()


def variation_ratio_scores(probs: torch.Tensor | np.ndarray) -> torch.Tensor:
    """``1 - f_m / T`` with ``f_m`` the number of passes predicting the modal class, probs
    [n, C, ..., T] -> float64 [n, ...]. A pass predicts its argmax (the lowest class index on
    ties)."""
    return PassStatistics.of(probs).variation_ratio()


ACQUISITION_SCORES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "bald": bald_scores,
    "max-entropy": max_entropy_scores,
    "variation-ratio": variation_ratio_scores,
}


def has_dropout(model: nn.Module) -> bool:
    """Whether any submodule of ``model`` is a dropout-family module."""
    return any(isinstance(m, DROPOUT_TYPES) for m in model.modules())


@contextlib.contextmanager
def mc_dropout_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for every module except the dropout modules, which are put in train mode; each
    module's own mode is restored afterwards, also when the body raises."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        for m in model.modules():
            if isinstance(m, DROPOUT_TYPES):
                m.training = True
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


def _passes(model: nn.Module, x: torch.Tensor, samples: int) -> Iterator[torch.Tensor]:
    """float64 softmax probabilities [B, C, ...] of each of ``samples`` stochastic passes of the
    batch ``x``, in :func:`mc_dropout_mode` (the T passes run one after the other on the same
    batch, not one forward of the batch repeated T times). Randomness comes from torch's global
    generator of ``x``'s device (seed it for reproducible passes)."""
    with mc_dropout_mode(model):
        for _ in range(samples):
            logits = first_output(model(x))
            if logits.dim() < 2:
                raise ConfigError(
                    f"mc-dropout needs logits shaped [batch, classes] (or [batch, classes, ...] "
                    f"for dense outputs), got {tuple(logits.shape)}"
                )
            yield F.softmax(logits.double(), dim=1)


@torch.no_grad()
def mc_dropout_probabilities(model: nn.Module, x: torch.Tensor, samples: int) -> torch.Tensor:
    """float64 [B, C, T] (dense outputs: [B, C, ..., T]): softmax probabilities of ``samples``
    (T) stochastic passes of the batch ``x``, in :func:`mc_dropout_mode`. Randomness comes from
    torch's global generator of ``x``'s device (seed it for reproducible passes). Holds all T
    passes; :func:`mc_dropout_scores` accumulates them instead."""
    return torch.stack(list(_passes(model, x, samples)), dim=-1)


@torch.no_grad()
def mc_dropout_scores(
    model: nn.Module, x: torch.Tensor, samples: int, acquisition: str = "bald"
) -> torch.Tensor:
    """float64 [B] (dense outputs: [B, ...], per element) acquisition of ``samples``
    stochastic passes of the batch ``x``, accumulated pass by pass (:class:`PassStatistics`); the
    same passes as :func:`mc_dropout_probabilities` for the same torch seed."""
    stats = PassStatistics()
    for p in _passes(model, x, samples):
        stats.add(p)
    return stats.acquire(acquisition)


def insert_dropout(model: nn.Module, p: float = 0.5) -> nn.Module:
    """Give ``model`` a dropout layer unless it already has one; returns ``model`` (changed in
    place).

    A model with any dropout-family module is left as it is. Otherwise its ``classifier`` (the
    linear head of a :class:`~gradnorm_al.models.TaskModel`) becomes
    ``nn.Sequential(nn.Dropout(p), classifier)``: ``model.classifier`` is still the whole head
    (logits = ``classifier(embed(x))``, unchanged in eval mode), ``model.classifier[-1]`` is the
    original linear layer and ``embed(x)`` still returns the features before the dropout. A dense
    model's 1x1 convolution ``classifier`` is wrapped the same way (element-wise dropout on the
    feature map ``features(x)``; ``features`` and ``embed`` are unchanged).
    """
    if has_dropout(model):
        return model
    head = getattr(model, "classifier", None)
    if not isinstance(head, nn.Module):
        raise ConfigError(
            f"mc-dropout needs dropout, but {type(model).__name__} has no dropout layer and no "
            "`classifier` module to put one before; add an nn.Dropout to the model or give it a "
            "`classifier` head (see gradnorm_al.models.TaskModel)"
        )
    model.classifier = nn.Sequential(nn.Dropout(p), head)
    return model


@STRATEGIES.register("mc-dropout")
class MCDropoutStrategy(ScoringStrategy):
    """Top-K candidates by an acquisition function of ``samples`` MC-dropout passes.

    Parameters
    ----------
    samples : T, the number of stochastic forward passes per candidate (default 25).
    acquisition : "bald" (default), "max-entropy" or "variation-ratio".
    p : dropout rate of the layer :meth:`prepare_model` adds to a model without dropout (default
        0.5, as in Gal et al. 2017); a model that has dropout keeps its own layers and rates.
    """

    nonnegative_scores = True  # norms, entropies, disagreements
    supports_dense = True  # per-pixel acquisition, reduced with the task's reduction

    def __init__(
        self,
        samples: Annotated[int, Range(ge=2)] = 25,
        acquisition: Annotated[str, OneOf(ACQUISITIONS)] = "bald",
        p: Annotated[float, Range(gt=0.0, lt=1.0)] = 0.5,
    ) -> None:
        self.samples = samples
        self.acquisition = acquisition
        self.p = float(p)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Insert ``nn.Dropout(p)`` before ``model.classifier`` unless the model has dropout
        (see :func:`insert_dropout`); the loop trains the model with it."""
        return insert_dropout(model, self.p)

    def score(self, ctx: SelectionContext) -> np.ndarray:
        if not has_dropout(ctx.model):
            raise ConfigError(
                f"mc-dropout needs a model with dropout, but {type(ctx.model).__name__} has none; "
                "build it through the loop (which calls prepare_model) or call "
                "strategy.prepare_model(model) before training it"
            )
        # The passes draw from torch's generator, seeded from the context's rng so that the same
        # context gives the same masks whether or not the caller seeded torch.
        seed = int(ctx.rng.integers(0, 2**63 - 1))
        with seeded_torch(ctx.device, seed):
            scores = map_batches(
                ctx,
                ctx.candidates,
                # dense outputs: per-pixel acquisition reduced per image inside the batch, so only
                # [B] scores are kept
                lambda x: ctx.reduce(
                    mc_dropout_scores(ctx.model, x, self.samples, self.acquisition)
                ),
            )
        return scores.numpy()
