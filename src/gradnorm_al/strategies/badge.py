"""BADGE (Ash et al., ICLR 2020): k-means++ seeding over gradient embeddings.

The gradient embedding of a candidate is ``g(x) = (p - e_yhat) (x) h`` (``p = softmax(logits)``,
``yhat = argmax p``, ``h = model.embed(x)``), the gradient of ``CE(W h + b, yhat)`` w.r.t. the last
linear layer's weight; the first centre is the largest ``||g||``, each next one is drawn with
probability proportional to ``D^2``, as the published ``init_centers``. The algorithm is the
``kmeans++`` sampler (:mod:`.samplers`, where the maths and the one deviation are documented);
BADGE is that sampler alone.

Dense tasks (segmentation): the embedding is the gradient of the image's reduced per-pixel loss
under its predicted mask w.r.t. the 1x1 convolution classifier, [C * D] per image, exact through
the bilinear upsampling (:func:`.samplers.dense_gradient_embeddings`, with its memory).
"""

from __future__ import annotations

from .base import STRATEGIES, ScoringStrategy
from .samplers import KMeansPPSampler


@STRATEGIES.register("badge")
class BadgeStrategy(ScoringStrategy):
    """BADGE: k-means++ seeding over the candidates' gradient embeddings (model in eval mode)."""

    has_scores = False
    supports_dense = True  # the 1x1 classifier's gradient embedding, see the module docs

    def __init__(self) -> None:
        self.sampler = KMeansPPSampler()
