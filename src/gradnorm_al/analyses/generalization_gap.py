"""Table 3 of the paper: the generalization gap per strategy and cycle, training accuracy on the
labelled set minus test accuracy, from a run folder's results alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .base import Log, register_analysis
from .tables import (
    by_strategy_cycle,
    mean_std,
    pivot,
    plus_minus,
    read_rows,
    to_csv,
    write_tables,
)


def generalization_gap(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per strategy and cycle: training accuracy on the labelled set minus test accuracy
    (percentage points), mean and sample std over trials, with both accuracies' means."""
    out = []
    for (strategy, cycle), group in by_strategy_cycle(rows).items():
        gaps = [100 * (r["train_accuracy"] - r["test_accuracy"]) for r in group]
        mean, std = mean_std(gaps)
        out.append(
            {
                "strategy": strategy,
                "cycle": cycle,
                "num_labeled": group[0]["num_labeled"],
                "train_accuracy": 100 * float(np.mean([r["train_accuracy"] for r in group])),
                "test_accuracy": 100 * float(np.mean([r["test_accuracy"] for r in group])),
                "gap_mean": mean,
                "gap_std": std,
                "trials": len(group),
            }
        )
    return out


def write_generalization_gap(run_dir: Path, out_dir: Path | None = None) -> str:
    """Write analysis/generalization_gap.{md,csv}; return the markdown."""
    records = generalization_gap(read_rows(run_dir))
    md = (
        "# Generalization gap (Table 3)\n\n"
        "Training accuracy on the labelled set minus test accuracy, percentage points, mean ± "
        "std over trials (the mean alone for one trial), per cycle (labelled samples in "
        "brackets).\n\n" + pivot(records, lambda r: plus_minus(r["gap_mean"], r["gap_std"]))
    )
    write_tables(run_dir, out_dir, "generalization_gap", md, to_csv(records))
    return md


@register_analysis(
    "generalization-gap", "training minus test accuracy per strategy and cycle (Table 3)"
)
def run_generalization_gap(run_dir: Path, out_dir: Path | None, log: Log) -> str:
    return write_generalization_gap(run_dir, out_dir)
