"""Oracles: where labels come from when the learner is not handed them.

An oracle is anything with ``labels(indices) -> labels``: one label per pool index, in the order
asked. A benchmark answers from the dataset's own targets (:class:`DatasetOracle`); a script or an
annotation tool answers through a function (:class:`CallbackOracle`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from .errors import DataError


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
