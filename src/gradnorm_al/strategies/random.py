"""Random sampling, without replacement (duplicates would bias the comparison)."""

from __future__ import annotations

from .base import STRATEGIES, ScoringStrategy
from .samplers import UniformSampler


@STRATEGIES.register("random")
class RandomStrategy(ScoringStrategy):
    """``k`` candidates drawn uniformly without replacement with the context's seeded rng (the
    ``uniform`` sampler alone)."""

    has_scores = False
    supports_dense = True
    sampler = UniformSampler()
