"""MC dropout (Gal & Ghahramani 2016; Gal, Islam & Ghahramani 2017, "Deep Bayesian Active
Learning with Image Data"): ``T`` stochastic forward passes with dropout active approximate the
posterior predictive; the candidates are ranked by an acquisition function of the ``T``
probability vectors.

Probabilities are shaped ``[n, C, T]`` (samples, classes, iterations), as in baal. With
``p_t = softmax(logits_t)`` and ``H`` the Shannon entropy in nats:

* ``"bald"`` (default): mutual information ``H[mean_t p_t] - mean_t H[p_t]`` (Houlsby et al. 2011)
* ``"max-entropy"``: predictive entropy ``H[mean_t p_t]``
* ``"variation-ratio"``: ``1 - (count over t of the modal predicted class) / T`` (Freeman 1965)

During the passes only the dropout modules (``nn.Dropout``, ``Dropout1d/2d/3d``, ``AlphaDropout``,
``FeatureAlphaDropout``) are in train mode; everything else, BatchNorm in particular, is in eval
mode, so BatchNorm normalises with its running statistics and does not update them. Every module's
mode is restored afterwards, also on errors.

A model without any dropout layer gets one before its first training
(:meth:`MCDropoutStrategy.prepare_model`): the linear head ``model.classifier`` becomes
``nn.Sequential(nn.Dropout(p), classifier)``, the placement of the published Keras code (dropout
before the last dense layer).
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
    if p.dim() != 3:
        raise ValueError(f"expected probabilities shaped [n, C, T], got shape {tuple(p.shape)}")
    return p


def max_entropy_scores(probs: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Predictive entropy ``H[mean_t p_t]`` (nats), probs [n, C, T] -> float64 [n]."""
    return entropy(_as_probs(probs).mean(dim=2))


def bald_scores(probs: torch.Tensor | np.ndarray) -> torch.Tensor:
    """BALD mutual information ``H[mean_t p_t] - mean_t H[p_t]`` (nats), probs [n, C, T] ->
    float64 [n].

    It is >= 0 by Jensen's inequality; rounding can make it a few ulps negative, so it is clamped
    at 0 (a sample whose prediction does not depend on the dropout mask scores exactly 0).
    """
    p = _as_probs(probs)
    expected_entropy = entropy(p).mean(dim=1)  # entropy() reduces dim 1 (classes): [n, T] -> [n]
    return (entropy(p.mean(dim=2)) - expected_entropy).clamp_min(0.0)


def variation_ratio_scores(probs: torch.Tensor | np.ndarray) -> torch.Tensor:
    """``1 - f_m / T`` with ``f_m`` the number of passes predicting the modal class, probs
    [n, C, T] -> float64 [n]. A pass predicts its argmax (the lowest class index on ties)."""
    p = _as_probs(probs)
    num_classes, passes = p.shape[1], p.shape[2]
    votes = p.argmax(dim=1)  # [n, T]
    counts = F.one_hot(votes, num_classes).sum(dim=1)  # [n, C]
    return 1.0 - counts.max(dim=1).values.double() / passes


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


@torch.no_grad()
def mc_dropout_probabilities(model: nn.Module, x: torch.Tensor, samples: int) -> torch.Tensor:
    """float64 [B, C, T]: softmax probabilities of ``samples`` (T) stochastic passes of the batch
    ``x``, in :func:`mc_dropout_mode`. Randomness comes from torch's global generator of
    ``x``'s device (seed it for reproducible passes).

    The T passes run one after the other on the same batch (not one forward of the batch repeated
    T times), so memory stays that of a single scoring batch.
    """
    passes = []
    with mc_dropout_mode(model):
        for _ in range(samples):
            logits = first_output(model(x))
            if logits.dim() != 2:
                raise ConfigError(
                    f"mc-dropout needs logits shaped [batch, classes], got {tuple(logits.shape)}; "
                    "use it with a classification model"
                )
            passes.append(F.softmax(logits.double(), dim=1))
    return torch.stack(passes, dim=2)


def insert_dropout(model: nn.Module, p: float = 0.5) -> nn.Module:
    """Give ``model`` a dropout layer unless it already has one; returns ``model`` (changed in
    place).

    A model with any dropout-family module is left as it is. Otherwise its ``classifier`` (the
    linear head of a :class:`~gradnorm_al.models.TaskModel`) becomes
    ``nn.Sequential(nn.Dropout(p), classifier)``: ``model.classifier`` is still the whole head
    (logits = ``classifier(embed(x))``, unchanged in eval mode), ``model.classifier[-1]`` is the
    original linear layer and ``embed(x)`` still returns the features before the dropout.
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
        acquire = ACQUISITION_SCORES[self.acquisition]
        # The passes draw from torch's generator, seeded from the context's rng so that the same
        # context gives the same masks whether or not the caller seeded torch.
        seed = int(ctx.rng.integers(0, 2**63 - 1))
        with seeded_torch(ctx.device, seed):
            scores = map_batches(
                ctx,
                ctx.candidates,
                lambda x: acquire(mc_dropout_probabilities(ctx.model, x, self.samples)),
            )
        return scores.numpy()
