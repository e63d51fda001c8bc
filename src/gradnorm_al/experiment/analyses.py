"""The paper's analyses that a run folder's results already hold: the generalization gap per
strategy and cycle (Table 3) and selection / training time per cycle (Appendix A.7)."""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_write_text
from ..errors import RunDirectoryError
from .results import RESULTS_FILE, read_results

ANALYSIS_DIR = "analysis"


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / RESULTS_FILE
    if not path.is_file():
        raise RunDirectoryError(f"{run_dir} holds no {RESULTS_FILE}; give a run folder")
    rows = read_results(path)
    if not rows:
        raise RunDirectoryError(f"{path} has no finished cycle yet")
    return rows


def _mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else float("nan")


def _grouped(rows: list[dict[str, Any]]) -> dict[tuple[str, int], list[dict[str, Any]]]:
    groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["strategy"], row["cycle"])].append(row)
    return groups


def generalization_gap(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per strategy and cycle: training accuracy on the labelled set minus test accuracy
    (percentage points), mean and sample std over trials, with both accuracies' means."""
    out = []
    for (strategy, cycle), group in _grouped(rows).items():
        gaps = [100 * (r["train_accuracy"] - r["test_accuracy"]) for r in group]
        mean, std = _mean_std(gaps)
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


def timing(rows: list[dict[str, Any]], subset_size: int | None) -> list[dict[str, Any]]:
    """Per strategy and cycle: mean training and selection seconds over trials and the number of
    candidates scored (every unlabelled sample, or ``subset_size`` of them)."""
    out = []
    for (strategy, cycle), group in _grouped(rows).items():
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


def _csv(records: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(records[0]), lineterminator="\n")
    writer.writeheader()
    for r in records:
        writer.writerow({k: ("" if v is None else v) for k, v in r.items()})
    return buf.getvalue()


def _pivot(records: list[dict[str, Any]], cell) -> str:
    """A markdown table: strategies (first-seen order) x cycles (labelled count)."""
    strategies = list(dict.fromkeys(r["strategy"] for r in records))
    cycles = sorted({(r["cycle"], r["num_labeled"]) for r in records})
    by_key = {(r["strategy"], r["cycle"]): r for r in records}
    head = "| strategy | " + " | ".join(f"c{c} ({n})" for c, n in cycles) + " |"
    lines = [head, "|---" * (len(cycles) + 1) + "|"]
    for s in strategies:
        cells = [cell(by_key[(s, c)]) if (s, c) in by_key else "" for c, _ in cycles]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_generalization_gap(run_dir: Path, out_dir: Path | None = None) -> str:
    """Write analysis/generalization_gap.{md,csv}; return the markdown."""
    records = generalization_gap(_rows(run_dir))
    md = (
        "# Generalization gap (Table 3)\n\n"
        "Training accuracy on the labelled set minus test accuracy, percentage points, mean ± "
        "std over trials, per cycle (labelled samples in brackets).\n\n"
        + _pivot(records, lambda r: f"{r['gap_mean']:.1f} ± {r['gap_std']:.1f}")
    )
    _write(run_dir, out_dir, "generalization_gap", md, _csv(records))
    return md


def write_timing(run_dir: Path, subset_size: int | None, out_dir: Path | None = None) -> str:
    """Write analysis/timing.{md,csv}; return the markdown."""
    records = timing(_rows(run_dir), subset_size)

    def cell(r: dict[str, Any]) -> str:
        select = "—" if r["select_seconds"] is None else f"{r['select_seconds']:.2f}"
        return f"{r['train_seconds']:.1f} / {select} ({r['candidates']})"

    md = (
        "# Training and selection time (Appendix A.7)\n\n"
        "Seconds per cycle, mean over trials: training / selection (candidates scored); the "
        "last cycle does not select.\n\n" + _pivot(records, cell)
    )
    _write(run_dir, out_dir, "timing", md, _csv(records))
    return md


def _write(run_dir: Path, out_dir: Path | None, name: str, md: str, csv_text: str) -> None:
    folder = Path(out_dir) if out_dir is not None else Path(run_dir) / ANALYSIS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / f"{name}.md", md)
    atomic_write_text(folder / f"{name}.csv", csv_text)
