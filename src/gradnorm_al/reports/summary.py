"""Summaries of a run: accuracy per labelled fraction, area under the learning curve, a plot."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_open, atomic_write_text
from .stats import ALPHA, compare_pair, min_sign_flip_pvalue

RANDOM = "random"  # the baseline every strategy is compared with
#: how a headline metric column is named in tables and plots (others: the column's own name)
METRIC_LABELS = {
    "test_accuracy": "test accuracy",
    "test_miou": "test mIoU",
    "test_pixel_accuracy": "test pixel accuracy",
}
_FIXED = ("strategy", "trial", "cycle", "num_labeled", "labeled_fraction")


def headline_metric(rows: list[dict[str, Any]]) -> str:
    """The column the learning curves are drawn from: the first ``test_*`` column of the rows
    (the task's first metric: test_accuracy for classification, test_miou for segmentation)."""
    for row in rows[:1]:
        for key in row:
            if key not in _FIXED and key.startswith("test_"):
                return key
    return "test_accuracy"


def metric_label(metric: str) -> str:
    """``test_miou`` -> ``test mIoU``: the headline metric as tables and plots name it."""
    return METRIC_LABELS.get(metric, metric.replace("_", " "))


@dataclass
class StrategySummary:
    """Mean and spread over trials of one strategy's learning curve.

    ``accuracy`` holds the headline metric ``metric`` (test accuracy; segmentation: test mIoU).
    ``auc`` per trial is the area under that metric vs labelled fraction (trapezoids), divided by
    the fraction range: the curve's average, in [0, 1]. Spreads are sample standard deviations
    over trials (0 with one trial).
    """

    strategy: str
    fractions: np.ndarray  # [cycles] labelled fraction per cycle
    accuracy: np.ndarray  # [trials, cycles] test accuracy
    auc: np.ndarray  # [trials]
    trial_ids: np.ndarray | None = None  # [trials] the trial number of each row (seed + trial)
    metric: str = "test_accuracy"  # the results column of ``accuracy``

    @property
    def trials(self) -> int:
        return self.accuracy.shape[0]


def area_under_curve(fractions: np.ndarray, accuracy: np.ndarray) -> np.ndarray:
    """Normalised area under each row of ``accuracy`` [trials, cycles] against ``fractions``."""
    if len(fractions) < 2:
        return accuracy[:, 0].copy()
    return np.trapezoid(accuracy, fractions, axis=1) / (fractions[-1] - fractions[0])


def summarise(rows: list[dict[str, Any]], metric: str | None = None) -> list[StrategySummary]:
    """Per-strategy summaries of ``metric`` (default: :func:`headline_metric`) from results
    rows, strategies in order of first appearance.

    Only trials that finished every cycle up to the last one seen for the strategy are used.
    """
    metric = metric or headline_metric(rows)
    by_strategy: dict[str, dict[int, dict[int, dict]]] = defaultdict(lambda: defaultdict(dict))
    for row in rows:
        by_strategy[row["strategy"]][row["trial"]][row["cycle"]] = row
    summaries = []
    for strategy, trials in by_strategy.items():
        cycles = 1 + max(max(c) for c in trials.values())
        complete = [t for t in sorted(trials) if all(c in trials[t] for c in range(cycles))]
        if not complete:
            continue
        acc = np.array([[trials[t][c][metric] for c in range(cycles)] for t in complete])
        fractions = np.array([trials[complete[0]][c]["labeled_fraction"] for c in range(cycles)])
        summaries.append(
            StrategySummary(
                strategy,
                fractions,
                acc,
                area_under_curve(fractions, acc),
                np.array(complete),
                metric,
            )
        )
    return summaries


def per_trial_auc(summaries: list[StrategySummary]) -> dict[str, dict[int, float]]:
    """``{strategy: {trial: AUC}}``: the per-trial areas keyed by trial, so strategies can be
    paired on the trials (seeds) they share."""
    out: dict[str, dict[int, float]] = {}
    for s in summaries:
        ids = s.trial_ids if s.trial_ids is not None else np.arange(s.trials)
        out[s.strategy] = {int(t): float(a) for t, a in zip(ids, s.auc)}
    return out


def pct_mean_std(values: np.ndarray, digits: int = 1) -> str:
    """Mean ± sample std of fractions, in %; the mean alone for one value (no spread to show)."""
    mean = f"{100 * values.mean():.{digits}f}"
    return mean if len(values) < 2 else f"{mean} ± {100 * values.std(ddof=1):.{digits}f}"


def format_table(summaries: list[StrategySummary]) -> str:
    """A markdown table: the headline metric (%) mean ± std per labelled fraction, then the
    AUC."""
    if not summaries:
        return "(no finished trials)\n"
    fractions = summaries[0].fractions
    header = ["strategy", *[f"{100 * f:.0f}%" for f in fractions], "AUC"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in summaries:
        cells = [s.strategy]
        cells += [pct_mean_std(s.accuracy[:, c]) for c in range(s.accuracy.shape[1])]
        cells.append(pct_mean_std(s.auc))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def paired_statistics(summaries: list[StrategySummary]) -> str:
    """Each strategy (best mean AUC first) paired, trial by trial, with random and with the best
    other strategy but random (by mean AUC; one whose AUC equals this one's in every trial, such
    as the other gradnorm scheme, is not "other"), as markdown: the AUC difference in percentage
    points with its 95% interval, the sign-flip p-value, the wins, and whether the difference is
    significant. Empty with fewer than two strategies."""
    if len(summaries) < 2:
        return ""
    aucs = per_trial_auc(summaries)
    means = {s.strategy: float(s.auc.mean()) for s in summaries}
    order = sorted(means, key=lambda name: -means[name])
    lines = []
    for name in order:
        parts = []
        if RANDOM in aucs and name != RANDOM:
            parts.append(
                "vs random " + compare_pair(name, RANDOM, aucs[name], aucs[RANDOM]).sentence()
            )
        others = [o for o in order if o not in (name, RANDOM) and aucs[o] != aucs[name]]
        if others:
            best = others[0]
            pair = compare_pair(name, best, aucs[name], aucs[best])
            parts.append(f"vs best other ({best}) {pair.sentence()}")
        if parts:
            lines.append(f"- **{name}**: " + "; ".join(parts))
    n = max(s.trials for s in summaries)
    return (
        "Paired comparisons: AUC difference (percentage points) over the trials both finished "
        "(trial t of every strategy starts from the same seed, initial pool and model), its 95% "
        f"t-interval, the exact sign-flip permutation p-value (it cannot go below "
        f"{min_sign_flip_pvalue(n):.2g} with {n} trials) and the trials won. A strategy is "
        f"called better only where the interval excludes 0 (paired t-test, p < {ALPHA:g}); "
        "otherwise the difference is not significant.\n\n" + "\n".join(lines) + "\n"
    )


def summary_markdown(summaries: list[StrategySummary], config: dict[str, Any]) -> str:
    trials = sorted({s.trials for s in summaries})
    label = metric_label(summaries[0].metric if summaries else "test_accuracy")
    model = config.get("model") or "(dataset default)"
    return (
        f"# gradnorm-al results: {config.get('dataset')}\n\n"
        f"Model {model}; {config.get('epochs')} epochs per cycle; "
        f"{', '.join(map(str, trials))} trial(s); seeds from {config.get('seed')}.\n\n"
        f"{label[0].upper() + label[1:]} (%) by labelled fraction of the pool, mean ± sample "
        "std over trials (the mean alone for one trial). "
        "AUC: area under the learning curve divided by the fraction range (the curve's mean "
        f"{label.removeprefix('test ')}, %).\n\n"
        + format_table(summaries)
        + _section(paired_statistics(summaries))
    )


def _section(text: str) -> str:
    return "\n" + text if text else ""


def plot_curves(summaries: list[StrategySummary], path: Path, title: str = "") -> None:
    """The headline metric (test accuracy, mIoU) vs labelled fraction, mean line and ± std band
    per strategy, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    styles = [
        "-",
        "--",
        ":",
        "-.",
    ]  # strategies that tie (e.g. the two gradnorm schemes) stay visible
    for i, s in enumerate(summaries):
        mean = 100 * s.accuracy.mean(axis=0)
        std = 100 * (s.accuracy.std(axis=0, ddof=1) if s.trials > 1 else np.zeros_like(mean))
        x = 100 * s.fractions
        (line,) = ax.plot(
            x,
            mean,
            linestyle=styles[i % len(styles)],
            marker="o",
            markersize=3,
            label=f"{s.strategy} (n={s.trials})",
        )
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("labelled fraction of the pool (%)")
    ax.set_ylabel(f"{metric_label(summaries[0].metric if summaries else 'test_accuracy')} (%)")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png")
    plt.close(fig)


def write_summary(rows: list[dict[str, Any]], config: dict[str, Any], out_dir: Path) -> str:
    """Write summary.md and curves.png into ``out_dir``; return what is printed: the table and
    the paired statistics."""
    summaries = summarise(rows)
    atomic_write_text(out_dir / "summary.md", summary_markdown(summaries, config))
    plot_curves(summaries, out_dir / "curves.png", title=str(config.get("dataset", "")))
    return format_table(summaries) + _section(paired_statistics(summaries))
