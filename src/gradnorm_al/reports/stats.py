"""Paired comparisons of strategies by their per-trial area under the learning curve.

Trial t of every strategy uses the same seed (same initial pool, same initial model), so two
strategies' AUCs of trial t form a pair. For every pair of strategies we test whether the mean of
the per-trial differences is zero with

* the paired t-test (:func:`scipy.stats.ttest_rel`), which assumes normally distributed
  differences, and
* the exact two-sided sign-flip permutation test: under the null hypothesis each difference is as
  likely to be positive as negative, so all 2^n sign patterns are equally likely; the p-value is the
  share of patterns whose |sum| is at least the observed |sum|. It needs no normality, but with n
  trials it cannot go below 2 / 2^n (0.25 for 3 trials).

With each comparison come the 95% t-interval of the mean difference (it excludes 0 exactly when
the paired t-test gives p < 0.05) and the number of trials the first strategy won.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


def _scipy_stats():
    # imported when a statistic is computed, not with the package: scipy.stats alone takes
    # ~0.8 s to import, which every CLI command (and every subprocess a test starts) would pay
    from scipy import stats

    return stats


ALPHA = 0.05
MAX_EXACT_TRIALS = 16  # 2^16 sign patterns; beyond, a seeded Monte Carlo estimate


def paired_t_pvalue(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of the paired t-test of ``a`` [n] against ``b`` [n].

    NaN when undefined: fewer than 2 pairs, or differences without spread (all equal, so the
    t statistic divides by zero; scipy would warn and return NaN or a meaningless value).
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(
            f"paired samples must be 1-D and of equal length, got {a.shape}, {b.shape}"
        )
    d = a - b
    if len(d) < 2 or np.ptp(d) <= 1e-12 * max(1.0, float(np.abs(d).max())):
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(_scipy_stats().ttest_rel(a, b).pvalue)


def sign_flip_pvalue(
    diffs: Sequence[float],
    *,
    max_exact: int = MAX_EXACT_TRIALS,
    samples: int = 100_000,
    seed: int = 0,
) -> float:
    """Two-sided sign-flip permutation p-value of the paired differences ``diffs`` [n].

    p = #{s in {-1, +1}^n : |sum_i s_i d_i| >= |sum_i d_i|} / 2^n, enumerated exactly for
    n <= ``max_exact``; for larger n, estimated from ``samples`` random sign patterns (seeded) as
    (1 + hits) / (1 + samples). Zero differences flip to themselves; all zero gives p = 1.
    NaN for n = 0.
    """
    d = np.asarray(diffs, dtype=np.float64)
    n = len(d)
    if n == 0:
        return math.nan
    observed = abs(d.sum())
    # ties (e.g. the observed pattern itself) must count despite float rounding in the sums
    tol = 1e-9 * max(1.0, float(np.abs(d).sum()))
    if n <= max_exact:
        bits = (np.arange(2**n)[:, None] >> np.arange(n)) & 1  # [2^n, n]
        sums = np.abs((1 - 2 * bits) @ d)
        return float(np.count_nonzero(sums >= observed - tol) / 2**n)
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, samples, 10_000):  # chunks keep memory at 10_000 x n
        signs = rng.choice(np.array([-1.0, 1.0]), size=(min(10_000, samples - start), n))
        hits += int(np.count_nonzero(np.abs(signs @ d) >= observed - tol))
    return (1 + hits) / (1 + samples)


def min_sign_flip_pvalue(n: int) -> float:
    """The smallest p-value the exact sign-flip test can give with n pairs: 2 / 2^n."""
    return min(1.0, 2.0 / 2**n) if n >= 1 else math.nan


@dataclass
class PairComparison:
    """``first`` vs ``second`` on the trials both finished; differences are first - second."""

    first: str
    second: str
    trials: list[int]  # the shared trials (seeds), sorted
    mean_diff: float  # mean AUC difference, NaN when no shared trial
    std_diff: float  # sample std of the differences, NaN when n < 2
    t_pvalue: float  # NaN when undefined
    perm_pvalue: float  # NaN when n = 0
    verdict: str
    ci_low: float = math.nan  # 95% t-interval of the mean difference, NaN when n < 2
    ci_high: float = math.nan
    wins: int = 0  # trials where first's AUC is above second's

    @property
    def n(self) -> int:
        return len(self.trials)

    @property
    def label(self) -> str:
        return f"{self.first} vs {self.second}"

    @property
    def significant(self) -> bool:
        """Whether the verdict names a better strategy (the interval excludes 0)."""
        return "better" in self.verdict

    def sentence(self) -> str:
        """One line in percentage points: ``+0.91 [+0.12, +1.70], p=0.25, wins 3/3: <verdict>``
        (p: the sign-flip permutation p-value); "not significant" when the interval holds 0."""
        if self.n == 0:
            return "no shared trial"
        diff = f"{100 * self.mean_diff:+.2f}"
        if self.n == 1:
            return f"{diff} in 1 trial: {self.verdict}"
        words = self.verdict if self.significant else "not significant"
        if words == "not significant" and self.verdict.startswith("no difference"):
            words = self.verdict
        elif words == "not significant":
            words += " (the interval contains 0)"
        return (
            f"{diff} [{100 * self.ci_low:+.2f}, {100 * self.ci_high:+.2f}], "
            f"p={self.perm_pvalue:.2g}, wins {self.wins}/{self.n}: {words}"
        )


def mean_interval(d: Sequence[float], level: float = 1 - ALPHA) -> tuple[float, float]:
    """The ``level`` t-interval of the mean of ``d`` [n]; NaN bounds when n < 2."""
    d = np.asarray(d, dtype=np.float64)
    if len(d) < 2:
        return math.nan, math.nan
    t = float(_scipy_stats().t.ppf(0.5 + level / 2, len(d) - 1))
    half = t * float(d.std(ddof=1)) / math.sqrt(len(d))
    return float(d.mean()) - half, float(d.mean()) + half


def verdict(
    first: str, second: str, n: int, mean_diff: float, t_pvalue: float, alpha: float = ALPHA
) -> str:
    """A plain-words reading of one comparison, decided by the paired t-test at ``alpha``."""
    if n < 2:
        return f"no test possible (n = {n} < 2)"
    if math.isnan(t_pvalue):  # differences without spread
        if mean_diff == 0:
            return "no difference (identical AUCs)"
        better = first if mean_diff > 0 else second
        return f"{better} better in all {n} trials (no spread: t-test undefined)"
    if t_pvalue < alpha:
        better = first if mean_diff > 0 else second
        return f"{better} better (p<{alpha:g})"
    return "no significant difference"


def compare_pair(
    first: str,
    second: str,
    auc_first: Mapping[int, float],
    auc_second: Mapping[int, float],
    alpha: float = ALPHA,
) -> PairComparison:
    """Compare two strategies on the trials both have (``{trial: AUC}`` each)."""
    trials = sorted(set(auc_first) & set(auc_second))
    a = np.array([auc_first[t] for t in trials], dtype=np.float64)
    b = np.array([auc_second[t] for t in trials], dtype=np.float64)
    d = a - b
    mean = float(d.mean()) if len(d) else math.nan
    std = float(d.std(ddof=1)) if len(d) >= 2 else math.nan
    t_p = paired_t_pvalue(a, b)
    perm_p = sign_flip_pvalue(d)
    low, high = mean_interval(d, 1 - alpha)
    return PairComparison(
        first,
        second,
        trials,
        mean,
        std,
        t_p,
        perm_p,
        verdict(first, second, len(d), mean, t_p, alpha),
        low,
        high,
        int(np.count_nonzero(d > 0)),
    )


def compare_all_pairs(
    aucs: Mapping[str, Mapping[int, float]],
    order: Sequence[str] | None = None,
    alpha: float = ALPHA,
) -> list[PairComparison]:
    """Every pair (i < j) of ``order`` (default: the keys of ``aucs``), first = the earlier one.

    Pass the strategies in rank order so each row reads "better-ranked vs worse-ranked".
    """
    names = list(order if order is not None else aucs)
    return [
        compare_pair(a, b, aucs[a], aucs[b], alpha) for a, b in itertools.combinations(names, 2)
    ]


def competition_ranks(values: Mapping[str, float]) -> dict[str, int]:
    """Rank 1 = largest value; equal values share the better rank ("1, 2, 2, 4")."""
    return {name: 1 + sum(other > v for other in values.values()) for name, v in values.items()}


def mean_trial_ranks(aucs: Mapping[str, Mapping[int, float]]) -> tuple[dict[str, float], list[int]]:
    """Mean over the trials every strategy finished of each strategy's rank within the trial.

    Rank 1 = highest AUC; ties get the average of the ranks they span. Returns the mean ranks
    (empty when no trial is shared by all) and the shared trials.
    """
    names = list(aucs)
    if not names:
        return {}, []
    shared = sorted(set.intersection(*(set(aucs[s]) for s in names)))
    if not shared:
        return {}, []
    ranks = np.array(
        [_scipy_stats().rankdata([-aucs[s][t] for s in names], method="average") for t in shared]
    )  # [trials, strategies]
    return {s: float(r) for s, r in zip(names, ranks.mean(axis=0))}, shared
