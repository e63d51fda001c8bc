"""Query by committee (Seung, Opper & Sompolinsky 1992) with a bagging committee (Abe & Mamitsuka
1998): ``M`` fresh models, each trained like the task model on a bootstrap resample of the
labelled set, vote on every candidate; the candidates they disagree on most are selected.

Committee probabilities are shaped ``[n, C, M]`` (samples, classes, members). Disagreement:

* ``"vote-entropy"`` (default; Dagan & Engelson 1995): ``-sum_c (V_c / M) log(V_c / M)``, ``V_c``
  the number of members whose argmax is class ``c`` (unnormalised; dividing by
  ``log min(M, C)`` would not change the ranking)
* ``"kl"`` (McCallum & Nigam 1998): ``mean_m KL(p_m || p_mean)``, ``p_mean = mean_m p_m``
  (equal to ``H[p_mean] - mean_m H[p_m]``, the committee's Jensen-Shannon divergence)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..options import OneOf, Range
from .base import STRATEGIES, ScoringStrategy, SelectionContext
from .common import probabilities, seeded_torch

DISAGREEMENTS = ("vote-entropy", "kl")


def vote_entropy_scores(
    votes_or_probs: torch.Tensor | np.ndarray, num_classes: int | None = None
) -> torch.Tensor:
    """Vote entropy ``-sum_c (V_c/M) log(V_c/M)`` (nats, 0 log 0 = 0) -> float64 [n].

    ``votes_or_probs`` is either the members' predicted classes, integers [n, M], or their
    probabilities [n, C, M] (each member votes for its argmax, the lowest class on ties).
    ``num_classes`` only sizes the vote counts; classes nobody votes for add nothing, so it never
    changes the result.
    """
    v = torch.as_tensor(votes_or_probs)
    if v.dim() == 3:
        num_classes = v.shape[1] if num_classes is None else num_classes
        v = v.argmax(dim=1)
    elif v.dim() != 2 or v.is_floating_point():
        raise ValueError(
            "expected integer votes [n, M] or probabilities [n, C, M], got "
            f"{v.dtype} shaped {tuple(v.shape)}"
        )
    v = v.long()
    members = v.shape[1]
    if num_classes is None:
        num_classes = int(v.max()) + 1 if v.numel() else 1
    fraction = F.one_hot(v, num_classes).sum(dim=1).double() / members  # [n, C]
    return -torch.special.xlogy(fraction, fraction).sum(dim=1)


def mean_kl_scores(probs: torch.Tensor | np.ndarray) -> torch.Tensor:
    """``mean_m KL(p_m || p_mean)`` (nats) with ``p_mean = mean_m p_m``, probs [n, C, M] ->
    float64 [n]. Terms with ``p_m,c = 0`` contribute 0; the result is clamped at 0 against
    rounding."""
    p = torch.as_tensor(probs, dtype=torch.float64)
    if p.dim() != 3:
        raise ValueError(f"expected probabilities shaped [n, C, M], got shape {tuple(p.shape)}")
    mean = p.mean(dim=2, keepdim=True)
    # xlogy(p, p) - xlogy(p, mean) = p log(p / mean), 0 where p = 0 (and mean > 0 where p > 0)
    kl = (torch.special.xlogy(p, p) - torch.special.xlogy(p, mean)).sum(dim=1)  # [n, M]
    return kl.mean(dim=1).clamp_min(0.0)


DISAGREEMENT_SCORES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "vote-entropy": vote_entropy_scores,
    "kl": mean_kl_scores,
}


@STRATEGIES.register("qbc")
class QBCStrategy(ScoringStrategy):
    """Top-K candidates by the disagreement of a committee trained with ``ctx.trainer``.

    Parameters
    ----------
    members : M, the committee size (default 5).
    disagreement : "vote-entropy" (default) or "kl".
    bootstrap : train each member on a bootstrap resample of the labelled set (default True,
        bagging); False trains every member on the whole labelled set, only the seeds differ.

    Each member costs one full training with the task recipe. The members replace the task model
    (which is not a member) and are trained one at a time, so only one is held in memory.
    """

    nonnegative_scores = True  # norms, entropies, disagreements
    dense_reason = (
        "its committee disagreement (vote entropy, KL) is implemented for one prediction per "
        "sample only; a per-pixel committee is not implemented"
    )

    def __init__(
        self,
        members: Annotated[int, Range(ge=2)] = 5,
        disagreement: Annotated[str, OneOf(DISAGREEMENTS)] = "vote-entropy",
        bootstrap: bool = True,
    ) -> None:
        self.members = members
        self.disagreement = disagreement
        self.bootstrap = bootstrap

    def score(self, ctx: SelectionContext) -> np.ndarray:
        if ctx.trainer is None:
            raise ConfigError(
                "qbc trains a committee and needs a trainer; run it through the loop or pass "
                "SelectionContext(trainer=...)"
            )
        labeled = np.asarray(ctx.labeled, dtype=np.int64)
        if len(labeled) == 0:
            raise ConfigError(
                "qbc trains its committee on the labelled samples, but there are none; start "
                "with a non-empty labelled pool (raise the initial fraction)"
            )
        committee = []
        for _ in tqdm(
            range(self.members), desc="qbc committee", leave=False, disable=not ctx.progress
        ):
            # Resample then seed, member by member, all from ctx.rng: the same context gives the
            # same committee.
            if self.bootstrap:
                indices = ctx.rng.choice(labeled, size=len(labeled), replace=True)
            else:
                indices = labeled.copy()
            seed = int(ctx.rng.integers(0, 2**63 - 1))
            # A trainer may reseed torch (the loop's does): fork so the caller's stream is kept,
            # and seed so that a trainer which does not seed itself is still reproducible.
            with seeded_torch(ctx.device, seed):
                member = ctx.trainer(indices, seed)
            committee.append(probabilities(ctx, model=member))
            del member  # one member in memory at a time
        probs = torch.stack(committee, dim=2)  # [n, C, M]
        return DISAGREEMENT_SCORES[self.disagreement](probs).numpy()
