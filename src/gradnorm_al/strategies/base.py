"""The strategy interface: a read-only selection context in, a :class:`Selection` out.

A :class:`ScoringStrategy` is a scorer (one utility per candidate, higher = more worth labelling)
composed with a sampler (top-K by default; see :mod:`.samplers`). A strategy without per-sample
scores (core-set, BADGE, random) is a sampler alone. ``"SCORER@SAMPLER"`` names any scorer with any
sampler (e.g. ``entropy-gradnorm@power``). Strategies never see the loop's internals.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from .. import distributed
from .._torch import autocast
from ..errors import ConfigError, NonFiniteError, PoolError, SelectionError
from ..options import check_arguments
from ..registry import Registry
from ..tasks import Task, reduce_elements
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
        recipe and :meth:`Strategy.prepare_model` as the task model) on the labelled pool rows
        ``indices`` (repeats allowed: bootstrap resamples), in eval mode on ``device``; None
        where no training is possible (strategies that need it then refuse with a clear error).
    task : the task (its ``reduction`` turns dense per-element scores into one per sample);
        None means one class label per sample, mean reduction.
    sharded : whether this process is one of several under torchrun that split per-candidate
        work (:meth:`shard`, :meth:`gather`); every one of them holds this same context.
    amp : ``"bf16"``: per-candidate scoring runs under bfloat16 autocast; ``"none"``: it does not.
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
    task: Task | None = None
    sharded: bool = False
    amp: str = "none"

    def shard(self, granule: int | None = None) -> SelectionContext:
        """This process's share of the candidates: a contiguous block of whole runs of
        ``granule`` candidates (default: the batch size), as a context of its own (not sharded).
        The context itself when it is not sharded."""
        if not self.sharded:
            return self
        start, stop = distributed.shard_bounds(len(self.candidates), granule or self.batch_size)
        return dataclasses.replace(self, candidates=self.candidates[start:stop], sharded=False)

    def gather(self, values: np.ndarray) -> np.ndarray:
        """Every process's ``values`` for its :meth:`shard`, in candidate order, on every process
        (``values`` as it is when the context is not sharded)."""
        return distributed.gather(np.asarray(values)) if self.sharded else values

    def reduce(self, values: torch.Tensor) -> torch.Tensor:
        """[N, ...] per-element scores -> [N] with the task's reduction (mean without a task)."""
        return self.task.reduce(values) if self.task is not None else reduce_elements(values)

    def candidate_data(self) -> Dataset:
        return Subset(self.pool, self.candidates.tolist())

    def data(self, indices: np.ndarray) -> Dataset:
        return Subset(self.pool, np.asarray(indices).tolist())


@dataclass(frozen=True)
class Selection:
    """What a strategy chose: int64 [k] pool indices in pick order, and the scorer's float64
    utility of each (None for strategies without per-sample scores)."""

    indices: np.ndarray
    scores: np.ndarray | None = None


class Strategy:
    """Chooses ``k`` of the context's candidates.

    ``supports_dense``: whether the strategy works on a dense task (``task.dense``: outputs
    ``[N, C, H, W]``, one prediction per pixel), reducing per-pixel scores to one per sample with
    ``ctx.reduce``. Strategies that need one ``[N, C]`` prediction, feature vector or vote per
    sample leave it False and are refused for such tasks by :func:`check_task` (one check, run by
    :meth:`query` and by the learner when it is built), with ``dense_reason`` as the reason; a
    strategy whose answer depends on its settings overrides :meth:`unsupported_task`.
    """

    name: str = "strategy"
    supports_dense: bool = False
    #: why a strategy with ``supports_dense = False`` cannot run on a dense task (one clause)
    dense_reason: str = (
        "it needs one prediction [N, C] (or one feature vector, vote or loss) per sample, and "
        "this task predicts per pixel"
    )

    def unsupported_task(self, task: Task | None) -> str | None:
        """Why this strategy cannot run on ``task`` (None: it can; a None task is
        classification)."""
        if task is not None and task.dense and not self.supports_dense:
            return self.dense_reason
        return None

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Called on every freshly built task model, before its first training.

        A method that changes the model it trains (MC dropout adds a dropout layer) does it here;
        the default leaves the model as it is."""
        return model

    def auxiliary(self, model: nn.Module) -> Auxiliary | None:
        """Called once per task model built (after :meth:`prepare_model`): a module to train
        jointly with it every cycle (see :class:`gradnorm_al.train.Auxiliary`), or None."""
        return None

    def select(self, ctx: SelectionContext, k: int) -> np.ndarray | Selection:
        """int64 [k] pool indices (or a :class:`Selection` with their scores)."""
        raise NotImplementedError

    def __call__(self, ctx: SelectionContext, k: int) -> np.ndarray:
        """int64 [k] pool indices of :meth:`query`."""
        return self.query(ctx, k).indices

    def query(self, ctx: SelectionContext, k: int) -> Selection:
        """The validated selection of ``k`` candidates, with their scores where there are any."""
        check_request(ctx, k)
        check_task(self, ctx.task)
        chosen = self.select(ctx, k)
        if not isinstance(chosen, Selection):
            chosen = Selection(np.asarray(chosen, dtype=np.int64))
        chosen = Selection(np.asarray(chosen.indices, dtype=np.int64), chosen.scores)
        check_selection(ctx, chosen, k, self.name)
        return chosen


class Sampler:
    """Turns per-candidate scores (or none) into ``k`` distinct positions into the candidates.

    ``needs_scores``: whether the sampler needs a scorer (top-K and the stochastic samplers do;
    k-center, k-means++ and uniform can also work alone)."""

    name: str = "sampler"
    needs_scores: bool = True
    needs_nonnegative_scores: bool = False
    #: whether it works for dense tasks (it uses only the scores, not features of the samples)
    supports_dense: bool = False

    def sample(self, ctx: SelectionContext, k: int, scores: np.ndarray | None) -> np.ndarray:
        """int64 [k] distinct positions into ``ctx.candidates``, in pick order."""
        raise NotImplementedError


class TopK(Sampler):
    """The ``k`` highest scores, best first; ties go to the earlier candidate; NaN ranks last."""

    name = "top-k"
    supports_dense = True

    def sample(self, ctx: SelectionContext, k: int, scores: np.ndarray | None) -> np.ndarray:
        assert scores is not None
        return top_k_positions(scores, k)


class ScoringStrategy(Strategy):
    """A scorer plus a sampler: :meth:`score` gives one utility per candidate (or None when the
    strategy has no scores and its sampler decides alone), the sampler picks ``k`` of them."""

    sampler: Sampler = TopK()
    has_scores: bool = True
    #: whether every score is >= 0 (samplers with weights ``s ** beta`` need it)
    nonnegative_scores: bool = False
    #: whether a candidate's score depends on that candidate and the model alone, with no random
    #: draw: such scoring is split across processes under torchrun and runs under the context's
    #: autocast (:meth:`candidate_scores`)
    per_candidate: bool = False

    def score(self, ctx: SelectionContext) -> np.ndarray | None:
        """float64 [M]: one utility per candidate, in the order of ``ctx.candidates``."""
        raise NotImplementedError

    def score_granule(self, ctx: SelectionContext) -> int:
        """The number of candidates :meth:`score` computes together (its batch): a process's
        share is whole runs of it, so sharded scores equal one process's bit for bit."""
        return ctx.batch_size

    def candidate_scores(self, ctx: SelectionContext) -> np.ndarray | None:
        """:meth:`score` of every candidate (None without scores). A :attr:`per_candidate`
        scorer scores this process's :meth:`~SelectionContext.shard` under the context's
        autocast and gathers the full vector, in candidate order, on every process; any other
        runs whole on every process (same seeds, same result)."""
        if not self.has_scores:
            return None
        if not self.per_candidate:
            return self.score(ctx)
        mine = ctx.shard(self.score_granule(ctx))
        local = np.zeros(0)  # fewer batches than processes: some have none to score
        if len(mine.candidates):
            with autocast(ctx.device, ctx.amp):
                local = self.score(mine)
        return ctx.gather(np.asarray(local, dtype=np.float64))

    def unsupported_task(self, task: Task | None) -> str | None:
        reason = super().unsupported_task(task)
        if reason is None and task is not None and task.dense and not self.sampler.supports_dense:
            reason = (
                f"its sampler {self.sampler.name} needs one feature vector per sample, and this "
                "task predicts per pixel"
            )
        return reason

    def select(self, ctx: SelectionContext, k: int) -> Selection:
        scores = self.candidate_scores(ctx)
        if scores is not None:
            scores = np.asarray(scores, dtype=np.float64)
            if scores.shape != (len(ctx.candidates),):
                raise SelectionError(
                    f"strategy {self.name} gave {scores.shape} scores for "
                    f"{len(ctx.candidates)} candidates"
                )
            bad = ~np.isfinite(scores)
            if bad.any():
                raise NonFiniteError(
                    f"strategy {self.name} gave {int(bad.sum())} non-finite scores (NaN or "
                    f"infinite) for {len(scores)} candidates: the model diverged or the data "
                    "holds such values; nothing was selected"
                )
        elif self.sampler.needs_scores:
            raise ConfigError(
                f"sampler {self.sampler.name} needs per-sample scores, which strategy "
                f"{self.name} does not have"
            )
        pos = np.asarray(self.sampler.sample(ctx, k, scores), dtype=np.int64)
        if (
            pos.shape != (k,)
            or len(np.unique(pos)) != k
            or (k and (pos.min() < 0 or pos.max() >= len(ctx.candidates)))
        ):
            raise SelectionError(
                f"sampler {self.sampler.name} returned invalid positions {pos.shape} for {k} of "
                f"{len(ctx.candidates)} candidates"
            )
        return Selection(ctx.candidates[pos], None if scores is None else scores[pos])


def top_k_positions(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` largest scores, best first; ties go to the earlier position; NaN
    ranks last."""
    scores = np.asarray(scores, dtype=np.float64)
    key = np.where(np.isnan(scores), -np.inf, scores)
    return np.argsort(-key, kind="stable")[:k]


def top_k(scores: np.ndarray, candidates: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` candidates with the largest scores, best first; ties go to the earlier candidate.

    NaN scores rank last.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (len(candidates),):
        raise ValueError(f"expected {len(candidates)} scores, got shape {scores.shape}")
    return np.asarray(candidates)[top_k_positions(scores, k)]


def check_request(ctx: SelectionContext, k: int) -> None:
    """The one shared validation of a selection request."""
    if k < 1:
        raise PoolError(f"asked to select {k} samples; the budget must be at least 1")
    if k > len(ctx.candidates):
        raise PoolError(
            f"budget {k} is larger than the {len(ctx.candidates)} candidates; lower the budget "
            "or raise the candidate subset size"
        )


def dense_strategies() -> list[str]:
    """Names of the registered strategies that run on dense tasks (with their default sampler)."""
    names = []
    for name in STRATEGIES.names():
        try:
            if create_strategy(name).supports_dense:
                names.append(name)
        except (ConfigError, TypeError):  # one that cannot be built without arguments: not listed
            continue
    return names


def check_task(strategy: Strategy, task: Task | None) -> None:
    """:class:`ConfigError` naming the strategy, the task and why, if ``strategy`` cannot run on
    ``task``."""
    reason = strategy.unsupported_task(task)
    if reason is not None:
        assert task is not None
        raise ConfigError(
            f"strategy {strategy.name} cannot run on the {task.name} task: {reason}"
            + (f"; strategies that can: {', '.join(dense_strategies())}" if task.dense else "")
        )


def check_selection(ctx: SelectionContext, chosen: Selection, k: int, name: str) -> None:
    """A strategy must return exactly ``k`` distinct candidates (so never a labelled index)."""
    idx = chosen.indices
    if idx.shape != (k,):
        raise SelectionError(f"strategy {name} returned {idx.shape} indices, expected ({k},)")
    if len(np.unique(idx)) != k:
        raise SelectionError(f"strategy {name} returned duplicate indices")
    if not np.isin(idx, ctx.candidates).all():
        raise SelectionError(f"strategy {name} returned indices that are not candidates")
    if chosen.scores is not None and np.shape(chosen.scores) != (k,):
        raise SelectionError(f"strategy {name} returned {np.shape(chosen.scores)} scores for {k}")


StrategyFactory = Callable[..., Strategy]
STRATEGIES: Registry[StrategyFactory] = Registry("strategy")
SAMPLERS: Registry[Callable[..., Sampler]] = Registry("sampler")
SAMPLERS.register("top-k")(TopK)


def split_spec(spec: str) -> tuple[str, str | None]:
    """``"SCORER@SAMPLER"`` -> (scorer, sampler); a plain name -> (name, None)."""
    name, at, sampler = spec.partition("@")
    if at and (not name or not sampler or "@" in sampler):
        raise ConfigError(f"strategy {spec!r} is not NAME or SCORER@SAMPLER (e.g. entropy@power)")
    return name, (sampler if at else None)


def _params_of(factory: Callable[..., Any]) -> set[str]:
    return set(inspect.signature(factory).parameters)


def create_strategy(spec: str, **params: Any) -> Strategy:
    """Build the strategy ``spec`` (a registered name, or ``"SCORER@SAMPLER"``) with its
    hyper-parameters ``params``; with a sampler, each parameter goes to whichever of the two
    takes it."""
    name, sampler_name = split_spec(spec)
    factory = STRATEGIES.get(name)
    if sampler_name is None:
        check_arguments(factory, params, f"strategy {name}")  # declared in its signature
        strategy = factory(**params)
    else:
        sampler_factory = SAMPLERS.get(sampler_name)
        mine = _params_of(sampler_factory)
        both = mine & _params_of(factory) & set(params)
        if both:
            raise ConfigError(
                f"{spec}: parameter {sorted(both)[0]!r} is taken by both {name} and "
                f"{sampler_name}; rename it"
            )
        unknown = set(params) - mine - _params_of(factory)
        if unknown:
            takes = ", ".join(sorted(mine | _params_of(factory))) or "no parameters"
            raise ConfigError(
                f"strategy {spec} does not take {', '.join(sorted(unknown))}; it takes: {takes}"
            )
        theirs = {k: v for k, v in params.items() if k not in mine}
        ours = {k: v for k, v in params.items() if k in mine}
        check_arguments(factory, theirs, f"strategy {name}")
        check_arguments(sampler_factory, ours, f"sampler {sampler_name}")
        strategy = factory(**theirs)
        if not isinstance(strategy, ScoringStrategy) or not strategy.has_scores:
            raise ConfigError(
                f"strategy {name} has no per-sample scores for a sampler to use; combine a "
                f"scoring strategy with {sampler_name} (e.g. entropy-gradnorm@{sampler_name})"
            )
        strategy.sampler = sampler_factory(**ours)
        if strategy.sampler.needs_nonnegative_scores and not strategy.nonnegative_scores:
            raise ConfigError(
                f"sampler {sampler_name} needs non-negative scores (weights s ** beta) and "
                f"{name}'s can be negative: use softmax or soft-rank sampling"
            )
    strategy.name = spec
    return strategy


def accepted_params(spec: str) -> set[str]:
    """Names of the keyword arguments the strategy ``spec`` accepts (with its sampler's)."""
    name, sampler_name = split_spec(spec)
    params = _params_of(STRATEGIES.get(name))
    return params if sampler_name is None else params | _params_of(SAMPLERS.get(sampler_name))
