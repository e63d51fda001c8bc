"""BADGE (Ash et al., ICLR 2020): k-means++ seeding over gradient embeddings.

The gradient embedding of a candidate is ``g(x) = (p - e_yhat) (x) h`` (``p = softmax(logits)``,
``yhat = argmax p``, ``h = model.embed(x)``), the gradient of ``CE(W h + b, yhat)`` w.r.t. the last
linear layer's weight; the first centre is the largest ``||g||``, each next one is drawn with
probability proportional to ``D^2``, as the published ``init_centers``. The algorithm is the
``kmeans++`` sampler (:mod:`.samplers`, where the maths and the one deviation are documented);
BADGE is that sampler alone.
"""

from __future__ import annotations

from .base import STRATEGIES, ScoringStrategy
from .samplers import KMeansPPSampler


@STRATEGIES.register("badge")
class BadgeStrategy(ScoringStrategy):
    """BADGE: k-means++ seeding over the candidates' gradient embeddings (model in eval mode)."""

    has_scores = False

    def __init__(self) -> None:
        self.sampler = KMeansPPSampler()
