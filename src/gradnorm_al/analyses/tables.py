"""What the analyses' tables share: the results rows they start from, means over trials per
strategy and cycle, markdown pivots (strategies x cycles), CSV, and writing both under
``DIR/analysis``."""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_write_text
from ..errors import RunDirectoryError
from ..experiment.results import RESULTS_FILE, read_results
from ..experiment.runner import read_run_config

ANALYSIS_DIR = "analysis"


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of a run folder's results.csv, checked against its config.yaml; a one-line error
    if it has none or a file is damaged."""
    path = Path(run_dir) / RESULTS_FILE
    if not path.is_file():
        raise RunDirectoryError(f"{run_dir} holds no {RESULTS_FILE}; give a run folder")
    rows = read_results(path, read_run_config(run_dir))
    if not rows:
        raise RunDirectoryError(f"{path} has no finished cycle yet")
    return rows


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (NaN for one value)."""
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else float("nan")


def by_strategy_cycle(rows: list[dict[str, Any]]) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """Rows grouped by (strategy, cycle), groups and rows in first-seen order."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["strategy"], row["cycle"])].append(row)
    return groups


def summarise_trials(
    records: list[dict[str, Any]], fields: tuple[str, ...], keep: tuple[str, ...]
) -> list[dict[str, Any]]:
    """Mean and std over trials of ``fields`` per (strategy, cycle); ``keep`` copied from the
    first trial."""
    out = []
    for (strategy, cycle), group in by_strategy_cycle(records).items():
        row: dict[str, Any] = {"strategy": strategy, "cycle": cycle}
        row.update({k: group[0][k] for k in keep})
        for f in fields:
            row[f"{f}_mean"], row[f"{f}_std"] = mean_std([r[f] for r in group])
        row["trials"] = len(group)
        out.append(row)
    return out


def plus_minus(mean: float, std: float, digits: int = 1) -> str:
    """``mean ± std``, or the mean alone where std is NaN (one trial)."""
    return f"{mean:.{digits}f}" if np.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def to_csv(records: list[dict[str, Any]]) -> str:
    """The records as CSV text, columns in the first record's order; None and NaN (a std of
    one trial) -> empty."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(records[0]), lineterminator="\n")
    writer.writeheader()
    for r in records:
        writer.writerow({k: ("" if v is None or v != v else v) for k, v in r.items()})
    return buf.getvalue()


def pivot(records: list[dict[str, Any]], cell: Callable[[dict[str, Any]], str]) -> str:
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


def write_tables(run_dir: Path, out_dir: Path | None, name: str, md: str, csv_text: str) -> None:
    """Write ``name``.md and ``name``.csv into ``out_dir`` (None: ``run_dir/analysis``)."""
    folder = Path(out_dir) if out_dir is not None else Path(run_dir) / ANALYSIS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / f"{name}.md", md)
    atomic_write_text(folder / f"{name}.csv", csv_text)
