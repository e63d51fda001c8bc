"""Random sampling, without replacement (duplicates would bias the comparison)."""

from __future__ import annotations

import numpy as np

from .base import STRATEGIES, SelectionContext, Strategy


@STRATEGIES.register("random")
class RandomStrategy(Strategy):
    """``k`` candidates drawn uniformly without replacement with the context's seeded rng."""

    def select(self, ctx: SelectionContext, k: int) -> np.ndarray:
        return ctx.rng.choice(ctx.candidates, size=k, replace=False)
