"""The strategy interface: a read-only selection context in, pool indices out.

A :class:`ScoringStrategy` is a scorer (one utility per candidate, higher = more worth labelling)
composed with a sampler (top-K by default). Strategies never see the loop's internals.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from ..errors import PoolError
from ..options import check_arguments
from ..registry import Registry
from ..train import Auxiliary


@dataclass(frozen=True)
class SelectionContext:
    """What a strategy may look at when it selects.

    Attributes
    ----------
    model : the task model as trained this cycle (do not modify it).
    pool : the whole training pool without augmentation; indices below index into it.
    candidates : int64 [M] pool indices of the unlabelled candidates to choose from.
    labeled : int64 [L] pool indices already labelled.
    num_classes : number of classes of the task.
    device : where to run the model.
    rng : the strategy's own seeded random generator for this selection.
    batch_size : batch size for forward / backward passes over candidates.
    progress : whether to show progress bars.
    trainer : ``trainer(indices, seed)`` trains and returns a fresh task model (same architecture,
        recipe and :meth:`Strategy.prepare_model` as the task model) on the training pool rows
        ``indices`` (repeats allowed: bootstrap resamples), in eval mode on ``device``; None
        where no training is possible (strategies that need it then refuse with a clear error).
    """

    model: nn.Module
    pool: Dataset
    candidates: np.ndarray
    labeled: np.ndarray
    num_classes: int
    device: torch.device
    rng: np.random.Generator
    batch_size: int = 128
    progress: bool = False
    trainer: Callable[[np.ndarray, int], nn.Module] | None = None

    def candidate_data(self) -> Dataset:
        return Subset(self.pool, self.candidates.tolist())

    def data(self, indices: np.ndarray) -> Dataset:
        return Subset(self.pool, np.asarray(indices).tolist())


class Strategy:
    """Chooses ``k`` of the context's candidates; returns their pool indices."""

    name: str = "strategy"

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Called by the loop on every freshly built task model, before its first training.

        A method that changes the model it trains (MC dropout adds a dropout layer) does it here;
        the default leaves the model as it is."""
        return model

    def auxiliary(self, model: nn.Module) -> Auxiliary | None:
        """Called by the loop once per task model built (after :meth:`prepare_model`): a module to
        train jointly with it every cycle (see :class:`gradnorm_al.train.Auxiliary`), or None."""
        return None

    def select(self, ctx: SelectionContext, k: int) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, ctx: SelectionContext, k: int) -> np.ndarray:
        check_request(ctx, k)
        chosen = np.asarray(self.select(ctx, k), dtype=np.int64)
        check_selection(ctx, chosen, k, self.name)
        return chosen


class ScoringStrategy(Strategy):
    """A scorer plus the top-K sampler: select the ``k`` candidates with the highest score."""

    def score(self, ctx: SelectionContext) -> np.ndarray:
        """float64 [M]: one utility per candidate, in the order of ``ctx.candidates``."""
        raise NotImplementedError

    def select(self, ctx: SelectionContext, k: int) -> np.ndarray:
        return top_k(self.score(ctx), ctx.candidates, k)


def top_k(scores: np.ndarray, candidates: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` candidates with the largest scores, best first; ties go to the earlier candidate.

    NaN scores rank last.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (len(candidates),):
        raise ValueError(f"expected {len(candidates)} scores, got shape {scores.shape}")
    key = np.where(np.isnan(scores), -np.inf, scores)
    order = np.argsort(-key, kind="stable")
    return np.asarray(candidates)[order[:k]]


def check_request(ctx: SelectionContext, k: int) -> None:
    """The one shared validation of a selection request."""
    if k < 1:
        raise PoolError(f"asked to select {k} samples; the budget must be at least 1")
    if k > len(ctx.candidates):
        raise PoolError(
            f"budget {k} is larger than the {len(ctx.candidates)} candidates; lower the budget "
            "or raise the candidate subset size"
        )


def check_selection(ctx: SelectionContext, chosen: np.ndarray, k: int, name: str) -> None:
    """A strategy must return exactly ``k`` distinct candidates (so never a labelled index)."""
    if chosen.shape != (k,):
        raise AssertionError(f"strategy {name} returned {chosen.shape} indices, expected ({k},)")
    if len(np.unique(chosen)) != k:
        raise AssertionError(f"strategy {name} returned duplicate indices")
    if not np.isin(chosen, ctx.candidates).all():
        raise AssertionError(f"strategy {name} returned indices that are not candidates")


StrategyFactory = Callable[..., Strategy]
STRATEGIES: Registry[StrategyFactory] = Registry("strategy")


def create_strategy(name: str, **params: Any) -> Strategy:
    """Build the strategy registered as ``name`` with its hyper-parameters ``params``."""
    factory = STRATEGIES.get(name)
    check_arguments(factory, params, f"strategy {name}")  # declared in its signature
    strategy = factory(**params)
    strategy.name = name
    return strategy


def accepted_params(name: str) -> set[str]:
    """Names of the keyword arguments the strategy ``name`` accepts."""
    return set(inspect.signature(STRATEGIES.get(name)).parameters)
