"""Independent, reproducible seeds for every random choice of a run.

Each choice (initial pool, model initialisation, a cycle's batch order, candidate subset, the
strategy's own randomness and auxiliary module) gets its own seed derived from the trial seed and
the cycle, so no choice depends on how many random numbers an earlier one consumed. That keeps
strategies comparable and makes a cycle reproducible on its own.
"""

from __future__ import annotations

import numpy as np

INIT_POOL, MODEL_INIT, TRAIN, SUBSET, STRATEGY, AUXILIARY_INIT, POOL_SUBSET, ANALYSIS = range(8)


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed determined by ``seed`` and the integer ``keys``."""
    return int(
        np.random.SeedSequence([seed, *keys]).generate_state(2, np.uint64)[0] >> np.uint64(1)
    )


def rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, *keys))
