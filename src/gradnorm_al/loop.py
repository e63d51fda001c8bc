"""Algorithm 1 for one trial of one strategy: train, evaluate, select, repeat."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ._torch import snapshot
from .data import DatasetBundle
from .errors import ConfigError
from .options import option
from .pool import Pool, initial_count
from .seeding import (
    AUXILIARY_INIT,
    INIT_POOL,
    MODEL_INIT,
    STRATEGY,
    SUBSET,
    TRAIN,
    derive_seed,
    rng,
)
from .strategies import SelectionContext, Strategy
from .train import Auxiliary, TrainConfig, accuracy, fit


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
    """One row of results.csv plus the indices this cycle's selection added (None in the last)."""

    strategy: str
    trial: int
    cycle: int
    num_labeled: int
    labeled_fraction: float
    test_accuracy: float
    train_accuracy: float
    train_seconds: float
    select_seconds: float | None
    seed: int
    selected: np.ndarray | None = None


@dataclass
class TrialState:
    """What continuing a trial after its first ``next_cycle`` cycles needs.

    Nothing else carries over between cycles: every cycle's optimizer and schedule are created
    afresh (the published warm start) and every random choice is seeded from (trial seed, cycle),
    so a trial resumed from this state computes exactly what an uninterrupted one does.
    """

    next_cycle: int
    pool: dict  # Pool.state_dict(): the labelled set after the last finished cycle's selection
    model: dict[str, torch.Tensor] | None  # the task model after that cycle (the warm start)
    auxiliary: dict[str, torch.Tensor] | None  # the strategy's auxiliary module, if any
    records: list[CycleRecord]


def cycle_candidates(
    unlabeled: np.ndarray, subset_size: int | None, seed: int, cycle: int
) -> np.ndarray:
    """The candidates scored in ``cycle``: every unlabelled index, or a seeded random
    ``subset_size`` of them (sorted)."""
    if subset_size is None or subset_size >= len(unlabeled):
        return unlabeled
    return np.sort(rng(seed, SUBSET, cycle).choice(unlabeled, subset_size, replace=False))


def run_trial(
    *,
    bundle: DatasetBundle,
    model_factory: Callable[[], nn.Module],
    strategy: Strategy,
    strategy_name: str,
    trial: int,
    seed: int,
    loop: LoopConfig,
    train: TrainConfig,
    device: torch.device,
    progress: bool = False,
    on_cycle: Callable[[CycleRecord], None] | None = None,
    on_state: Callable[[TrialState], None] | None = None,
    on_trained: Callable[[int, nn.Module], None] | None = None,
    resume: TrialState | None = None,
) -> list[CycleRecord]:
    """Run Algorithm 1 for one strategy in one trial and return one record per cycle.

    Every random choice is seeded from ``seed`` (see :mod:`gradnorm_al.seeding`), so all strategies
    of a trial start from the same labelled pool and the same initial model. After every cycle
    ``on_state`` gets the :class:`TrialState` to continue from (then ``on_cycle`` the record);
    ``resume`` continues from such a state. ``on_trained(cycle, model)`` sees the task model of
    every cycle after its training, before its selection (T^c of the paper).
    """
    n = bundle.pool_size
    loop.validate(n)
    k = loop.budget(n)
    pool = Pool.initial(n, loop.initial_fraction, rng(seed, INIT_POOL))

    def build(model_seed: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(model_seed)
            return strategy.prepare_model(model_factory()).to(device)

    def trainer(indices: np.ndarray, member_seed: int) -> nn.Module:
        """A fresh model trained like the task model on ``indices`` (for committees)."""
        member = build(member_seed)
        fit(member, bundle.train, indices, train, device=device, seed=member_seed)
        return member

    def build_with_auxiliary(cycle: int) -> tuple[nn.Module, Auxiliary | None]:
        built = cycle if loop.reinit_each_cycle else 0
        model = build(derive_seed(seed, MODEL_INIT, built))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, AUXILIARY_INIT, built))
            return model, strategy.auxiliary(model)

    model: nn.Module | None = None
    auxiliary: Auxiliary | None = None
    records: list[CycleRecord] = []
    start = 0
    if resume is not None:
        start, records = resume.next_cycle, list(resume.records)
        pool.load_state_dict(resume.pool)
        if resume.model is not None and start < loop.cycles:
            model, auxiliary = build_with_auxiliary(start - 1)
            model.load_state_dict(resume.model)
            if auxiliary is not None and resume.auxiliary is not None:
                auxiliary.module.load_state_dict(resume.auxiliary)
    for cycle in range(start, loop.cycles):
        if model is None or loop.reinit_each_cycle:
            model, auxiliary = build_with_auxiliary(cycle)
        labeled = pool.labeled()
        tag = f"{strategy_name} t{trial} c{cycle}"
        started = time.perf_counter()
        fit(
            model,
            bundle.train,
            labeled,
            train,
            device=device,
            seed=derive_seed(seed, TRAIN, cycle),
            progress=progress,
            desc=f"train {tag}",
            auxiliary=auxiliary,
        )
        train_seconds = time.perf_counter() - started
        test_acc = accuracy(model, bundle.test, device=device, batch_size=train.eval_batch_size)
        train_acc = accuracy(
            model, bundle.train_eval, labeled, device=device, batch_size=train.eval_batch_size
        )
        if on_trained is not None:
            on_trained(cycle, model)
        selected, select_seconds = None, None
        if cycle < loop.cycles - 1:
            candidates = cycle_candidates(pool.unlabeled(), loop.subset_size, seed, cycle)
            ctx = SelectionContext(
                model=model,
                pool=bundle.train_eval,
                candidates=candidates,
                labeled=labeled,
                num_classes=bundle.num_classes,
                device=device,
                rng=rng(seed, STRATEGY, cycle),
                batch_size=loop.score_batch_size,
                progress=progress,
                trainer=trainer,
            )
            started = time.perf_counter()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(seed, STRATEGY, cycle))
                selected = strategy(ctx, k)
            select_seconds = time.perf_counter() - started
            pool.label(selected, cycle + 1)
        record = CycleRecord(
            strategy=strategy_name,
            trial=trial,
            cycle=cycle,
            num_labeled=len(labeled),
            labeled_fraction=len(labeled) / n,
            test_accuracy=test_acc,
            train_accuracy=train_acc,
            train_seconds=train_seconds,
            select_seconds=select_seconds,
            seed=seed,
            selected=selected,
        )
        records.append(record)
        if on_state is not None:
            last = cycle == loop.cycles - 1
            on_state(
                TrialState(
                    next_cycle=cycle + 1,
                    pool=pool.state_dict(),
                    model=None if last else snapshot(model),
                    auxiliary=None if last or auxiliary is None else snapshot(auxiliary.module),
                    records=list(records),
                )
            )
        if on_cycle is not None:
            on_cycle(record)
    return records
