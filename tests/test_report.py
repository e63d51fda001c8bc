"""`gradnorm-al report`: merging run folders, AUC ranks, paired statistics, the HTML report."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from gradnorm_al import ConfigError, ExperimentConfig, RunDirectoryError
from gradnorm_al.experiment import write_report
from gradnorm_al.experiment.results import ResultsStore
from gradnorm_al.loop import CycleRecord
from gradnorm_al.reports.stats import (
    compare_all_pairs,
    compare_pair,
    competition_ranks,
    mean_trial_ranks,
    min_sign_flip_pvalue,
    paired_t_pvalue,
    sign_flip_pvalue,
)

POOL, INITIAL, BUDGET = 100, 10, 5  # cycle c labels 10 + 5c of 100: fractions 0.10, 0.15, 0.20


def classification_metrics(acc: float) -> dict[str, float]:
    return {"test_accuracy": acc, "train_accuracy": 1.0}


def segmentation_metrics(miou: float) -> dict[str, float]:
    """A segmentation run's columns, in the runner's order; pixel accuracy falls as mIoU rises,
    so that its ranking is the reverse of the headline's."""
    return {
        "test_miou": miou,
        "test_pixel_accuracy": 1 - miou / 2,
        "train_miou": 0.9,
        "train_pixel_accuracy": 0.95,
    }


def write_run(
    path: Path, curves: dict[str, list[list[float]]], metrics=classification_metrics, **options
) -> Path:
    """A run folder as the runner writes it (config.yaml, then ResultsStore after every cycle).

    ``curves[strategy][trial]`` is the headline metric (test accuracy; with
    ``metrics=segmentation_metrics``, test mIoU) per finished cycle; a list shorter than
    ``cycles`` is a run that stopped there. Training takes 0.5 + c s, selection 0.1 * (c + 1) s.
    """
    options = {
        "strategies": list(curves),
        "trials": max(len(v) for v in curves.values()),
        "cycles": 3,
        "epochs": 1,
        **options,
    }
    config = ExperimentConfig(**options)
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(config.to_yaml())
    store = ResultsStore(path)
    for trial in range(config.trials):
        for name, trials in curves.items():
            for cycle, acc in enumerate(trials[trial] if trial < len(trials) else []):
                last = cycle == config.cycles - 1
                n = INITIAL + BUDGET * cycle
                store.add(
                    CycleRecord(
                        strategy=name,
                        trial=trial,
                        cycle=cycle,
                        num_labeled=n,
                        labeled_fraction=n / POOL,
                        metrics=metrics(acc),
                        train_seconds=0.5 + cycle,
                        select_seconds=None if last else 0.1 * (cycle + 1),
                        seed=config.seed + trial,
                        selected=None if last else np.arange(n, n + BUDGET),
                    )
                )
    return path


CURVES = {
    # AUC = trapezoids over [0.10, 0.20] / 0.10, i.e. (a0 + 2 a1 + a2) / 4
    "a": [[0.5, 0.7, 0.9], [0.6, 0.6, 0.6]],  # 0.70, 0.60   mean 0.65
    "b": [[0.5, 0.5, 0.5], [0.7, 0.8, 1.0]],  # 0.50, 0.825  mean 0.6625
    "c": [[0.4, 0.4, 0.4], [0.5, 0.5, 0.5]],  # 0.40, 0.50   mean 0.45
}


# ---------------------------------------------------------------------------------------- stats
def test_paired_t_pvalue_matches_scipy_and_is_nan_when_undefined():
    a, b = [0.7, 0.8, 0.75, 0.71], [0.6, 0.72, 0.7, 0.73]
    assert paired_t_pvalue(a, b) == pytest.approx(sps.ttest_rel(a, b).pvalue, rel=1e-12)
    assert math.isnan(paired_t_pvalue([0.7], [0.6]))  # n < 2
    assert math.isnan(paired_t_pvalue([0.7, 0.8], [0.6, 0.7]))  # no spread in the differences


def test_sign_flip_pvalue_against_brute_force():
    # n = 3, all differences positive: only the all-+ and all-- patterns reach |sum| -> 2/8
    assert sign_flip_pvalue([0.01, 0.02, 0.03]) == 0.25 == min_sign_flip_pvalue(3)
    # |±0.3 ±0.1 ±0.2| >= 0.4 for (+,+,+), (+,-,+) and their mirrors -> 4/8
    assert sign_flip_pvalue([0.3, -0.1, 0.2]) == 0.5
    assert sign_flip_pvalue([0.0, 0.0]) == 1.0
    assert math.isnan(sign_flip_pvalue([]))
    d = np.random.default_rng(0).normal(0.3, 1.0, size=7)
    hits = sum(
        abs(sum(s * x for s, x in zip(signs, d))) >= abs(d.sum()) - 1e-12
        for signs in itertools.product([-1, 1], repeat=len(d))
    )
    exact = hits / 2 ** len(d)
    assert sign_flip_pvalue(d) == exact
    # beyond max_exact: a seeded Monte Carlo estimate close to the exact value
    assert sign_flip_pvalue(d, max_exact=4, samples=50_000) == pytest.approx(exact, abs=0.01)


def test_compare_pair_uses_shared_trials_and_marks_n_below_2():
    c = compare_pair("x", "y", {0: 0.9, 1: 0.8, 2: 0.85, 3: 0.7}, {0: 0.8, 1: 0.69, 2: 0.73})
    d = np.array([0.1, 0.11, 0.12])  # trial 3 is not shared
    assert c.trials == [0, 1, 2] and c.n == 3 and c.label == "x vs y"
    assert c.mean_diff == pytest.approx(d.mean()) and c.std_diff == pytest.approx(d.std(ddof=1))
    assert c.t_pvalue == pytest.approx(sps.ttest_rel([0.9, 0.8, 0.85], [0.8, 0.69, 0.73]).pvalue)
    assert c.t_pvalue < 0.01 and c.perm_pvalue == 0.25  # the permutation floor with n = 3
    assert c.verdict == "x better (p<0.05)"

    one = compare_pair("x", "y", {0: 0.9, 1: 0.8}, {1: 0.6})
    assert one.n == 1 and math.isnan(one.t_pvalue) and math.isnan(one.std_diff)
    assert one.verdict == "no test possible (n = 1 < 2)"
    none = compare_pair("x", "y", {0: 0.9}, {1: 0.6})
    assert none.n == 0 and math.isnan(none.mean_diff) and "n = 0 < 2" in none.verdict
    same = compare_pair("x", "y", {0: 0.9, 1: 0.8}, {0: 0.9, 1: 0.8})
    assert same.verdict == "no difference (identical AUCs)"
    worse = compare_pair("x", "y", {0: 0.5, 1: 0.6, 2: 0.5}, {0: 0.9, 1: 0.8, 2: 0.95})
    assert worse.verdict == "y better (p<0.05)"
    assert "no significant" in compare_pair("x", "y", {0: 0.5, 1: 0.9}, {0: 0.6, 1: 0.7}).verdict


def test_all_pairs_and_ranks_by_hand():
    aucs = {"a": {0: 0.7, 1: 0.6}, "b": {0: 0.5, 1: 0.825}, "c": {0: 0.4, 1: 0.5}}
    pairs = compare_all_pairs(aucs, order=["b", "a", "c"])
    assert [p.label for p in pairs] == ["b vs a", "b vs c", "a vs c"]
    assert competition_ranks({"a": 2.0, "b": 3.0, "c": 2.0, "d": 1.0}) == {
        "b": 1,
        "a": 2,
        "c": 2,
        "d": 4,
    }
    # trial 0: a 1st, b 2nd, c 3rd; trial 1: b 1st, a 2nd, c 3rd
    ranks, shared = mean_trial_ranks(aucs)
    assert shared == [0, 1] and ranks == {"a": 1.5, "b": 1.5, "c": 3.0}
    ties, _ = mean_trial_ranks({"a": {0: 0.5}, "b": {0: 0.5}, "c": {0: 0.1}})
    assert ties == {"a": 1.5, "b": 1.5, "c": 3.0}


# ---------------------------------------------------------------------------------------- report
def test_report_of_one_run_by_hand(tmp_path):
    run = write_run(tmp_path / "run", CURVES)
    result = write_report([run], tmp_path / "out")
    aucs = {s.strategy: s.auc for s in result.summaries}
    np.testing.assert_allclose(aucs["a"], [0.70, 0.60])
    np.testing.assert_allclose(aucs["b"], [0.50, 0.825])
    np.testing.assert_allclose(aucs["c"], [0.40, 0.50])
    assert result.strategies == ["b", "a", "c"]  # by mean AUC
    assert [c.label for c in result.comparisons] == ["b vs a", "b vs c", "a vs c"]
    assert result.incomplete == []
    md = result.markdown_path.read_text()
    # rank, strategy, AUC mean ± std, mean within-trial rank, trials, per-trial AUC
    assert "| 2 | a | 65.0 ± 7.1 | 1.50 | 2 | t0: 70.0, t1: 60.0 |" in md
    assert "| 3 | c | 45.0 ± 7.1 | 3.00 | 2 | t0: 40.0, t1: 50.0 |" in md
    assert "| strategy | 10% (10) | 15% (15) | 20% (20) | AUC | trials |" in md
    assert "| a | 55.0 ± 7.1 | 65.0 ± 7.1 | 75.0 ± 21.2 | 65.0 ± 7.1 | 2 |" in md
    # a vs c: differences 0.30, 0.10 -> +20.00 ± 14.14 pp, 95% interval 20 ± t(0.975, 1) * 10;
    # sign flips: 2 of 4 patterns; a wins both trials
    p = sps.ttest_rel([0.7, 0.6], [0.4, 0.5]).pvalue
    half = sps.t.ppf(0.975, 1) * 10.0
    assert (
        f"| a vs c | +20.00 ± 14.14 | [{20 - half:+.2f}, {20 + half:+.2f}] | {p:.3g} | 0.5 | 2/2 "
        "| 2 | no significant difference |"
    ) in md
    # selection 0.1, 0.2 s (+ none in the last cycle), training 0.5, 1.5, 2.5 s, per trial
    assert "| a | 0.15 ± 0.06 | 0.30 ± 0.00 | 1.50 ± 0.89 | 4.50 ± 0.00 | 2 |" in md
    assert "```yaml\ndataset: digits" in md and "![learning curves" in md
    assert result.curves_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 1 | b |" in result.table and "b vs a" in result.table


def test_merge_runs_of_different_strategies_on_the_same_seeds(tmp_path):
    one = write_run(tmp_path / "one", {"random": CURVES["c"], "entropy": CURVES["a"]})
    two = write_run(tmp_path / "two", {"gradnorm": CURVES["b"]})
    result = write_report([one, two], tmp_path / "out")
    assert result.strategies == ["gradnorm", "entropy", "random"]
    assert len(result.comparisons) == 3 and all(c.n == 2 for c in result.comparisons)
    page = result.html_path.read_text()
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page
    assert "data:image/png;base64,iVBORw0KGgo" in page  # the PNG signature, base64-encoded
    assert "http://" not in page and "https://" not in page and "<link" not in page
    for name in ("random", "entropy", "gradnorm", "gradnorm vs random", str(one), str(two)):
        assert name in page
    for heading in ("Area under the learning curve", "Pairwise comparisons", "Time"):
        assert heading in page
    assert (tmp_path / "out" / "summary.md").exists()


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"strategies": ["a"]}, ConfigError, "strategy 'a' appears in both"),
        ({"seed": 5}, ConfigError, "seeds per trial differ"),
        ({"epochs": 2}, ConfigError, "protocol: epochs is 1 in .* but 2 in"),
        ({"dataset": "mnist"}, ConfigError, "protocol: dataset is 'digits'"),
        ({"budget_fraction": 0.1}, ConfigError, "protocol: budget_fraction"),
        ({"augment": "crop"}, ConfigError, "protocol: augment is 'dataset' in .* but 'crop'"),
    ],
)
def test_merging_mismatched_runs_is_refused(tmp_path, options, error, message):
    one = write_run(tmp_path / "one", {"a": CURVES["a"]})
    curves = {name: CURVES["b"] for name in options.pop("strategies", ["b"])}
    two = write_run(tmp_path / "two", curves, **options)
    with pytest.raises(error, match=message) as info:
        write_report([one, two], tmp_path / "out")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_bad_folders_are_refused(tmp_path):
    run = write_run(tmp_path / "run", {"a": CURVES["a"]})
    with pytest.raises(RunDirectoryError, match="does not exist"):
        write_report([tmp_path / "nope"], tmp_path / "out")
    with pytest.raises(RunDirectoryError, match="given twice"):
        write_report([run, run], tmp_path / "out")
    other = write_run(tmp_path / "other", {"b": CURVES["b"]})
    with pytest.raises(RunDirectoryError, match="one of the merged run folders"):
        write_report([run, other], run)
    (run / "config.yaml").unlink()
    with pytest.raises(RunDirectoryError, match="has no config.yaml"):
        write_report([run], tmp_path / "out")


def test_partial_runs_keep_finished_curves_and_list_the_rest(tmp_path):
    curves = {"a": CURVES["a"], "b": [*CURVES["b"], [0.1, 0.2]]}  # b's trial 2 stopped at cycle 1
    run = write_run(tmp_path / "run", curves, strategies=["a", "b", "late"], trials=3)
    result = write_report([run], tmp_path / "out")
    assert {s.strategy: s.trials for s in result.summaries} == {"a": 2, "b": 2}
    found = {(c.strategy, c.trial): c.cycles_done for c in result.incomplete}
    assert found == {("b", 2): 2, ("a", 2): 0, ("late", 0): 0, ("late", 1): 0, ("late", 2): 0}
    page = result.html_path.read_text()
    assert "Incomplete" in page and "b trial 2 (2 of 3 cycles)" in page
    assert "late trial 0 (not started)" in page
    # a strategy re-run in another folder is not "not started"
    late = write_run(tmp_path / "late", {"late": CURVES["c"]})
    merged = write_report([run, late], tmp_path / "merged")
    assert not any(c.strategy == "late" for c in merged.incomplete)


def test_single_trial_report_marks_no_test(tmp_path):
    run = write_run(tmp_path / "run", {"a": [[0.5, 0.6, 0.7]], "b": [[0.4, 0.5, 0.6]]})
    result = write_report([run], tmp_path / "out")
    (pair,) = result.comparisons
    assert pair.n == 1 and pair.verdict == "no test possible (n = 1 < 2)"
    md = result.markdown_path.read_text()
    assert "| a vs b | +10.00 | — | — | 1 | 1/1 | 1 | no test possible (n = 1 < 2) |" in md
    # one trial has no spread: the mean alone, never "± 0.0" or "nan"
    assert "| 1 | a | 60.0 | 1.00 | 1 | t0: 60.0 |" in md
    assert "| a | 50.0 | 60.0 | 70.0 | 60.0 | 1 |" in md and "nan" not in md.lower()


def test_report_of_a_segmentation_run_ranks_by_miou_and_shows_pixel_accuracy(tmp_path):
    """The same curves as test_report_of_one_run_by_hand, as test mIoU: the same AUCs, ranks and
    paired statistics, every text naming mIoU; pixel accuracy (ranked the other way round) gets
    its own per-cycle table in the mIoU order."""
    seg = write_report([write_run(tmp_path / "seg", CURVES, segmentation_metrics)], tmp_path / "s")
    cls = write_report([write_run(tmp_path / "cls", CURVES)], tmp_path / "c")
    assert {s.metric for s in seg.summaries} == {"test_miou"}
    assert seg.strategies == cls.strategies == ["b", "a", "c"]
    for a, b in zip(seg.comparisons, cls.comparisons):
        assert (a.label, a.mean_diff, a.t_pvalue, a.wins) == (
            b.label,
            b.mean_diff,
            b.t_pvalue,
            b.wins,
        )
    md = seg.markdown_path.read_text()
    assert seg.table == cls.table  # AUC ranking and pairs, printed by `report`
    assert "| 2 | a | 65.0 ± 7.1 | 1.50 | 2 | t0: 70.0, t1: 60.0 |" in md
    assert "area under test mIoU vs labelled fraction" in md and "the curve's mean mIoU" in md
    assert "## Test mIoU per cycle" in md and "## Test pixel accuracy per cycle" in md
    assert "| a | 55.0 ± 7.1 | 65.0 ± 7.1 | 75.0 ± 21.2 | 65.0 ± 7.1 | 2 |" in md
    # pixel accuracy 1 - mIoU / 2: a's (0.75, 0.65, 0.55) and (0.7, 0.7, 0.7); AUCs 0.65, 0.70
    pixel = md[md.index("## Test pixel accuracy per cycle") : md.index("## Time")]
    assert "| a | 72.5 ± 3.5 | 67.5 ± 3.5 | 62.5 ± 10.6 | 67.5 ± 3.5 | 2 |" in pixel
    names = [line[2] for line in pixel.splitlines() if line[:4] in ("| a ", "| b ", "| c ")]
    assert names == ["b", "a", "c"]  # the mIoU ranking, not pixel accuracy's (c first)
    assert "test accuracy" not in md.replace("pixel accuracy", "").lower()
    page = seg.html_path.read_text()
    assert (
        "<h2>Test mIoU per cycle</h2>" in page and "<h2>Test pixel accuracy per cycle</h2>" in page
    )
    assert "test accuracy" not in page.replace("pixel accuracy", "").lower()
    cls_md = cls.markdown_path.read_text()
    assert "## Test accuracy per cycle" in cls_md and "pixel" not in cls_md
    assert "area under test accuracy vs labelled fraction" in cls_md


def test_a_classification_and_a_segmentation_run_are_not_merged(tmp_path):
    one = write_run(tmp_path / "one", {"a": CURVES["a"]})
    two = write_run(tmp_path / "two", {"b": CURVES["b"]}, segmentation_metrics)
    with pytest.raises(ConfigError, match="runs measure different metrics: .* has test_accuracy"):
        write_report([one, two], tmp_path / "out")


def test_segmentation_columns_in_another_order_keep_miou_the_headline(tmp_path):
    from gradnorm_al.experiment.results import read_results
    from gradnorm_al.reports.summary import headline_metric

    run = write_run(tmp_path / "run", CURVES, segmentation_metrics)
    lines = [line.split(",") for line in (run / "results.csv").read_text().splitlines()]
    k = lines[0].index("test_miou")
    for fields in lines:  # test_miou moved after test_pixel_accuracy
        fields.insert(k + 1, fields.pop(k))
    (run / "results.csv").write_text("\n".join(",".join(f) for f in lines) + "\n")
    rows = read_results(run / "results.csv")
    assert list(rows[0])[5:9] == [
        "test_miou",
        "test_pixel_accuracy",
        "train_miou",
        "train_pixel_accuracy",
    ]
    assert headline_metric(rows) == "test_miou" and rows[1]["test_miou"] == 0.7


# ------------------------------------------------------------------ damaged or hand-edited files
RESULTS_HEADER = (
    "strategy,trial,cycle,num_labeled,labeled_fraction,test_accuracy,train_accuracy,"
    "train_seconds,select_seconds,seed"
)


def set_field(run: Path, line: int, name: str, value: str) -> None:
    """Write ``value`` into column ``name`` of results.csv's line ``line`` (1 = the header)."""
    lines = (run / "results.csv").read_text().splitlines()
    fields = lines[line - 1].split(",")
    fields[lines[0].split(",").index(name)] = value
    lines[line - 1] = ",".join(fields)
    (run / "results.csv").write_text("\n".join(lines) + "\n")


def edit_line(run: Path, name: str, line: int, edit) -> None:
    """Replace line ``line`` (from 1) of the file ``name`` by ``edit(line_bytes)``."""
    lines = (run / name).read_bytes().split(b"\n")
    lines[line - 1] = edit(lines[line - 1])
    (run / name).write_bytes(b"\n".join(lines))


def drop_column(run: Path, name: str) -> None:
    lines = (run / "results.csv").read_text().splitlines()
    k = lines[0].split(",").index(name)
    rows = [",".join(f for i, f in enumerate(line.split(",")) if i != k) for line in lines]
    (run / "results.csv").write_text("\n".join(rows) + "\n")


def config_line(run: Path, key: str) -> int:
    lines = (run / "config.yaml").read_text().splitlines()
    return next(i for i, line in enumerate(lines, start=1) if line.startswith(f"{key}:"))


def set_option(run: Path, key: str, text: str | bytes) -> int:
    """Replace the line of option ``key`` in config.yaml by ``text``; return its number."""
    line = config_line(run, key)
    data = text if isinstance(text, bytes) else text.encode()
    edit_line(run, "config.yaml", line, lambda _: data)
    return line


# results.csv of write_run(CURVES): line 1 the header, lines 2-4 a t0 c0-c2, 5-7 b t0, 8-10 c t0,
# 11-13 a t1 ...; selections.jsonl: cycles 0 and 1 of a t0 (lines 1-2), b t0 (3-4), ...
DAMAGES = {
    # id: (file, damage(run) -> line, what the message says)
    "accuracy-nan": (
        "results.csv",
        lambda run: set_field(run, 3, "test_accuracy", "nan") or 3,
        "test_accuracy must be a finite number, got 'nan'",
    ),
    "accuracy-above-1": (
        "results.csv",
        lambda run: set_field(run, 4, "test_accuracy", "5.0") or 4,
        "test_accuracy must be a fraction in [0, 1], got 5.0",
    ),
    "train-accuracy-inf": (
        "results.csv",
        lambda run: set_field(run, 9, "train_accuracy", "inf") or 9,
        "train_accuracy must be a finite number",
    ),
    "cycle-negative": (
        "results.csv",
        lambda run: set_field(run, 2, "cycle", "-7") or 2,
        "cycle must be a whole number >= 0, got '-7'",
    ),
    "cycle-not-integer": (
        "results.csv",
        lambda run: set_field(run, 3, "cycle", "1.5") or 3,
        "cycle must be a whole number >= 0, got '1.5'",
    ),
    "cycle-beyond-config": (
        "results.csv",
        lambda run: set_field(run, 4, "cycle", "9") or 4,
        "cycle 9 is beyond config.yaml's 3 cycles (0 to 2)",
    ),
    "trial-word": (
        "results.csv",
        lambda run: set_field(run, 6, "trial", "one") or 6,
        "trial must be a whole number >= 0, got 'one'",
    ),
    "strategy-not-in-config": (
        "results.csv",
        lambda run: set_field(run, 5, "strategy", "bb") or 5,
        "strategy 'bb' is not among config.yaml's strategies (a, b, c)",
    ),
    "row-repeated": (
        "results.csv",
        lambda run: set_field(run, 3, "cycle", "0") or 3,
        "a trial 0 cycle 0 is already on line 2",
    ),
    "fraction-not-growing": (
        "results.csv",
        lambda run: set_field(run, 4, "labeled_fraction", "0.1") or 4,
        "labeled_fraction 0.1 of cycle 2 is not above cycle 1's 0.15",
    ),
    "empty-value": (
        "results.csv",
        lambda run: set_field(run, 7, "train_seconds", "") or 7,
        "train_seconds is empty",
    ),
    "column-missing": (
        "results.csv",
        lambda run: drop_column(run, "test_accuracy") or 1,
        "the header lacks the column(s) test_accuracy",
    ),
    "train-column-missing": (
        "results.csv",
        lambda run: drop_column(run, "train_accuracy") or 1,
        "the header lacks the column(s) train_accuracy",
    ),
    "metric-columns-missing": (
        "results.csv",
        lambda run: drop_column(run, "test_accuracy") or drop_column(run, "train_accuracy") or 1,
        "the header has no metric columns; a run writes test_accuracy, train_accuracy "
        "(classification) or test_miou, test_pixel_accuracy, train_miou, train_pixel_accuracy "
        "(segmentation)",
    ),
    "fields-missing": (
        "results.csv",
        lambda run: edit_line(run, "results.csv", 5, lambda b: b.rsplit(b",", 2)[0]) or 5,
        "8 fields where the header has 10",
    ),
    "binary-bytes": (
        "results.csv",
        lambda run: edit_line(run, "results.csv", 3, lambda _: b"\x89PNG\r\x00\x1a\xff") or 3,
        "is not UTF-8 text",
    ),
    "not-utf8": (
        "results.csv",
        lambda run: edit_line(run, "results.csv", 8, lambda b: b.replace(b"c,", b"\xe9,", 1)) or 8,
        "byte 0xe9 is not UTF-8 text",
    ),
    "selection-truncated": (
        "selections.jsonl",
        lambda run: edit_line(run, "selections.jsonl", 2, lambda b: b[: len(b) // 2]) or 2,
        "not a JSON object",
    ),
    "selection-not-json": (
        "selections.jsonl",
        lambda run: edit_line(run, "selections.jsonl", 1, lambda _: b"selected 10 samples") or 1,
        "not a JSON object",
    ),
    "selection-negative-index": (
        "selections.jsonl",
        lambda run: (
            edit_line(run, "selections.jsonl", 3, lambda b: b.replace(b"[", b"[-4, ", 1)) or 3
        ),
        "indices must be whole numbers >= 0, got -4",
    ),
    "selection-fractional-index": (
        "selections.jsonl",
        lambda run: (
            edit_line(run, "selections.jsonl", 4, lambda b: b.replace(b"[", b"[2.5, ", 1)) or 4
        ),
        "indices must be whole numbers >= 0, got 2.5",
    ),
    "config-bad-yaml": (
        "config.yaml",
        lambda run: set_option(run, "cycles", "cycles: [3"),
        "not valid YAML",
    ),
    "config-wrong-type": (
        "config.yaml",
        lambda run: set_option(run, "epochs", "epochs: many"),
        "epochs must be an integer >= 1, got 'many'",
    ),
    "config-unknown-option": (
        "config.yaml",
        lambda run: set_option(run, "lr", "lr_typo: 0.1"),
        "unknown option 'lr_typo'",
    ),
    "config-repeated-option": (
        "config.yaml",
        lambda run: max(config_line(run, "epochs"), set_option(run, "lr", "epochs: 1")),
        "option 'epochs' is already set on line",
    ),
    "config-not-a-mapping": (
        "config.yaml",
        lambda run: (run / "config.yaml").write_text("- digits\n- random\n") and 1,
        "must hold a mapping of options",
    ),
    "config-not-utf8": (
        "config.yaml",
        lambda run: set_option(run, "model", b"model: sm\xe4llcnn"),
        "is not UTF-8 text",
    ),
}


# results.csv of write_run(CURVES, segmentation_metrics): as above, 12 columns
SEGMENTATION_DAMAGES = {
    "miou-above-1": (
        lambda run: set_field(run, 3, "test_miou", "1.5") or 3,
        "test_miou must be a fraction in [0, 1], got 1.5",
    ),
    "pixel-accuracy-negative": (
        lambda run: set_field(run, 6, "train_pixel_accuracy", "-0.25") or 6,
        "train_pixel_accuracy must be a fraction in [0, 1], got -0.25",
    ),
    "miou-nan": (
        lambda run: set_field(run, 9, "train_miou", "nan") or 9,
        "train_miou must be a finite number, got 'nan'",
    ),
    "train-miou-missing": (
        lambda run: drop_column(run, "train_miou") or 1,
        "the header lacks the column(s) train_miou;",
    ),
    "test-pixel-accuracy-missing": (
        lambda run: drop_column(run, "test_pixel_accuracy") or 1,
        "the header lacks the column(s) test_pixel_accuracy;",
    ),
    "both-miou-missing": (  # pixel accuracy alone would pass the test_/train_ pairing
        lambda run: drop_column(run, "test_miou") or drop_column(run, "train_miou") or 1,
        "the header lacks the column(s) test_miou, train_miou;",
    ),
    "metric-columns-missing": (
        lambda run: (
            [
                drop_column(run, c)
                for c in ("test_miou", "test_pixel_accuracy", "train_miou", "train_pixel_accuracy")
            ]
            and 1
        ),
        "the header has no metric columns",
    ),
    "fields-missing": (
        lambda run: edit_line(run, "results.csv", 5, lambda b: b.rsplit(b",", 2)[0]) or 5,
        "10 fields where the header has 12",
    ),
}


def _one_line_errors(run: Path, out: Path, capsys, name: str, line: int, what: str) -> None:
    """`report` and every analysis that reads the file fail with exit status 2 and one line
    `gradnorm-al: error: <file>:<line>: <what>; <fix>`; nothing is written."""
    from gradnorm_al.cli import main

    commands = [["report", str(run), "--out", str(out)], ["analyze", "topk-overlap"]]
    if name != "selections.jsonl":  # the results-only analyses do not read the selections
        commands += [["analyze", "generalization-gap"], ["analyze", "timing"]]
    for argv in commands:
        argv = argv if argv[0] == "report" else [*argv, str(run)]
        capsys.readouterr()
        code = main(argv)
        stdout, err = capsys.readouterr()
        assert code == 2, (argv, code, stdout, err)
        assert "Traceback" not in err and err.count("\n") == 1 and err.endswith("\n"), err
        prefix = f"gradnorm-al: error: {run / name}:{line}: "
        assert err.startswith(prefix), (argv, err, prefix)
        assert what in err and "; " in err[len(prefix) :], err
    assert not out.exists()


@pytest.mark.parametrize("case", list(SEGMENTATION_DAMAGES))
def test_damaged_segmentation_results_give_one_line_errors(tmp_path, capsys, case):
    run = write_run(tmp_path / "run", CURVES, segmentation_metrics)
    damage, what = SEGMENTATION_DAMAGES[case]
    _one_line_errors(run, tmp_path / "out", capsys, "results.csv", damage(run), what)


@pytest.mark.parametrize("case", list(DAMAGES))
def test_damaged_run_files_give_one_line_errors(tmp_path, capsys, case):
    """`report` and `analyze` on a damaged or hand-edited run folder: exit status 2 and one line
    `gradnorm-al: error: <file>:<line>: <what>; <fix>`, never a traceback or a silently wrong
    table."""
    run = write_run(tmp_path / "run", CURVES)
    name, damage, what = DAMAGES[case]
    _one_line_errors(run, tmp_path / "out", capsys, name, damage(run), what)


def test_damaged_selections_through_a_real_process(tmp_path):
    import subprocess
    import sys

    run = write_run(tmp_path / "run", CURVES)
    edit_line(run, "selections.jsonl", 2, lambda b: b[:20])
    done = subprocess.run(
        [sys.executable, "-m", "gradnorm_al", "report", str(run)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith(f"gradnorm-al: error: {run / 'selections.jsonl'}:2: not a JSON")
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_results_written_by_the_store_read_back_unchanged(tmp_path):
    from gradnorm_al.experiment.results import read_results, read_selections

    run = write_run(tmp_path / "run", CURVES)
    rows = read_results(run / "results.csv", ExperimentConfig.from_yaml(run / "config.yaml"))
    assert len(rows) == 18 and rows[0]["strategy"] == "a" and rows[2]["select_seconds"] is None
    assert rows[1]["test_accuracy"] == 0.7 and rows[1]["cycle"] == 1
    selections = read_selections(run / "selections.jsonl")
    assert len(selections) == 12
    record = selections[("b", 1, 1)]
    assert record.indices.tolist() == [15, 16, 17, 18, 19] and record.line == 10


def test_the_fix_named_for_a_damaged_run_file_works(tmp_path, capsys):
    """A real run keeps its checkpoints: the error says `run --resume DIR` rewrites the damaged
    file, and it does, byte for byte."""
    from gradnorm_al.cli import main

    run = tmp_path / "run"
    tiny = ["--dataset", "digits", "--epochs", "1", "--trials", "1", "--cycles", "2", "--quiet"]
    assert main(["run", *tiny, "--strategy", "entropy", "--out", str(run)]) == 0
    results, selections = (
        (run / "results.csv").read_bytes(),
        (run / "selections.jsonl").read_bytes(),
    )
    set_field(run, 2, "test_accuracy", "1.5")
    capsys.readouterr()
    assert main(["report", str(run)]) == 2
    fix = (
        f"restore the file: `gradnorm-al run --resume {run}` rewrites it from the run's checkpoints"
    )
    assert capsys.readouterr().err == (
        f"gradnorm-al: error: {run / 'results.csv'}:2: test_accuracy must be a fraction in "
        f"[0, 1], got 1.5; {fix}\n"
    )
    (run / "selections.jsonl").write_bytes(selections[:10])
    assert main(["run", "--resume", str(run), "--quiet"]) == 0
    assert (run / "results.csv").read_bytes() == results
    assert (run / "selections.jsonl").read_bytes() == selections
    assert main(["report", str(run)]) == 0


def test_summary_pairs_each_strategy_with_random_and_the_best_other(tmp_path):
    from gradnorm_al.experiment.results import read_results
    from gradnorm_al.reports.summary import paired_statistics, summarise

    # AUCs: random 0.40, 0.50; x and its twin 0.50, 0.825 (identical: not each other's "other");
    # y 0.70, 0.60
    curves = {"random": CURVES["c"], "x": CURVES["b"], "twin": CURVES["b"], "y": CURVES["a"]}
    text = paired_statistics(
        summarise(read_results(write_run(tmp_path / "r", curves) / "results.csv"))
    )

    def expected(d: list[float]) -> str:
        lo, hi = sps.t.interval(0.95, len(d) - 1, np.mean(d), sps.sem(d))
        wins = sum(v > 0 for v in d)
        flips = [abs(a * d[0] + b * d[1]) for a in (-1, 1) for b in (-1, 1)]
        p = sum(f >= abs(sum(d)) - 1e-12 for f in flips) / 4
        return (
            f"{100 * np.mean(d):+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}], p={p:.2g}, "
            f"wins {wins}/2: not significant (the interval contains 0)"
        )

    lines = {line.split("**")[1]: line for line in text.splitlines() if line.startswith("- **")}
    assert list(lines) == ["x", "twin", "y", "random"]  # best mean AUC first
    assert lines["x"] == (
        f"- **x**: vs random {expected([0.10, 0.325])}; vs best other (y) {expected([-0.2, 0.225])}"
    )
    assert lines["y"] == (
        f"- **y**: vs random {expected([0.3, 0.1])}; vs best other (x) {expected([0.2, -0.225])}"
    )
    assert lines["random"] == f"- **random**: vs best other (x) {expected([-0.10, -0.325])}"
    assert "cannot go below 0.5 with 2 trials" in text and "nan" not in text


def test_pair_sentence_names_a_winner_only_when_the_interval_excludes_zero():
    better = compare_pair("x", "y", {0: 0.9, 1: 0.8, 2: 0.85}, {0: 0.8, 1: 0.69, 2: 0.73})
    assert better.ci_low > 0 and better.wins == 3
    assert better.sentence().endswith("p=0.25, wins 3/3: x better (p<0.05)")
    unsure = compare_pair("x", "y", {0: 0.9, 1: 0.8, 2: 0.85}, {0: 0.8, 1: 0.85, 2: 0.73})
    assert unsure.ci_low < 0 < unsure.ci_high and unsure.wins == 2
    assert unsure.sentence().endswith("wins 2/3: not significant (the interval contains 0)")
    assert compare_pair("x", "y", {0: 0.9}, {0: 0.8}).sentence() == (
        "+10.00 in 1 trial: no test possible (n = 1 < 2)"
    )
