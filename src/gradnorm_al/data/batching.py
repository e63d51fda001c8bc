"""Iterating a dataset (or a subset of it) in batches, fast for in-memory tensor datasets."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset


def _as_tensor_dataset(dataset: Dataset, indices: np.ndarray | None):
    """(TensorDataset, indices) if ``dataset`` is one, possibly behind Subsets; else None."""
    while isinstance(dataset, Subset):
        base = np.asarray(dataset.indices, dtype=np.int64)
        indices = base if indices is None else base[indices]
        dataset = dataset.dataset
    if isinstance(dataset, TensorDataset):
        return dataset, indices
    return None


def _split(item: object) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(item, (tuple, list)):
        return item[0], (item[1] if len(item) > 1 else None)
    return item, None  # type: ignore[return-value]


def iter_batches(
    dataset: Dataset,
    batch_size: int,
    indices: Sequence[int] | np.ndarray | None = None,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    num_workers: int = 0,
    targets: torch.Tensor | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Yield ``(inputs, targets)`` batches of ``dataset`` restricted to ``indices`` (all if None).

    Items may be tensors or ``(input, target, ...)`` tuples (targets None when absent). Without
    shuffling the order is that of ``indices``. In-memory :class:`TensorDataset` s are sliced
    directly instead of going through a per-item DataLoader.

    ``targets`` [n, ...] (one per position of ``indices``) replaces the dataset's own targets:
    the labels a learner was given, so that a dataset's targets are never what training reads.
    """
    idx = None if indices is None else np.asarray(indices, dtype=np.int64)
    n = len(dataset) if idx is None else len(idx)
    if targets is not None and len(targets) != n:
        raise ValueError(f"{len(targets)} targets for {n} samples")
    order = torch.randperm(n, generator=generator).numpy() if shuffle else np.arange(n)
    fast = _as_tensor_dataset(dataset, idx)
    if fast is not None:
        tensors, base = fast[0].tensors, fast[1]
        pos = order if base is None else base[order]
        for start in range(0, n, batch_size):
            sel = torch.from_numpy(pos[start : start + batch_size])
            x = tensors[0][sel]
            if targets is not None:
                yield x, targets[torch.from_numpy(order[start : start + batch_size])]
            else:
                yield x, (tensors[1][sel] if len(tensors) > 1 else None)
        return
    subset = (
        dataset
        if idx is None and not shuffle
        else Subset(dataset, (order if idx is None else idx[order]).tolist())
    )
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    start = 0
    for item in loader:
        x, y = _split(item)
        if targets is not None:
            y = targets[torch.from_numpy(order[start : start + len(x)])]
        start += len(x)
        yield x, y
