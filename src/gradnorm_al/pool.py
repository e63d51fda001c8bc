"""Labelled / unlabelled indices of the training pool, and the cycle each was labelled in."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .atomic import atomic_write_text
from .errors import PoolError

UNLABELED = -1


class Pool:
    """The active-learning pool over ``size`` samples (indices 0..size-1).

    ``labeled_at[i]`` is the cycle in which sample i was labelled (0 = initial pool), or -1.
    Invariants: labelled and unlabelled are disjoint and cover the pool; a sample is labelled once.
    """

    def __init__(self, size: int) -> None:
        if size < 1:
            raise PoolError(f"the pool must hold at least one sample, got {size}")
        self.labeled_at = np.full(size, UNLABELED, dtype=np.int64)

    @classmethod
    def initial(cls, size: int, fraction: float, rng: np.random.Generator) -> Pool:
        """A pool whose first labelled set is a random ``round(fraction * size)`` samples."""
        pool = cls(size)
        pool.label(initial_indices(size, fraction, rng), cycle=0)
        return pool

    @property
    def size(self) -> int:
        return len(self.labeled_at)

    @property
    def num_labeled(self) -> int:
        return int((self.labeled_at != UNLABELED).sum())

    def labeled(self) -> np.ndarray:
        """Sorted int64 pool indices of the labelled samples."""
        return np.flatnonzero(self.labeled_at != UNLABELED)

    def unlabeled(self) -> np.ndarray:
        """Sorted int64 pool indices of the unlabelled samples."""
        return np.flatnonzero(self.labeled_at == UNLABELED)

    def label(self, indices: np.ndarray | list[int], cycle: int) -> None:
        """Move ``indices`` from the unlabelled to the labelled set, recording ``cycle``."""
        self.labeled_at[self.check_unlabeled(indices)] = cycle

    def check_unlabeled(self, indices: np.ndarray | list[int]) -> np.ndarray:
        """int64 ``indices``, checked to be distinct unlabelled pool indices (PoolError if not)."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.ndim != 1:
            raise PoolError(f"indices must be 1-D, got shape {idx.shape}")
        if idx.size and (idx.min() < 0 or idx.max() >= self.size):
            raise PoolError(f"index out of range for a pool of {self.size} samples")
        if len(np.unique(idx)) != len(idx):
            raise PoolError("duplicate indices in one labelling request")
        already = idx[self.labeled_at[idx] != UNLABELED]
        if already.size:
            raise PoolError(f"{already.size} samples are already labelled (e.g. {int(already[0])})")
        return idx

    def state_dict(self) -> dict:
        return {"size": self.size, "labeled_at": self.labeled_at.tolist()}

    def load_state_dict(self, state: dict) -> None:
        labeled_at = np.asarray(state["labeled_at"], dtype=np.int64)
        if labeled_at.shape != (int(state["size"]),):
            raise PoolError("pool state is inconsistent: 'labeled_at' does not match 'size'")
        self.labeled_at = labeled_at

    def save(self, path: str | Path) -> None:
        """Write the pool as JSON, atomically."""
        atomic_write_text(path, json.dumps(self.state_dict()))

    @classmethod
    def load(cls, path: str | Path) -> Pool:
        state = json.loads(Path(path).read_text(encoding="utf-8"))
        pool = cls(int(state["size"]))
        pool.load_state_dict(state)
        return pool


def initial_indices(size: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A random first labelled set: ``initial_count(size, fraction)`` distinct indices."""
    return rng.choice(size, size=initial_count(size, fraction), replace=False)


def initial_count(size: int, fraction: float) -> int:
    """Number of initially labelled samples: ``round(fraction * size)``, at least 1."""
    if not 0.0 < fraction <= 1.0:
        raise PoolError(f"the initial fraction must be in (0, 1], got {fraction}")
    return max(1, round(fraction * size))
