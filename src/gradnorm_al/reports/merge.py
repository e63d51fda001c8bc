"""Merging run folders: runs of different strategies made separately on the same protocol and
seeds are compared as one. Trial t of every run used seed ``seed + t``, so the curves of trial t
are paired across runs. Only (strategy, trial) curves that finished every cycle are kept; the others
are listed.

The folders come in as :class:`RunFolder` values (read by ``experiment.compare``): this module
computes on them and reads no file.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError

# Config keys that change what a learning curve measures: merged runs must agree on all of them.
# Not compared: strategies, strategy_params and norm (per strategy), trials (pairs use the shared
# trials), seed (checked separately, with its own message), and device, data_root, download,
# score_batch_size (where and how fast, not what).
PROTOCOL_KEYS = (
    "dataset",
    "pool_size",
    "model",
    "cycles",
    "initial_fraction",
    "budget_fraction",
    "subset_size",
    "reinit_each_cycle",
    "epochs",
    "lr",
    "momentum",
    "weight_decay",
    "milestones",
    "gamma",
    "batch_size",
    "augment",
    "reduction",
    "model_params",
    "amp",
)


@dataclass
class RunFolder:
    """One run folder as read from disk."""

    path: Path
    config: dict[str, Any]
    config_text: str
    rows: list[dict[str, Any]]
    defaults: Mapping[str, Any] = field(default_factory=dict)  # for keys config.yaml lacks

    def get(self, key: str) -> Any:
        return self.config.get(key, self.defaults.get(key))

    @property
    def strategies(self) -> list[str]:
        """Strategies with at least one row in results.csv, in order of first appearance."""
        return list(dict.fromkeys(row["strategy"] for row in self.rows))


@dataclass
class IncompleteCurve:
    """A (strategy, trial) of a run that did not finish every cycle (0 done: never started)."""

    run_dir: Path
    strategy: str
    trial: int
    cycles_done: int
    cycles_expected: int

    def describe(self) -> str:
        done = (
            "not started"
            if self.cycles_done == 0
            else f"{self.cycles_done} of {self.cycles_expected} cycles"
        )
        return f"{self.strategy} trial {self.trial} ({done}) in {self.run_dir}"


@dataclass
class MergedRuns:
    runs: list[RunFolder]
    rows: list[dict[str, Any]]  # rows of the complete (strategy, trial) curves only
    incomplete: list[IncompleteCurve]
    owner: dict[str, Path]  # strategy -> the run folder it comes from


def _test_metrics(run: RunFolder) -> list[str]:
    """The test metric columns of a run's results (test_accuracy; test_miou, ...)."""
    return [key for key in run.rows[0] if key.startswith("test_")]


def merge_runs(runs: list[RunFolder]) -> MergedRuns:
    """Check that ``runs`` can be compared and keep their complete curves.

    Refused (one-line ConfigError): a strategy in two runs, a protocol key that differs (named),
    different metric columns (a classification and a segmentation run), different seeds per
    trial, or different labelled fractions per cycle.
    """
    if not runs:
        raise ConfigError("give at least one run folder")
    owner: dict[str, Path] = {}
    for run in runs:
        for s in run.strategies:
            if s in owner:
                raise ConfigError(
                    f"strategy {s!r} appears in both {owner[s]} and {run.path}; give each "
                    "strategy's run folder only once"
                )
            owner[s] = run.path
    first = runs[0]
    for run in runs[1:]:
        for key in PROTOCOL_KEYS:
            a, b = first.get(key), run.get(key)
            if a != b:
                raise ConfigError(
                    f"the runs differ in protocol: {key} is {a!r} in {first.path} but {b!r} in "
                    f"{run.path}; only runs made with the same settings can be merged"
                )
        a, b = first.get("seed"), run.get("seed")
        if a != b:
            raise ConfigError(
                f"seeds per trial differ: {first.path} used seed {a} + trial but {run.path} "
                f"used {b} + trial; merge only runs made with the same --seed"
            )
    measured = [(run, _test_metrics(run)) for run in runs if run.rows]
    for run, metrics in measured[1:]:
        if metrics != measured[0][1]:
            raise ConfigError(
                f"the runs measure different metrics: {measured[0][0].path} has "
                f"{', '.join(measured[0][1])} but {run.path} has {', '.join(metrics)} (one is "
                "a classification run, the other a segmentation run?); merge runs of one task"
            )
    seeds: dict[int, tuple[int, Path]] = {}
    for run in runs:
        for row in run.rows:
            seen = seeds.setdefault(row["trial"], (row["seed"], run.path))
            if seen[0] != row["seed"]:
                raise ConfigError(
                    f"seeds per trial differ: trial {row['trial']} has seed {seen[0]} in "
                    f"{seen[1]} but {row['seed']} in {run.path}; merge only runs made with the "
                    "same seeds"
                )

    cycles = int(first.get("cycles"))
    complete: list[dict[str, Any]] = []
    incomplete: list[IncompleteCurve] = []
    for run in runs:
        curves: dict[tuple[str, int], dict[int, dict]] = defaultdict(dict)
        for row in run.rows:
            curves[(row["strategy"], row["trial"])][row["cycle"]] = row
        for (s, t), by_cycle in curves.items():
            if all(c in by_cycle for c in range(cycles)):
                complete.extend(by_cycle[c] for c in range(cycles))
            else:
                incomplete.append(IncompleteCurve(run.path, s, t, len(by_cycle), cycles))
        # strategies and trials the run was asked for but never started (unless another run has
        # the strategy: a strategy re-run separately after a crash is not missing)
        planned = run.get("strategies") or []
        for s in [*run.strategies, *[p for p in planned if p not in owner]]:
            for t in range(int(run.get("trials") or 0)):
                if (s, t) not in curves:
                    incomplete.append(IncompleteCurve(run.path, s, t, 0, cycles))

    reference: dict[int, tuple[float, str]] = {}
    for row in complete:
        c, f = row["cycle"], row["labeled_fraction"]
        ref = reference.setdefault(c, (f, f"{row['strategy']} trial {row['trial']}"))
        if not math.isclose(ref[0], f, rel_tol=1e-9, abs_tol=1e-12):
            raise ConfigError(
                f"labelled fractions differ at cycle {c}: {ref[0]:.6g} ({ref[1]}) vs {f:.6g} "
                f"({row['strategy']} trial {row['trial']} in {owner[row['strategy']]}); the runs "
                "did not use the same pool"
            )
    return MergedRuns(runs, complete, incomplete, owner)
