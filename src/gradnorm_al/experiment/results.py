"""The results store of a run folder: results.csv and selections.jsonl, rewritten atomically."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_text
from ..loop import CycleRecord

HEAD_COLUMNS = ("strategy", "trial", "cycle", "num_labeled", "labeled_fraction")
TAIL_COLUMNS = ("train_seconds", "select_seconds", "seed")
#: the columns of a classification run; other tasks put their own metric columns in the middle
RESULT_COLUMNS = (*HEAD_COLUMNS, "test_accuracy", "train_accuracy", *TAIL_COLUMNS)
RESULTS_FILE = "results.csv"
SELECTIONS_FILE = "selections.jsonl"


def record_row(record: CycleRecord) -> dict[str, Any]:
    """The results.csv row of a cycle (select_seconds is empty in the last cycle: no selection):
    the fixed columns around the task's metric columns."""
    row = {name: getattr(record, name) for name in HEAD_COLUMNS}
    row.update(record.metrics)
    row.update({name: getattr(record, name) for name in TAIL_COLUMNS})
    return row


class ResultsStore:
    """Accumulates rows and selections; every :meth:`add` rewrites both files atomically, so a
    crash leaves the files of the last finished cycle."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.rows: list[dict[str, Any]] = []
        self.selections: list[dict[str, Any]] = []

    def add(self, record: CycleRecord, flush: bool = True) -> None:
        self.rows.append(record_row(record))
        if record.selected is not None:
            selection = {
                "strategy": record.strategy,
                "trial": record.trial,
                "cycle": record.cycle,
                "indices": [int(i) for i in record.selected],
            }
            if record.scores is not None:  # the strategy's score of each selected index
                selection["scores"] = [float(v) for v in record.scores]
            self.selections.append(selection)
        if flush:
            self.flush()

    def flush(self) -> None:
        atomic_write_text(self.out_dir / RESULTS_FILE, rows_to_csv(self.rows))
        atomic_write_text(
            self.out_dir / SELECTIONS_FILE, "".join(json.dumps(s) + "\n" for s in self.selections)
        )


def rows_to_csv(rows: list[dict[str, Any]]) -> str:
    columns = list(rows[0]) if rows else list(RESULT_COLUMNS)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row[k] is None else row[k]) for k in columns})
    return buf.getvalue()


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a results.csv with numeric columns parsed (empty select_seconds -> None)."""
    ints = {"trial", "cycle", "num_labeled", "seed"}
    rows = []
    with open(path, newline="", encoding="utf-8") as fh:
        for raw in csv.DictReader(fh):
            row: dict[str, Any] = {}
            for key, value in raw.items():
                if key == "strategy":
                    row[key] = value
                elif value == "":
                    row[key] = None
                else:
                    row[key] = int(value) if key in ints else float(value)
            rows.append(row)
    return rows
