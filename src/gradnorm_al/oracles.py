"""Oracles: where labels come from when the learner is not handed them.

An oracle is anything with ``labels(indices) -> labels``: one label per pool index, in the order
asked. A benchmark answers from the dataset's own targets (:class:`DatasetOracle`); a script or an
annotation tool answers through a function (:class:`CallbackOracle`); a person answers through
files (:class:`HumanOracle`).
"""

from __future__ import annotations

import csv
import io
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from .atomic import atomic_write_text
from .errors import DataError, OracleTimeoutError, read_text


@runtime_checkable
class Oracle(Protocol):
    """Answers label requests: ``labels(indices)`` returns one label per pool index."""

    def labels(self, indices: np.ndarray) -> Sequence[Any] | np.ndarray | torch.Tensor: ...


class DatasetOracle:
    """The pool's own labels (benchmarks): a targets array, or the second item of each
    ``dataset[i]``.

    Parameters
    ----------
    source : an array-like of targets, one per pool index, or a Dataset whose items are
        ``(input, target, ...)``. A :class:`TensorDataset` (behind any Subsets) is read by
        indexing its target tensor, and a dataset with a ``target(index)`` method (behind any
        Subsets; e.g. a folder of masks) through it, without loading inputs.
    """

    def __init__(self, source: Dataset | np.ndarray | torch.Tensor | Sequence[Any]) -> None:
        self._targets: torch.Tensor | np.ndarray | None = None
        self._dataset: Dataset | None = None
        if isinstance(source, Dataset):
            tensors = _target_tensor(source)
            if tensors is not None:
                self._targets = tensors
            else:
                self._dataset = source
        else:
            self._targets = source if isinstance(source, torch.Tensor) else np.asarray(source)

    def labels(self, indices: np.ndarray) -> torch.Tensor | np.ndarray | list[Any]:
        idx = np.asarray(indices, dtype=np.int64)
        if self._targets is not None:
            if idx.size and (idx.min() < 0 or idx.max() >= len(self._targets)):
                raise DataError(f"label request out of range for {len(self._targets)} targets")
            if isinstance(self._targets, torch.Tensor):
                return self._targets[torch.from_numpy(idx)]
            return self._targets[idx]
        assert self._dataset is not None
        out = []
        if idx.size and (idx.min() < 0 or idx.max() >= len(self._dataset)):
            raise DataError(f"label request out of range for a pool of {len(self._dataset)}")
        reader = _target_reader(self._dataset)
        if reader is not None:
            return [reader(i) for i in idx.tolist()]
        for i in idx.tolist():
            item = self._dataset[i]
            if not isinstance(item, (tuple, list)) or len(item) < 2:
                raise DataError(
                    f"pool item {i} has no target: a DatasetOracle needs (input, target) items; "
                    "give the labels through update(indices, labels) or a CallbackOracle"
                )
            out.append(item[1])
        return out


def _target_tensor(dataset: Dataset) -> torch.Tensor | None:
    """The target tensor of a TensorDataset behind any Subsets, re-indexed to ``dataset``."""
    idx = None
    while isinstance(dataset, Subset):
        base = torch.as_tensor(np.asarray(dataset.indices, dtype=np.int64))
        idx = base if idx is None else base[idx]
        dataset = dataset.dataset
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) > 1:
        targets = dataset.tensors[1]
        return targets if idx is None else targets[idx]
    return None


def _target_reader(dataset: Dataset) -> Callable[[int], Any] | None:
    """``index -> target`` through the ``target(index)`` method of the dataset behind any
    Subsets (None when it has none)."""
    maps: list[list[int]] = []
    while isinstance(dataset, Subset):
        maps.append(list(dataset.indices))
        dataset = dataset.dataset
    read = getattr(dataset, "target", None)
    if not callable(read):
        return None

    def target(index: int) -> Any:
        for indices in maps:
            index = int(indices[index])
        return read(index)

    return target


class CallbackOracle:
    """Labels from a function ``fn(indices) -> labels`` (a person, a script, a labelling tool)."""

    def __init__(self, fn: Callable[[np.ndarray], Any]) -> None:
        if not callable(fn):
            raise TypeError("CallbackOracle needs a callable fn(indices) -> labels")
        self.fn = fn

    def labels(self, indices: np.ndarray) -> Any:
        return self.fn(np.asarray(indices, dtype=np.int64))


class HumanOracle:
    """A person answering through files: each :meth:`labels` call writes the request
    ``folder/request-NNN.csv`` (``index,path``: the pool indices asked for, best first, with
    ``paths[index]`` where ``paths`` is given) and waits until the person writes
    ``folder/answers-NNN.csv`` (``index,label``, one line per requested index, any order).

    Parameters
    ----------
    folder : where requests and answers go (created if missing).
    classes : class names: an answer's label is a name, returned as its position in
        ``classes``. None: labels are class indices (integers).
    paths : the pool items' file names (or any description), written into the requests.
    timeout : seconds to wait for an answers file before :class:`OracleTimeoutError` (None:
        forever).
    poll : seconds between looks at the folder. A file is read once its size and time stamp
        stay the same over one poll (write it elsewhere and rename it into place to be safe).

    An answers file that does not answer exactly the indices asked (a missing, unknown or
    repeated index, an unknown label) raises :class:`DataError` listing every problem; the
    learner's ``update`` then changes nothing, and calling it again reads the corrected file.
    """

    def __init__(
        self,
        folder: str | Path,
        *,
        classes: Sequence[str] | None = None,
        paths: Sequence[str] | None = None,
        timeout: float | None = None,
        poll: float = 1.0,
    ) -> None:
        self.folder = Path(folder)
        self.classes = None if classes is None else [str(c) for c in classes]
        self.paths = paths
        self.timeout, self.poll = timeout, poll
        self.answered = 0  # requests answered so far; the next one is number answered + 1

    def request_path(self, number: int) -> Path:
        return self.folder / f"request-{number:03d}.csv"

    def answers_path(self, number: int) -> Path:
        return self.folder / f"answers-{number:03d}.csv"

    def labels(self, indices: np.ndarray) -> list[int]:
        idx = [int(i) for i in np.asarray(indices, dtype=np.int64)]
        number = self.answered + 1
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["index", "path"])
        for i in idx:
            writer.writerow([i, "" if self.paths is None else self.paths[i]])
        atomic_write_text(self.request_path(number), out.getvalue())
        answers = self._wait(self.answers_path(number))
        labels = self._parse(answers, idx)
        self.answered = number
        return labels

    def _wait(self, path: Path) -> Path:
        start, seen = time.monotonic(), None
        while True:
            try:
                stat = os.stat(path)
                now = (stat.st_size, stat.st_mtime_ns)
            except FileNotFoundError:
                now = None
            if now is not None and now == seen:
                return path
            seen = now
            if self.timeout is not None and time.monotonic() - start > self.timeout:
                raise OracleTimeoutError(
                    f"no answers in {path} after {self.timeout:g} s; answer "
                    f"{path.with_name(path.name.replace('answers', 'request'))} there "
                    "(index,label), then call update again"
                )
            time.sleep(self.poll)

    def _parse(self, path: Path, asked: list[int]) -> list[int]:
        rows = list(csv.reader(io.StringIO(read_text(path, "write index,label lines"))))
        rows = [r for r in rows if any(f.strip() for f in r)]
        problems = []
        if not rows or [f.strip().lower() for f in rows[0]] != ["index", "label"]:
            problems.append("line 1: the header must be index,label")
            rows = [[]] + rows  # every line a row below
        wanted, got = set(asked), {}
        for line, row in enumerate(rows[1:], start=2):
            if len(row) != 2 or not row[0].strip().lstrip("-").isdigit():
                problems.append(f"line {line}: expected index,label")
                continue
            i, text = int(row[0]), row[1].strip()
            if i not in wanted:
                problems.append(f"line {line}: index {i} was not asked for")
            elif i in got:
                problems.append(f"line {line}: index {i} answered twice")
            elif self.classes is not None and text not in self.classes:
                problems.append(f"line {line}: unknown class {text!r}")
            elif self.classes is None and not text.lstrip("-").isdigit():
                problems.append(f"line {line}: label {text!r} is not a class index")
            else:
                got[i] = self.classes.index(text) if self.classes is not None else int(text)
        missing = [i for i in asked if i not in got]
        if missing:
            problems.append(f"{len(missing)} index(es) not answered (e.g. {missing[0]})")
        if problems:
            raise DataError(f"{path}: {'; '.join(problems)}; correct it and call update again")
        return [got[i] for i in asked]
