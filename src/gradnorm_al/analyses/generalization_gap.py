"""Table 3 of the paper: the generalization gap per strategy and cycle, the headline metric on the
labelled training set minus on the test set (accuracy; segmentation: mIoU), from a run folder's
results alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..reports.summary import headline_metric, metric_label
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
    """Per strategy and cycle: the headline metric (:func:`~gradnorm_al.reports.summary.
    headline_metric`: accuracy, segmentation mIoU) on the labelled set minus on the test set
    (percentage points), mean and sample std over trials, with both metrics' means in columns
    named like the results' (``train_accuracy``, ``test_accuracy``; ``train_miou``,
    ``test_miou``)."""
    test = headline_metric(rows)
    train = "train_" + test.removeprefix("test_")
    out = []
    for (strategy, cycle), group in by_strategy_cycle(rows).items():
        gaps = [100 * (r[train] - r[test]) for r in group]
        mean, std = mean_std(gaps)
        out.append(
            {
                "strategy": strategy,
                "cycle": cycle,
                "num_labeled": group[0]["num_labeled"],
                train: 100 * float(np.mean([r[train] for r in group])),
                test: 100 * float(np.mean([r[test] for r in group])),
                "gap_mean": mean,
                "gap_std": std,
                "trials": len(group),
            }
        )
    return out


def write_generalization_gap(run_dir: Path, out_dir: Path | None = None) -> str:
    """Write analysis/generalization_gap.{md,csv}; return the markdown."""
    rows = read_rows(run_dir)
    records = generalization_gap(rows)
    what = metric_label(headline_metric(rows)).removeprefix("test ")  # accuracy, mIoU
    md = (
        "# Generalization gap (Table 3)\n\n"
        f"Training {what} on the labelled set minus test {what}, percentage points, mean ± "
        "std over trials (the mean alone for one trial), per cycle (labelled samples in "
        "brackets).\n\n" + pivot(records, lambda r: plus_minus(r["gap_mean"], r["gap_std"]))
    )
    write_tables(run_dir, out_dir, "generalization_gap", md, to_csv(records))
    return md


@register_analysis(
    "generalization-gap",
    "training minus test accuracy (segmentation: mIoU) per strategy and cycle (Table 3)",
)
def run_generalization_gap(run_dir: Path, out_dir: Path | None, log: Log) -> str:
    return write_generalization_gap(run_dir, out_dir)
