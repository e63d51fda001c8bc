"""``gradnorm-al report``: merge run folders into one self-contained HTML report.

Runs of different strategies made separately on the same protocol and seeds are merged: trial t
of every run used seed ``seed + t``, so the curves of trial t are paired across runs. Only
(strategy, trial) curves that finished every cycle are used; the others are listed in the report.
"""

from __future__ import annotations

import base64
import csv
import html
import math
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..atomic import atomic_write_text
from ..errors import ConfigError, RunDirectoryError
from .config import ExperimentConfig
from .report import StrategySummary, per_trial_auc, plot_curves, summarise
from .results import RESULT_COLUMNS, RESULTS_FILE, read_results
from .stats import (
    ALPHA,
    PairComparison,
    compare_all_pairs,
    competition_ranks,
    mean_trial_ranks,
    min_sign_flip_pvalue,
)

CONFIG_FILE = "config.yaml"  # as written by the runner (runner.CONFIG_FILE)
REPORT_FILES = ("report.html", "summary.md", "curves.png")

# Config keys that change what a learning curve measures: merged runs must agree on all of them.
# Not compared: strategies, strategy_params and norm (per strategy), trials (pairs use the shared
# trials), seed (checked separately, with its own message), and device, data_root, download,
# score_batch_size (where and how fast, not what).
PROTOCOL_KEYS = (
    "dataset",
    "pool_size",
    "model",
    "cycles",
    "initial_fraction",
    "budget_fraction",
    "subset_size",
    "reinit_each_cycle",
    "epochs",
    "lr",
    "momentum",
    "weight_decay",
    "milestones",
    "gamma",
    "batch_size",
)
_DEFAULTS = ExperimentConfig().to_dict()  # for keys a config.yaml lacks


# ---------------------------------------------------------------------------------------- loading
@dataclass
class RunFolder:
    """One run folder as read from disk."""

    path: Path
    config: dict[str, Any]
    config_text: str
    rows: list[dict[str, Any]]

    def get(self, key: str) -> Any:
        return self.config.get(key, _DEFAULTS.get(key))

    @property
    def strategies(self) -> list[str]:
        """Strategies with at least one row in results.csv, in order of first appearance."""
        return list(dict.fromkeys(row["strategy"] for row in self.rows))


def load_run_folder(path: str | Path) -> RunFolder:
    """Read results.csv and config.yaml of a run folder; one-line errors for anything unusable."""
    path = Path(path)
    if not path.is_dir():
        what = "is not a folder" if path.exists() else "does not exist"
        raise RunDirectoryError(f"run folder {path} {what}; give folders made by `gradnorm-al run`")
    for name in (RESULTS_FILE, CONFIG_FILE):
        if not (path / name).is_file():
            raise RunDirectoryError(f"{path} has no {name}; give folders made by `gradnorm-al run`")
    text = (path / CONFIG_FILE).read_text(encoding="utf-8")
    try:
        config = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "parse error"
        raise ConfigError(f"{path / CONFIG_FILE} is not valid YAML: {first}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path / CONFIG_FILE} must hold a mapping of options")
    with open(path / RESULTS_FILE, newline="", encoding="utf-8") as fh:
        header = next(csv.reader(fh), [])
    missing = [c for c in RESULT_COLUMNS if c not in header]
    if missing:
        raise RunDirectoryError(
            f"{path / RESULTS_FILE} lacks column(s) {', '.join(missing)}; is it a gradnorm-al "
            "results file?"
        )
    try:
        rows = read_results(path / RESULTS_FILE)
    except ValueError as err:
        raise RunDirectoryError(f"{path / RESULTS_FILE} is malformed: {err}") from None
    for i, row in enumerate(rows, start=2):
        if any(row[c] is None for c in RESULT_COLUMNS if c != "select_seconds"):
            raise RunDirectoryError(f"{path / RESULTS_FILE} line {i} has an empty value")
    return RunFolder(path, config, text, rows)


# ---------------------------------------------------------------------------------------- merging
@dataclass
class IncompleteCurve:
    """A (strategy, trial) of a run that did not finish every cycle (0 done: never started)."""

    run_dir: Path
    strategy: str
    trial: int
    cycles_done: int
    cycles_expected: int

    def describe(self) -> str:
        done = (
            "not started"
            if self.cycles_done == 0
            else f"{self.cycles_done} of {self.cycles_expected} cycles"
        )
        return f"{self.strategy} trial {self.trial} ({done}) in {self.run_dir}"


@dataclass
class MergedRuns:
    runs: list[RunFolder]
    rows: list[dict[str, Any]]  # rows of the complete (strategy, trial) curves only
    incomplete: list[IncompleteCurve]
    owner: dict[str, Path]  # strategy -> the run folder it comes from


def merge_runs(runs: list[RunFolder]) -> MergedRuns:
    """Check that ``runs`` can be compared and keep their complete curves.

    Refused (one-line ConfigError): a strategy in two runs, a protocol key that differs (named),
    different seeds per trial, or different labelled fractions per cycle.
    """
    if not runs:
        raise ConfigError("give at least one run folder")
    owner: dict[str, Path] = {}
    for run in runs:
        for s in run.strategies:
            if s in owner:
                raise ConfigError(
                    f"strategy {s!r} appears in both {owner[s]} and {run.path}; give each "
                    "strategy's run folder only once"
                )
            owner[s] = run.path
    first = runs[0]
    for run in runs[1:]:
        for key in PROTOCOL_KEYS:
            a, b = first.get(key), run.get(key)
            if a != b:
                raise ConfigError(
                    f"the runs differ in protocol: {key} is {a!r} in {first.path} but {b!r} in "
                    f"{run.path}; only runs made with the same settings can be merged"
                )
        a, b = first.get("seed"), run.get("seed")
        if a != b:
            raise ConfigError(
                f"seeds per trial differ: {first.path} used seed {a} + trial but {run.path} "
                f"used {b} + trial; merge only runs made with the same --seed"
            )
    seeds: dict[int, tuple[int, Path]] = {}
    for run in runs:
        for row in run.rows:
            seen = seeds.setdefault(row["trial"], (row["seed"], run.path))
            if seen[0] != row["seed"]:
                raise ConfigError(
                    f"seeds per trial differ: trial {row['trial']} has seed {seen[0]} in "
                    f"{seen[1]} but {row['seed']} in {run.path}; merge only runs made with the "
                    "same seeds"
                )

    cycles = int(first.get("cycles"))
    complete: list[dict[str, Any]] = []
    incomplete: list[IncompleteCurve] = []
    for run in runs:
        curves: dict[tuple[str, int], dict[int, dict]] = defaultdict(dict)
        for row in run.rows:
            curves[(row["strategy"], row["trial"])][row["cycle"]] = row
        for (s, t), by_cycle in curves.items():
            if all(c in by_cycle for c in range(cycles)):
                complete.extend(by_cycle[c] for c in range(cycles))
            else:
                incomplete.append(IncompleteCurve(run.path, s, t, len(by_cycle), cycles))
        # strategies and trials the run was asked for but never started (unless another run has
        # the strategy: a strategy re-run separately after a crash is not missing)
        planned = run.get("strategies") or []
        for s in [*run.strategies, *[p for p in planned if p not in owner]]:
            for t in range(int(run.get("trials") or 0)):
                if (s, t) not in curves:
                    incomplete.append(IncompleteCurve(run.path, s, t, 0, cycles))

    reference: dict[int, tuple[float, str]] = {}
    for row in complete:
        c, f = row["cycle"], row["labeled_fraction"]
        ref = reference.setdefault(c, (f, f"{row['strategy']} trial {row['trial']}"))
        if not math.isclose(ref[0], f, rel_tol=1e-9, abs_tol=1e-12):
            raise ConfigError(
                f"labelled fractions differ at cycle {c}: {ref[0]:.6g} ({ref[1]}) vs {f:.6g} "
                f"({row['strategy']} trial {row['trial']} in {owner[row['strategy']]}); the runs "
                "did not use the same pool"
            )
    return MergedRuns(runs, complete, incomplete, owner)


# ---------------------------------------------------------------------------------------- tables
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


def _pct(values: np.ndarray, digits: int = 1) -> str:
    """Mean ± sample std of fractions, in %."""
    std = values.std(ddof=1) if len(values) > 1 else 0.0
    return f"{100 * values.mean():.{digits}f} ± {100 * std:.{digits}f}"


def _secs(values: list[float]) -> str:
    if not values:
        return DASH
    v = np.asarray(values, dtype=np.float64)
    std = v.std(ddof=1) if len(v) > 1 else 0.0
    return f"{v.mean():.2f} ± {std:.2f}"


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
                _pct(s.auc),
                f"{trial_ranks[s.strategy]:.2f}" if trial_ranks else DASH,
                str(s.trials),
                ", ".join(f"t{t}: {100 * a:.1f}" for t, a in per.items()),
            ]
        )
    return table


def accuracy_table(summaries: list[StrategySummary], num_labeled: list[int]) -> Table:
    """Test accuracy (%) mean ± std per cycle, then the AUC."""
    fractions = summaries[0].fractions if summaries else np.zeros(0)
    header = ["strategy"]
    header += [f"{100 * f:.0f}% ({n})" for f, n in zip(fractions, num_labeled)]
    table = Table([*header, "AUC", "trials"])
    for s in ranked(summaries):
        cells = [s.strategy, *[_pct(s.accuracy[:, c]) for c in range(s.accuracy.shape[1])]]
        table.rows.append([*cells, _pct(s.auc), str(s.trials)])
    return table


def pairs_table(comparisons: list[PairComparison]) -> Table:
    table = Table(["pair", "mean ΔAUC ± std (pp)", "t-test p", "permutation p", "n", "verdict"])
    for c in comparisons:
        if c.n == 0:
            diff = DASH
        elif math.isnan(c.std_diff):
            diff = f"{100 * c.mean_diff:+.2f}"
        else:
            diff = f"{100 * c.mean_diff:+.2f} ± {100 * c.std_diff:.2f}"
        table.rows.append([c.label, diff, _p(c.t_pvalue), _p(c.perm_pvalue), str(c.n), c.verdict])
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
        "every strategy has the same seed: same initial pool and model). Verdict: paired t-test "
        f"at α = {ALPHA:g} (it assumes normally distributed differences). The exact sign-flip "
        "permutation p needs no such assumption but can never be below 2 / 2^n"
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
        "![learning curves: test accuracy vs labelled fraction, mean ± std](curves.png)\n",
        "## Area under the learning curve\n",
        "AUC: area under test accuracy vs labelled fraction divided by the fraction range (the "
        "curve's mean accuracy, %), mean ± sample std over trials; rank 1 = best mean.\n",
        sec.auc.markdown(),
        "## Pairwise comparisons\n",
        sec.pairs.markdown() if sec.pairs.rows else "(fewer than two strategies finished)\n",
        sec.pairs_note + "\n",
        "## Test accuracy per cycle\n",
        "Test accuracy (%) by labelled fraction of the pool (number labelled), mean ± std.\n",
        sec.accuracy.markdown(),
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
        'alt="test accuracy vs labelled fraction, mean and ± std band per strategy">',
        "<h2>Area under the learning curve</h2>",
        '<p class="note">AUC: area under test accuracy vs labelled fraction divided by the '
        "fraction range (the curve's mean accuracy, %), mean ± sample std over trials; rank 1 = "
        "best mean.</p>",
        sec.auc.html(),
        "<h2>Pairwise comparisons</h2>",
        sec.pairs.html() if sec.pairs.rows else "<p>(fewer than two strategies finished)</p>",
        f'<p class="note">{e(sec.pairs_note)}</p>',
        "<h2>Test accuracy per cycle</h2>",
        '<p class="note">Test accuracy (%) by labelled fraction of the pool (number labelled), '
        "mean ± std.</p>",
        sec.accuracy.html(),
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
    from .. import __version__  # here: the package imports this module while it initialises

    parts.append(f'<p class="note">Written by gradnorm-al {e(__version__)}.</p>')
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_report(run_dirs: list[Path], out_dir: Path) -> ReportResult:
    """Merge the run folders ``run_dirs`` and write report.html, summary.md and curves.png.

    report.html is self-contained (inline CSS, the plot embedded as base64). Raises
    RunDirectoryError / ConfigError (one line) for unusable folders or runs that cannot be
    compared (see :func:`merge_runs`).
    """
    paths = [Path(p) for p in run_dirs]
    resolved = [p.resolve() for p in paths]
    for i, p in enumerate(resolved):
        if p in resolved[:i]:
            raise RunDirectoryError(f"run folder {paths[i]} is given twice")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise RunDirectoryError(f"output path {out_dir} exists and is not a folder")
    if len(paths) > 1 and out_dir.resolve() in resolved:
        raise RunDirectoryError(
            f"{out_dir} is one of the merged run folders; its summary.md and curves.png would be "
            "replaced by the merged ones; choose another output folder"
        )
    merged = merge_runs([load_run_folder(p) for p in paths])
    summaries = summarise(merged.rows)
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
