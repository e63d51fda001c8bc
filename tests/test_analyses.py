"""Analyses over a run folder's results: generalization gap (Table 3) and timing (A.7)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from gradnorm_al.analyses.generalization_gap import generalization_gap
from gradnorm_al.analyses.timing import timing
from gradnorm_al.cli import main
from gradnorm_al.experiment import ExperimentConfig
from gradnorm_al.experiment.results import ResultsStore
from gradnorm_al.loop import CycleRecord

# (strategy, trial, cycle, num_labeled, test, train, train_s, select_s); pool of 100
ROWS = [
    ("a", 0, 0, 10, 0.50, 0.90, 1.0, 0.2),
    ("a", 0, 1, 20, 0.60, 0.80, 2.0, None),
    ("a", 1, 0, 10, 0.70, 0.90, 3.0, 0.4),
    ("a", 1, 1, 20, 0.80, 0.90, 4.0, None),
    ("b", 0, 0, 10, 0.55, 1.00, 5.0, 1.0),
    ("b", 0, 1, 20, 0.65, 1.00, 6.0, None),
]


def _run_folder(tmp_path: Path, subset_size=None) -> Path:
    store = ResultsStore(tmp_path)
    for s, t, c, n, test, train, ts, ss in ROWS:
        metrics = {"test_accuracy": test, "train_accuracy": train}
        store.add(CycleRecord(s, t, c, n, n / 100, metrics, ts, ss, seed=t))
    config = ExperimentConfig(strategies=["a", "b"], cycles=2, subset_size=subset_size)
    (tmp_path / "config.yaml").write_text(config.to_yaml())
    return tmp_path


def test_generalization_gap_by_hand(tmp_path):
    rows = generalization_gap(
        [
            dict(zip(("strategy", "trial", "cycle", "num_labeled"), r[:4]))
            | {"test_accuracy": r[4], "train_accuracy": r[5]}
            for r in ROWS
        ]
    )
    by = {(r["strategy"], r["cycle"]): r for r in rows}
    # a, cycle 0: gaps 40 and 20 points -> 30 ± 14.14; a, cycle 1: 20 and 10 -> 15 ± 7.07
    assert math.isclose(by[("a", 0)]["gap_mean"], 30.0)
    assert math.isclose(by[("a", 0)]["gap_std"], math.sqrt(200))
    assert math.isclose(by[("a", 1)]["gap_mean"], 15.0) and by[("a", 1)]["trials"] == 2
    assert math.isclose(by[("a", 0)]["test_accuracy"], 60.0)
    # one trial: no std
    assert math.isclose(by[("b", 0)]["gap_mean"], 45.0) and math.isnan(by[("b", 0)]["gap_std"])


def test_timing_by_hand_with_and_without_a_candidate_subset():
    raw = [
        {"strategy": s, "trial": t, "cycle": c, "num_labeled": n, "labeled_fraction": n / 100}
        | {"train_seconds": ts, "select_seconds": ss}
        for s, t, c, n, _, _, ts, ss in ROWS
    ]
    by = {(r["strategy"], r["cycle"]): r for r in timing(raw, None)}
    assert by[("a", 0)]["train_seconds"] == 2.0 and math.isclose(
        by[("a", 0)]["select_seconds"], 0.3
    )
    assert by[("a", 0)]["candidates"] == 90  # every unlabelled sample of the pool of 100
    assert by[("a", 1)]["select_seconds"] is None and by[("a", 1)]["candidates"] == 0
    assert {(r["strategy"], r["cycle"]): r["candidates"] for r in timing(raw, 50)}[("b", 0)] == 50


def test_analyze_commands_write_tables(tmp_path, capsys):
    run = _run_folder(tmp_path / "run", subset_size=40)
    assert main(["analyze", "generalization-gap", str(run)]) == 0
    out = capsys.readouterr().out
    assert "| a | 30.0 ± 14.1 | 15.0 ± 7.1 |" in out
    assert "| b | 45.0 | 35.0 |" in out and "nan" not in out  # one trial: no std to show
    with open(run / "analysis" / "generalization_gap.csv", newline="") as fh:
        gaps = list(csv.DictReader(fh))
    assert [r["gap_std"] for r in gaps if r["strategy"] == "b"] == ["", ""]  # empty, not nan
    assert main(["analyze", "timing", str(run)]) == 0
    assert "| b | 5.0 / 1.00 (40) | 6.0 / — (0) |" in capsys.readouterr().out
    with open(run / "analysis" / "timing.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 4
    assert (run / "analysis" / "generalization_gap.md").exists()
    assert main(["analyze", "timing", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
