"""The report over merged run folders: report.html (self-contained: inline CSS, the plot embedded
as base64), summary.md and curves.png, with the AUC ranking, paired comparisons, the metrics per
cycle and time per strategy.

Curves, AUCs and paired statistics are those of the runs' headline metric (test accuracy;
segmentation: test mIoU, :func:`~.summary.headline_metric`); the task's other test metrics
(segmentation: pixel accuracy) get a per-cycle table of their own.
"""

from __future__ import annotations

import base64
import html
import math
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._version import __version__
from ..atomic import atomic_write_text
from ..errors import RunDirectoryError
from .merge import IncompleteCurve, MergedRuns, RunFolder
from .stats import (
    ALPHA,
    PairComparison,
    compare_all_pairs,
    competition_ranks,
    mean_trial_ranks,
    min_sign_flip_pvalue,
)
from .summary import (
    StrategySummary,
    headline_metric,
    metric_label,
    pct_mean_std,
    per_trial_auc,
    plot_curves,
    summarise,
)

REPORT_FILES = ("report.html", "summary.md", "curves.png")


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(lines) + "\n"

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.header)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>\n" for r in self.rows
        )
        return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>\n"


DASH = "—"


def _secs(values: list[float]) -> str:
    if not values:
        return DASH
    v = np.asarray(values, dtype=np.float64)
    return f"{v.mean():.2f}" if len(v) < 2 else f"{v.mean():.2f} ± {v.std(ddof=1):.2f}"


def _p(p: float) -> str:
    return DASH if math.isnan(p) else f"{p:.3g}"


def ranked(summaries: list[StrategySummary]) -> list[StrategySummary]:
    """Summaries best mean AUC first (stable for ties)."""
    return sorted(summaries, key=lambda s: -float(s.auc.mean()))


def auc_table(summaries: list[StrategySummary]) -> Table:
    """Rank by mean AUC, the AUC (%), the mean within-trial rank, trials, per-trial AUCs."""
    means = {s.strategy: float(s.auc.mean()) for s in summaries}
    ranks = competition_ranks(means)
    trial_ranks, shared = mean_trial_ranks(per_trial_auc(summaries))
    table = Table(
        [
            "rank",
            "strategy",
            "AUC (%) mean ± std",
            f"mean rank in the {len(shared)} shared trial(s)",
            "trials",
            "AUC (%) per trial",
        ]
    )
    for s in ranked(summaries):
        per = per_trial_auc([s])[s.strategy]
        table.rows.append(
            [
                str(ranks[s.strategy]),
                s.strategy,
                pct_mean_std(s.auc),
                f"{trial_ranks[s.strategy]:.2f}" if trial_ranks else DASH,
                str(s.trials),
                ", ".join(f"t{t}: {100 * a:.1f}" for t, a in per.items()),
            ]
        )
    return table


def accuracy_table(
    summaries: list[StrategySummary], num_labeled: list[int], order: list[str] | None = None
) -> Table:
    """The summaries' metric (test accuracy, mIoU, ...; %) mean ± std per cycle, then the AUC;
    strategies best mean AUC first, or in ``order`` (the headline metric's ranking)."""
    fractions = summaries[0].fractions if summaries else np.zeros(0)
    header = ["strategy"]
    header += [f"{100 * f:.0f}% ({n})" for f, n in zip(fractions, num_labeled)]
    table = Table([*header, "AUC", "trials"])
    rows = ranked(summaries)
    if order is not None:
        rows.sort(key=lambda s: order.index(s.strategy))
    for s in rows:
        cells = [s.strategy, *[pct_mean_std(s.accuracy[:, c]) for c in range(s.accuracy.shape[1])]]
        table.rows.append([*cells, pct_mean_std(s.auc), str(s.trials)])
    return table


def pairs_table(comparisons: list[PairComparison]) -> Table:
    table = Table(
        [
            "pair",
            "mean ΔAUC ± std (pp)",
            "95% interval (pp)",
            "t-test p",
            "permutation p",
            "wins",
            "n",
            "verdict",
        ]
    )
    for c in comparisons:
        if c.n == 0:
            diff = DASH
        elif math.isnan(c.std_diff):
            diff = f"{100 * c.mean_diff:+.2f}"
        else:
            diff = f"{100 * c.mean_diff:+.2f} ± {100 * c.std_diff:.2f}"
        interval = (
            DASH if math.isnan(c.ci_low) else f"[{100 * c.ci_low:+.2f}, {100 * c.ci_high:+.2f}]"
        )
        table.rows.append(
            [
                c.label,
                diff,
                interval,
                _p(c.t_pvalue),
                _p(c.perm_pvalue),
                f"{c.wins}/{c.n}",
                str(c.n),
                c.verdict,
            ]
        )
    return table


def time_table(summaries: list[StrategySummary], rows: list[dict[str, Any]]) -> Table:
    """Seconds of selection and of training: mean per cycle and total per trial (mean ± std)."""
    table = Table(
        [
            "strategy",
            "selection s / cycle",
            "selection s total",
            "training s / cycle",
            "training s total",
            "trials",
        ]
    )
    for s in ranked(summaries):
        keep = set(int(t) for t in s.trial_ids) if s.trial_ids is not None else None
        mine = [
            r for r in rows if r["strategy"] == s.strategy and (keep is None or r["trial"] in keep)
        ]
        by_trial: dict[int, list[dict]] = defaultdict(list)
        for r in mine:
            by_trial[r["trial"]].append(r)
        select = [r["select_seconds"] for r in mine if r["select_seconds"] is not None]
        train = [r["train_seconds"] for r in mine]
        select_total = [
            sum(r["select_seconds"] or 0.0 for r in trial) for trial in by_trial.values()
        ]
        train_total = [sum(r["train_seconds"] for r in trial) for trial in by_trial.values()]
        table.rows.append(
            [
                s.strategy,
                _secs(select),
                _secs(select_total),
                _secs(train),
                _secs(train_total),
                str(len(by_trial)),
            ]
        )
    return table


# ---------------------------------------------------------------------------------------- report
@dataclass
class ReportResult:
    """What :func:`write_report` wrote and computed."""

    out_dir: Path
    html_path: Path
    markdown_path: Path
    curves_path: Path
    strategies: list[str]  # strategies with a finished trial, best mean AUC first
    summaries: list[StrategySummary]
    comparisons: list[PairComparison]
    incomplete: list[IncompleteCurve]
    table: str  # the AUC ranking and the pairwise comparisons as markdown, for printing


@dataclass
class _Sections:
    """Everything both renderings show."""

    title: str
    protocol: str
    incomplete: list[IncompleteCurve]
    cycles: int
    auc: Table
    pairs: Table
    pairs_note: str
    accuracy: Table
    times: Table
    runs: list[RunFolder]
    metric: str = "test_accuracy"  # the headline: curves, AUCs and pairs are of this column
    #: per-cycle tables of the other test metrics (segmentation: pixel accuracy), by column
    others: dict[str, Table] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """``test mIoU``: the headline as the text names it."""
        return metric_label(self.metric)

    @property
    def auc_note(self) -> str:
        return (
            f"AUC: area under {self.label} vs labelled fraction divided by the fraction range "
            f"(the curve's mean {self.label.removeprefix('test ')}, %), mean ± sample std over "
            "trials (the mean alone for one trial); rank 1 = best mean."
        )

    def per_cycle(self) -> list[tuple[str, str, Table]]:
        """(heading, note, table) of the headline and each other metric per cycle."""
        out = []
        for metric, table in [(self.metric, self.accuracy), *self.others.items()]:
            label = metric_label(metric)
            title = label[0].upper() + label[1:]
            out.append(
                (
                    f"{title} per cycle",
                    f"{title} (%) by labelled fraction of the pool (number labelled), mean ± std"
                    + (
                        "."
                        if metric == self.metric
                        else f", and the AUC of its curve; strategies in the order of {self.label}."
                    ),
                    table,
                )
            )
        return out


def _protocol_line(run: RunFolder, runs: list[RunFolder]) -> str:
    model = run.get("model") or "the dataset's default"
    trials = ", ".join(str(r.get("trials")) for r in runs)
    return (
        f"Dataset {run.get('dataset')}, model {model}; {run.get('cycles')} cycles from "
        f"{100 * run.get('initial_fraction'):g}% labelled, +{100 * run.get('budget_fraction'):g}% "
        f"per cycle; {run.get('epochs')} epochs per cycle; trial t uses seed "
        f"{run.get('seed')} + t; {len(runs)} run folder(s), trials per folder: {trials}."
    )


def _pairs_note(comparisons: list[PairComparison]) -> str:
    ns = sorted({c.n for c in comparisons if c.n >= 1})
    floors = ", ".join(f"{min_sign_flip_pvalue(n):.3g} with n = {n}" for n in ns)
    return (
        "ΔAUC = first − second in percentage points, over the trials both finished (trial t of "
        "every strategy has the same seed: same initial pool and model); wins: trials where the "
        f"first is above. Verdict: paired t-test at α = {ALPHA:g} (it assumes normally "
        "distributed differences), a difference only where the 95% interval excludes 0. The "
        "exact sign-flip permutation p needs no such assumption but can never be below 2 / 2^n"
        + (f" ({floors})" if floors else "")
        + f", so with few trials it cannot reach {ALPHA:g} by itself."
    )


def _markdown(sec: _Sections) -> str:
    out = [f"# {sec.title}\n", sec.protocol + "\n"]
    if sec.incomplete:
        out.append(
            f"**Incomplete:** only curves that finished all {sec.cycles} cycles are used. Left "
            "out:\n"
        )
        out += [f"- {c.describe()}" for c in sec.incomplete]
        out.append("")
    out += [
        "## Learning curves\n",
        f"![learning curves: {sec.label} vs labelled fraction, mean ± std](curves.png)\n",
        "## Area under the learning curve\n",
        sec.auc_note + "\n",
        sec.auc.markdown(),
        "## Pairwise comparisons\n",
        sec.pairs.markdown() if sec.pairs.rows else "(fewer than two strategies finished)\n",
        sec.pairs_note + "\n",
    ]
    for heading, note, table in sec.per_cycle():
        out += [f"## {heading}\n", note + "\n", table.markdown()]
    out += [
        "## Time\n",
        "Seconds per cycle (selection: the cycles that select) and in total per trial, "
        "mean ± std.\n",
        sec.times.markdown(),
        "## Configurations\n",
    ]
    for run in sec.runs:
        out.append(f"### {run.path}\n")
        out.append(f"Strategies: {', '.join(run.strategies) or '(no results)'}.\n")
        out.append("```yaml\n" + run.config_text.rstrip("\n") + "\n```\n")
    return "\n".join(out)


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 70em; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
tbody tr:nth-child(even) { background: #fafafa; }
.note { color: #555; font-size: 0.92em; }
.warn { background: #fff6e0; border-left: 4px solid #e0a000; padding: 0.5em 1em; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.88em; }
img { max-width: 100%; }
"""


def _html(sec: _Sections, png: bytes) -> str:
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(sec.title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{e(sec.title)}</h1>",
        f"<p>{e(sec.protocol)}</p>",
    ]
    if sec.incomplete:
        items = "".join(f"<li>{e(c.describe())}</li>" for c in sec.incomplete)
        parts.append(
            f'<div class="warn"><strong>Incomplete:</strong> only curves that finished all '
            f"{sec.cycles} cycles are used. Left out:<ul>{items}</ul></div>"
        )
    data = base64.b64encode(png).decode("ascii")
    parts += [
        "<h2>Learning curves</h2>",
        f'<img src="data:image/png;base64,{data}" '
        f'alt="{e(sec.label)} vs labelled fraction, mean and ± std band per strategy">',
        "<h2>Area under the learning curve</h2>",
        f'<p class="note">{html.escape(sec.auc_note, quote=False)}</p>',
        sec.auc.html(),
        "<h2>Pairwise comparisons</h2>",
        sec.pairs.html() if sec.pairs.rows else "<p>(fewer than two strategies finished)</p>",
        f'<p class="note">{e(sec.pairs_note)}</p>',
    ]
    for heading, note, table in sec.per_cycle():
        parts += [f"<h2>{e(heading)}</h2>", f'<p class="note">{e(note)}</p>', table.html()]
    parts += [
        "<h2>Time</h2>",
        '<p class="note">Seconds per cycle (selection: the cycles that select) and in total per '
        "trial, mean ± std.</p>",
        sec.times.html(),
        "<h2>Configurations</h2>",
    ]
    for run in sec.runs:
        parts.append(f"<h3>{e(str(run.path))}</h3>")
        parts.append(f"<p>Strategies: {e(', '.join(run.strategies) or '(no results)')}.</p>")
        parts.append(f"<pre>{e(run.config_text)}</pre>")
    parts.append(f'<p class="note">Written by gradnorm-al {e(__version__)}.</p>')
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_merged_report(merged: MergedRuns, out_dir: Path) -> ReportResult:
    """Write report.html, summary.md and curves.png of ``merged`` into ``out_dir`` (created)."""
    metric = headline_metric(merged.rows)
    summaries = summarise(merged.rows, metric)
    order = [s.strategy for s in ranked(summaries)]
    comparisons = compare_all_pairs(per_trial_auc(summaries), order)
    first = merged.runs[0]
    cycles = int(first.get("cycles"))
    by_cycle = {r["cycle"]: r["num_labeled"] for r in merged.rows}
    num_labeled = [by_cycle[c] for c in sorted(by_cycle)]
    dataset = str(first.get("dataset"))
    sections = _Sections(
        title=f"gradnorm-al report: {dataset}",
        protocol=_protocol_line(first, merged.runs),
        incomplete=merged.incomplete,
        cycles=cycles,
        auc=auc_table(summaries),
        pairs=pairs_table(comparisons),
        pairs_note=_pairs_note(comparisons),
        accuracy=accuracy_table(summaries, num_labeled),
        times=time_table(summaries, merged.rows),
        runs=merged.runs,
        metric=metric,
        others={
            other: accuracy_table(summarise(merged.rows, other), num_labeled, order)
            for other in (merged.rows[0] if merged.rows else ())
            if other.startswith("test_") and other != metric
        },
    )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunDirectoryError(
            f"cannot use output folder {out_dir}: {err.strerror or err}"
        ) from None
    curves = out_dir / "curves.png"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # an empty legend when nothing finished
        plot_curves(ranked(summaries), curves, title=dataset)
    markdown = out_dir / "summary.md"
    atomic_write_text(markdown, _markdown(sections))
    page = out_dir / "report.html"
    atomic_write_text(page, _html(sections, curves.read_bytes()))
    if not summaries:
        table = "(no strategy finished a trial)\n"
    else:
        table = sections.auc.markdown() + (
            "\n" + sections.pairs.markdown() if sections.pairs.rows else ""
        )
    return ReportResult(
        out_dir=out_dir,
        html_path=page,
        markdown_path=markdown,
        curves_path=curves,
        strategies=order,
        summaries=summaries,
        comparisons=comparisons,
        incomplete=merged.incomplete,
        table=table,
    )
