"""The results store of a run folder: results.csv and selections.jsonl, rewritten atomically."""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..atomic import atomic_write_text
from ..errors import FileFormatError, read_text
from ..loop import CycleRecord
from ..tasks import ClassificationTask, SegmentationTask
from .checkpoint import STATE_DIR

if TYPE_CHECKING:
    from .config import ExperimentConfig

HEAD_COLUMNS = ("strategy", "trial", "cycle", "num_labeled", "labeled_fraction")
TAIL_COLUMNS = ("train_seconds", "select_seconds", "seed")
#: the metric columns of each task's results.csv, in the order the runner writes them (the test_
#: metrics, the headline first, then the train_ ones)
TASK_COLUMNS = {
    task.name: tuple(f"{split}_{m}" for split in ("test", "train") for m in task.metrics)
    for task in (ClassificationTask, SegmentationTask)
}
#: the columns of a classification run; other tasks put their own metric columns in the middle
RESULT_COLUMNS = (*HEAD_COLUMNS, *TASK_COLUMNS["classification"], *TAIL_COLUMNS)
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
    crash leaves the files of the last finished cycle. ``write=False``: rows only, no file (the
    processes of a torchrun run but rank 0)."""

    def __init__(self, out_dir: Path, write: bool = True) -> None:
        self.out_dir = out_dir
        self.write = write
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
        if not self.write:
            return
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


# ----------------------------------------------------------------------------- reading back
#: endings of the metric columns whose values are fractions in [0, 1]: test_accuracy,
#: train_pixel_accuracy, test_miou, ...
FRACTION_METRICS = ("accuracy", "iou")
METRIC_PREFIXES = ("test_", "train_")
_INTS = ("trial", "cycle", "num_labeled", "seed")


def _fix(path: Path) -> str:
    """What to do about a damaged results.csv or selections.jsonl of the run folder holding it."""
    if (path.parent / STATE_DIR).is_dir():
        return (
            f"restore the file: `gradnorm-al run --resume {path.parent}` rewrites it from the "
            "run's checkpoints"
        )
    return "correct that line as `gradnorm-al run` writes it, or delete it"


def _integer(value: str) -> int | None:
    try:
        return int(value)
    except ValueError:
        return None


def read_results(path: str | Path, config: ExperimentConfig | None = None) -> list[dict[str, Any]]:
    """The rows of a results.csv, numeric columns parsed (an empty select_seconds -> None).

    Either task's columns are read: ``test_accuracy``, ``train_accuracy`` (classification) or
    ``test_miou``, ``test_pixel_accuracy``, ``train_miou``, ``train_pixel_accuracy``
    (segmentation), :data:`TASK_COLUMNS`; each row holds them in that order, so its first
    ``test_*`` key is the headline metric whatever the file's column order.

    Every value is checked, so reports and analyses never compute on a damaged or hand-edited
    file: :class:`~gradnorm_al.errors.FileFormatError` (``<file>:<line>: <what>; <fix>``) for a
    file that is not UTF-8 text, a missing or repeated column (a test_ metric without its train_
    counterpart or the other way round, part of a task's metric columns), a line with the wrong
    number of fields, an empty value (but select_seconds), a trial, cycle, num_labeled or seed
    that is not a whole number >= 0, a non-finite number, a metric (accuracy, mIoU, pixel
    accuracy) outside [0, 1], a labelled fraction outside (0, 1], a repeated (strategy, trial,
    cycle), labelled counts or fractions that do not grow from cycle to cycle, and, given the
    run's ``config``, a strategy, trial or cycle the run was not configured with.
    """
    path = Path(path)
    fix = _fix(path)
    text = read_text(path, fix)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
    except csv.Error as err:
        raise FileFormatError(path, 1, f"the header is not CSV ({err})", fix) from None
    if not header:
        raise FileFormatError(path, 1, "the file is empty, not a results table", fix)
    missing = [c for c in (*HEAD_COLUMNS, *TAIL_COLUMNS) if c not in header]
    missing += _missing_metrics(header)
    if not metric_columns(header):
        tasks = " or ".join(f"{', '.join(cols)} ({name})" for name, cols in TASK_COLUMNS.items())
        raise FileFormatError(
            path, 1, f"the header has no metric columns; a run writes {tasks}", fix
        )
    if missing:
        raise FileFormatError(path, 1, f"the header lacks the column(s) {', '.join(missing)}", fix)
    repeated = sorted({c for c in header if header.count(c) > 1})
    if repeated:
        raise FileFormatError(path, 1, f"the header repeats {', '.join(repeated)}", fix)
    metrics = _metric_order(metric_columns(header))
    # rows keep the task's column order whatever the file's: the first test_ column is the
    # headline of every report
    order = [*HEAD_COLUMNS, *metrics]
    order += [c for c in header if c not in order]
    rows: list[dict[str, Any]] = []
    first_line: dict[tuple[str, int, int], int] = {}
    while True:
        try:
            raw = next(reader, None)
        except csv.Error as err:
            raise FileFormatError(path, reader.line_num, f"not CSV ({err})", fix) from None
        if raw is None:
            break
        line = reader.line_num
        if not raw:  # a blank line
            continue
        if len(raw) != len(header):
            raise FileFormatError(
                path, line, f"{len(raw)} fields where the header has {len(header)}", fix
            )
        error = partial(FileFormatError, path, line, fix=fix)  # error(what is wrong)
        fields = dict(zip(header, raw))
        row = _parse_row({c: fields[c] for c in order}, metrics, error)
        key = (row["strategy"], row["trial"], row["cycle"])
        if key in first_line:
            raise FileFormatError(
                path,
                line,
                f"{key[0]} trial {key[1]} cycle {key[2]} is already on line {first_line[key]}",
                fix,
            )
        first_line[key] = line
        if config is not None:
            _check_against_config(row, config, error)
        rows.append(row)
    _check_growth(rows, first_line, path, fix)
    return rows


def metric_columns(columns: list[str]) -> list[str]:
    """The metric columns (``test_*``, ``train_*``) among results.csv ``columns``, in order."""
    fixed = (*HEAD_COLUMNS, *TAIL_COLUMNS)
    return [c for c in columns if c.startswith(METRIC_PREFIXES) and c not in fixed]


def _missing_metrics(header: list[str]) -> list[str]:
    """The metric columns a results.csv header lacks: every test_ metric needs its train_
    counterpart and the other way round, and a header with part of a task's metrics
    (:data:`TASK_COLUMNS`) needs the rest."""
    present = metric_columns(header)
    missing = []
    for task_columns in TASK_COLUMNS.values():
        if set(present) & set(task_columns):
            missing += [c for c in task_columns if c not in present and c not in missing]
    for column in present:
        split, metric = column.split("_", 1)
        other = f"{'train' if split == 'test' else 'test'}_{metric}"
        if other not in present and other not in missing:
            missing.append(other)
    return missing


def _metric_order(metrics: list[str]) -> list[str]:
    """A task's metric columns in the order its runs write them (others: test_ ones first)."""
    for task_columns in TASK_COLUMNS.values():
        if set(metrics) == set(task_columns):
            return list(task_columns)
    return sorted(metrics, key=lambda c: not c.startswith("test_"))


def _parse_row(
    raw: dict[str, str], metrics: list[str], error: Callable[[str], FileFormatError]
) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for key, value in raw.items():
        value = value.strip()
        if key == "strategy":
            if not value:
                raise error("the strategy is empty")
            row[key] = value
        elif value == "":
            if key != "select_seconds":
                raise error(f"{key} is empty")
            row[key] = None
        elif key in _INTS:
            number = _integer(value)
            if number is None or number < 0:
                raise error(f"{key} must be a whole number >= 0, got {value!r}")
            row[key] = number
        else:
            try:
                number = float(value)
            except ValueError:
                raise error(f"{key} must be a number, got {value!r}") from None
            if not math.isfinite(number):
                raise error(f"{key} must be a finite number, got {value!r}")
            if key == "labeled_fraction" and not 0 < number <= 1:
                raise error(f"labeled_fraction must be in (0, 1], got {value}")
            if key in metrics and key.endswith(FRACTION_METRICS) and not 0 <= number <= 1:
                raise error(f"{key} must be a fraction in [0, 1], got {value}")
            if key.endswith("_seconds") and number < 0:
                raise error(f"{key} must be >= 0, got {value}")
            row[key] = number
    return row


def _check_against_config(
    row: dict[str, Any], config: ExperimentConfig, error: Callable[[str], FileFormatError]
) -> None:
    if row["strategy"] not in config.strategies:
        raise error(
            f"strategy {row['strategy']!r} is not among config.yaml's strategies "
            f"({', '.join(config.strategies)})"
        )
    for key, limit in (("trial", config.trials), ("cycle", config.cycles)):
        if row[key] >= limit:
            raise error(
                f"{key} {row[key]} is beyond config.yaml's {limit} {key}s (0 to {limit - 1})"
            )


def _check_growth(
    rows: list[dict[str, Any]], lines: dict[tuple[str, int, int], int], path: Path, fix: str
) -> None:
    """Each curve's labelled count and fraction grow from cycle to cycle."""
    curves: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        curves[(row["strategy"], row["trial"])].append(row)
    for curve in curves.values():
        curve.sort(key=lambda r: r["cycle"])
        for before, row in zip(curve, curve[1:]):
            for key in ("num_labeled", "labeled_fraction"):
                if row[key] <= before[key]:
                    line = lines[(row["strategy"], row["trial"], row["cycle"])]
                    raise FileFormatError(
                        path,
                        line,
                        f"{key} {row[key]:g} of cycle {row['cycle']} is not above cycle "
                        f"{before['cycle']}'s {before[key]:g}",
                        fix,
                    )


@dataclass(frozen=True)
class SelectionRecord:
    """One line of selections.jsonl: the pool indices a selection added (and their scores)."""

    strategy: str
    trial: int
    cycle: int
    indices: np.ndarray  # int64
    scores: np.ndarray | None  # float64, one per index
    line: int  # where it is in the file, for messages


def read_selections(path: str | Path) -> dict[tuple[str, int, int], SelectionRecord]:
    """The selections of a selections.jsonl by (strategy, trial, cycle).

    :class:`~gradnorm_al.errors.FileFormatError` (``<file>:<line>: <what>; <fix>``) for a file
    that is not UTF-8 text, a line that is not a JSON object (cut short, edited), a missing or
    mistyped field, an index that is not a whole number >= 0 or is repeated, scores that are not
    one finite number per index, and a (strategy, trial, cycle) given twice.
    """
    path = Path(path)
    fix = _fix(path)
    out: dict[tuple[str, int, int], SelectionRecord] = {}
    for line, text in enumerate(read_text(path, fix).splitlines(), start=1):
        if not text.strip():
            continue

        def error(what: str, line: int = line) -> FileFormatError:
            return FileFormatError(path, line, what, fix)

        try:
            item = json.loads(text)
        except ValueError as err:
            where = f" at column {err.colno}" if isinstance(err, json.JSONDecodeError) else ""
            raise error(f"not a JSON object ({getattr(err, 'msg', err)}{where})") from None
        if not isinstance(item, dict):
            raise error(f"not a JSON object but {type(item).__name__}")
        missing = [k for k in ("strategy", "trial", "cycle", "indices") if k not in item]
        if missing:
            raise error(f"the selection lacks {', '.join(missing)}")
        if not isinstance(item["strategy"], str) or not item["strategy"]:
            raise error(f"strategy must be a name, got {item['strategy']!r}")
        for key in ("trial", "cycle"):
            if not _whole(item[key]):
                raise error(f"{key} must be a whole number >= 0, got {item[key]!r}")
        indices = item["indices"]
        if not isinstance(indices, list) or not indices:
            raise error(f"indices must be a non-empty list of pool indices, got {indices!r}")
        bad = [i for i in indices if not _whole(i)]
        if bad:
            raise error(f"indices must be whole numbers >= 0, got {bad[0]!r}")
        if len(set(indices)) != len(indices):
            repeated = next(i for i in indices if indices.count(i) > 1)
            raise error(f"index {repeated} is selected twice")
        scores = item.get("scores")
        if scores is not None:
            if (
                not isinstance(scores, list)
                or len(scores) != len(indices)
                or not all(_finite(v) for v in scores)
            ):
                raise error(f"scores must be {len(indices)} finite numbers, one per index")
            scores = np.asarray(scores, dtype=np.float64)
        key = (item["strategy"], item["trial"], item["cycle"])
        if key in out:
            raise error(
                f"{key[0]} trial {key[1]} cycle {key[2]} is already on line {out[key].line}"
            )
        out[key] = SelectionRecord(*key, np.asarray(indices, dtype=np.int64), scores, line)
    return out


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
