"""Algorithm 1 for one trial of one strategy: a short driver over an :class:`ActiveLearner`."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn
from torch.utils.data import Dataset

from . import distributed
from .errors import ConfigError, NonFiniteError
from .learner import ActiveLearner
from .options import option
from .pool import initial_count, initial_indices
from .seeding import INIT_POOL, SUBSET, rng


@dataclass
class LoopConfig:
    """The active-learning schedule.

    ``cycles`` trainings; before each but the last, ``budget`` = round(budget_fraction * pool)
    samples are chosen from ``subset_size`` random unlabelled candidates (None = all of them).
    ``reinit_each_cycle=False`` keeps the model between cycles (the published warm start).
    """

    cycles: int = option(7, "training cycles, the last without selection", ge=1)
    initial_fraction: float = option(
        0.10, "initially labelled fraction of the pool", gt=0.0, le=1.0
    )
    budget_fraction: float = option(0.05, "fraction of the pool labelled per cycle", gt=0.0, le=1.0)
    subset_size: int | None = option(
        None, "random unlabelled candidates scored per cycle", ge=1, none="all"
    )
    reinit_each_cycle: bool = option(
        False, "train a fresh model every cycle instead of keeping it (the published warm start)"
    )
    score_batch_size: int = option(128, "batch size for scoring candidates", ge=1)

    def budget(self, pool_size: int) -> int:
        return max(1, round(self.budget_fraction * pool_size))

    def validate(self, pool_size: int) -> None:
        """Raise ConfigError unless the schedule fits a pool of ``pool_size`` samples."""
        if self.cycles < 1:
            raise ConfigError(f"cycles must be at least 1, got {self.cycles}")
        for name in ("initial_fraction", "budget_fraction"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ConfigError(f"{name.replace('_', '-')} must be in (0, 1], got {value}")
        if self.subset_size is not None and self.subset_size < 1:
            raise ConfigError(f"subset-size must be at least 1, got {self.subset_size}")
        if self.cycles == 1:
            return
        start, k = initial_count(pool_size, self.initial_fraction), self.budget(pool_size)
        left = pool_size - start - (self.cycles - 2) * k  # unlabelled before the last selection
        if k > left:
            raise ConfigError(
                f"budget {k} ({self.budget_fraction:g} of {pool_size}) is larger than the "
                f"unlabelled pool at the last selection ({max(left, 0)} left after "
                f"{self.cycles - 1} selections); lower --budget-fraction, --initial-fraction "
                "or --cycles"
            )
        if self.subset_size is not None and self.subset_size < k:
            raise ConfigError(
                f"subset-size {self.subset_size} is smaller than the budget {k}; raise "
                "--subset-size or lower --budget-fraction"
            )


@dataclass
class CycleRecord:
    """One row of results.csv plus what this cycle's selection added (None in the last cycle).

    ``metrics``: ``test_<metric>`` and ``train_<metric>`` for each metric of the task, in the
    task's order (classification: test_accuracy, train_accuracy)."""

    strategy: str
    trial: int
    cycle: int
    num_labeled: int
    labeled_fraction: float
    metrics: dict[str, float]
    train_seconds: float
    select_seconds: float | None
    seed: int
    selected: np.ndarray | None = None
    scores: np.ndarray | None = None  # the strategy's score of each selected index, if any

    @property
    def test_accuracy(self) -> float:
        return self.metrics["test_accuracy"]

    @property
    def train_accuracy(self) -> float:
        return self.metrics["train_accuracy"]


@dataclass
class TrialState:
    """What continuing a trial after its first ``next_cycle`` cycles needs: the learner's state
    (labelled set, labels, model, auxiliary module) and the records so far.

    Nothing else carries over between cycles: every cycle's optimizer and schedule are created
    afresh (the published warm start) and every random choice is seeded from (trial seed, cycle),
    so a trial resumed from this state computes exactly what an uninterrupted one does.
    """

    next_cycle: int
    learner: dict[str, Any]
    records: list[CycleRecord] = field(default_factory=list)


def cycle_candidates(
    unlabeled: np.ndarray, subset_size: int | None, seed: int, cycle: int
) -> np.ndarray:
    """The candidates scored in ``cycle``: every unlabelled index, or a seeded random
    ``subset_size`` of them (sorted)."""
    if subset_size is None or subset_size >= len(unlabeled):
        return unlabeled
    return np.sort(rng(seed, SUBSET, cycle).choice(unlabeled, subset_size, replace=False))


def run_trial(
    learner: ActiveLearner,
    *,
    test: Dataset,
    schedule: LoopConfig,
    trial: int,
    on_cycle: Callable[[CycleRecord], None] | None = None,
    on_state: Callable[[TrialState], None] | None = None,
    on_trained: Callable[[int, nn.Module], None] | None = None,
    resume: TrialState | None = None,
) -> list[CycleRecord]:
    """Algorithm 1 for one strategy in one trial; one record per cycle.

    Every random choice is seeded from ``learner.seed`` (see :mod:`gradnorm_al.seeding`), so all
    strategies of a trial start from the same labelled pool and the same initial model. After
    every cycle ``on_state`` gets the :class:`TrialState` to continue from (then ``on_cycle`` the
    record); ``resume`` continues from such a state. ``on_trained(cycle, model)`` sees the task
    model of every cycle after its training, before its selection (T^c of the paper).
    """
    n, seed = learner.pool_size, learner.seed
    schedule.validate(n)
    k = schedule.budget(n)
    records = [] if resume is None else list(resume.records)
    if resume is None:
        learner.update(initial_indices(n, schedule.initial_fraction, rng(seed, INIT_POOL)))
    else:
        learner.load_state_dict(resume.learner)
    try:
        _cycles(learner, test, schedule, trial, records, k, on_cycle, on_state, on_trained)
    except NonFiniteError as err:  # the last finished cycle's state stays on disk
        raise NonFiniteError(
            f"strategy {learner.strategy.name}, trial {trial}, {err} (the state of the last "
            "finished cycle is kept)"
        ) from None
    return records


def _cycles(
    learner: ActiveLearner,
    test: Dataset,
    schedule: LoopConfig,
    trial: int,
    records: list[CycleRecord],
    k: int,
    on_cycle: Callable[[CycleRecord], None] | None,
    on_state: Callable[[TrialState], None] | None,
    on_trained: Callable[[int, nn.Module], None] | None,
) -> None:
    n, seed = learner.pool_size, learner.seed
    for cycle in range(len(records), schedule.cycles):
        labeled = len(learner.labeled)
        started = time.perf_counter()
        learner.fit()
        train_seconds = time.perf_counter() - started
        distributed.fault_point(learner.strategy.name, cycle)  # tests only: a process fails here
        metrics = {f"test_{m}": v for m, v in learner.evaluate(test).items()}
        metrics.update({f"train_{m}": v for m, v in learner.evaluate_labeled().items()})
        if on_trained is not None:
            on_trained(cycle, learner.model)
        selected = scores = select_seconds = None
        if cycle < schedule.cycles - 1:
            candidates = cycle_candidates(learner.unlabeled, schedule.subset_size, seed, cycle)
            started = time.perf_counter()
            selected, scores = learner.query(k, candidates), learner.last_scores
            select_seconds = time.perf_counter() - started
            learner.update(selected)
        records.append(
            CycleRecord(
                learner.strategy.name,
                trial,
                cycle,
                labeled,
                labeled / n,
                metrics,
                train_seconds,
                select_seconds,
                seed,
                selected,
                scores,
            )
        )
        if on_state is not None:
            last = cycle == schedule.cycles - 1
            on_state(TrialState(cycle + 1, learner.state_dict(include_model=not last), records[:]))
        if on_cycle is not None:
            on_cycle(records[-1])
