"""Selection strategies, one module per family, behind one registry."""

from . import (  # noqa: F401  (register the strategies)
    badge,
    coreset,
    egl,
    gcn,
    gradnorm,
    ll4al,
    mc_dropout,
    qbc,
    random,
    samplers,
    sraal,
    uncertainty,
    vaal,
)
from .base import (
    SAMPLERS,
    STRATEGIES,
    Sampler,
    ScoringStrategy,
    Selection,
    SelectionContext,
    Strategy,
    accepted_params,
    check_task,
    create_strategy,
    dense_strategies,
    top_k,
)
from .gradnorm import entropy_loss, expected_ce_loss, gradnorm_scores

__all__ = [
    "SAMPLERS",
    "STRATEGIES",
    "Sampler",
    "ScoringStrategy",
    "Selection",
    "SelectionContext",
    "Strategy",
    "accepted_params",
    "check_task",
    "create_strategy",
    "dense_strategies",
    "entropy_loss",
    "expected_ce_loss",
    "gradnorm_scores",
    "top_k",
]
