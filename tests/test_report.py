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


def write_run(path: Path, curves: dict[str, list[list[float]]], **options) -> Path:
    """A run folder as the runner writes it (config.yaml, then ResultsStore after every cycle).

    ``curves[strategy][trial]`` is the test accuracy per finished cycle; a list shorter than
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
                        metrics={"test_accuracy": acc, "train_accuracy": 1.0},
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
    # a vs c: differences 0.30, 0.10 -> +20.00 ± 14.14 pp; sign flips: 2 of 4 patterns
    p = sps.ttest_rel([0.7, 0.6], [0.4, 0.5]).pvalue
    assert f"| a vs c | +20.00 ± 14.14 | {p:.3g} | 0.5 | 2 | no significant difference |" in md
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
    assert "| a vs b | +10.00 | — | 1 | 1 | no test possible (n = 1 < 2) |" in (
        result.markdown_path.read_text()
    )
