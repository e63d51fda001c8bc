"""Appendix A.7 of the paper: training and selection time per strategy and cycle, from a run
folder's results alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..experiment.runner import read_run_config
from .base import Log, register_analysis
from .tables import by_strategy_cycle, pivot, read_rows, to_csv, write_tables


def timing(rows: list[dict[str, Any]], subset_size: int | None) -> list[dict[str, Any]]:
    """Per strategy and cycle: mean training and selection seconds over trials and the number of
    candidates scored (every unlabelled sample, or ``subset_size`` of them)."""
    out = []
    for (strategy, cycle), group in by_strategy_cycle(rows).items():
        first = group[0]
        pool = round(first["num_labeled"] / first["labeled_fraction"])
        unlabeled = pool - first["num_labeled"]
        selects = [r["select_seconds"] for r in group if r["select_seconds"] is not None]
        out.append(
            {
                "strategy": strategy,
                "cycle": cycle,
                "num_labeled": first["num_labeled"],
                "candidates": (
                    (unlabeled if subset_size is None else min(subset_size, unlabeled))
                    if selects
                    else 0
                ),
                "train_seconds": float(np.mean([r["train_seconds"] for r in group])),
                "select_seconds": float(np.mean(selects)) if selects else None,
                "trials": len(group),
            }
        )
    return out


def write_timing(run_dir: Path, subset_size: int | None, out_dir: Path | None = None) -> str:
    """Write analysis/timing.{md,csv}; return the markdown."""
    records = timing(read_rows(run_dir), subset_size)

    def cell(r: dict[str, Any]) -> str:
        select = "—" if r["select_seconds"] is None else f"{r['select_seconds']:.2f}"
        return f"{r['train_seconds']:.1f} / {select} ({r['candidates']})"

    md = (
        "# Training and selection time (Appendix A.7)\n\n"
        "Seconds per cycle, mean over trials: training / selection (candidates scored); the "
        "last cycle does not select.\n\n" + pivot(records, cell)
    )
    write_tables(run_dir, out_dir, "timing", md, to_csv(records))
    return md


@register_analysis("timing", "training and selection time per strategy and cycle (Appendix A.7)")
def run_timing(run_dir: Path, out_dir: Path | None, log: Log) -> str:
    subset = read_run_config(run_dir).subset_size
    return write_timing(run_dir, subset, out_dir)
