"""Core-set selection (Sener & Savarese, ICLR 2018), the k-center greedy version.

In the penultimate-layer feature space (``model.embed``, eval mode), with the labelled samples as
the initial centres, repeat ``k`` times: pick the candidate farthest from its nearest centre,
``argmax_j min_i ||f_j - f_i||``, and make it a centre. (The paper's robust MIP refinement is not
implemented; the greedy version is the 2-approximation the paper and most re-implementations use.)
The algorithm is the ``k-center`` sampler (:mod:`.samplers`); core-set is that sampler alone.

Dense tasks (segmentation): the features are ``model.embed``, a dense model's feature map
averaged over its positions, one [D] vector per image.
"""

from __future__ import annotations

from ..options import PositiveInt
from .base import STRATEGIES, ScoringStrategy
from .samplers import DEFAULT_CHUNK_SIZE, KCenterSampler


@STRATEGIES.register("core-set")
class CoreSetStrategy(ScoringStrategy):
    """Core-set (k-center greedy) over penultimate-layer features of labelled + candidates."""

    has_scores = False
    supports_dense = True  # pooled features (DenseTaskModel.embed)

    def __init__(self, chunk_size: PositiveInt = DEFAULT_CHUNK_SIZE) -> None:
        self.sampler = KCenterSampler(chunk_size=chunk_size)
