"""Configs, the results store and the summary statistics."""

from __future__ import annotations

import numpy as np
import pytest

from gradnorm_al import ConfigError, ExperimentConfig
from gradnorm_al.experiment import read_results, run_experiment
from gradnorm_al.reports.summary import area_under_curve, format_table, summarise


def test_from_dict_accepts_dashes_and_rejects_unknown_keys():
    cfg = ExperimentConfig.from_dict({"initial-fraction": 0.2, "strategy": "random"})
    assert cfg.initial_fraction == 0.2 and cfg.strategies == ["random"]
    with pytest.raises(ConfigError, match="unknown option 'learning_rate'"):
        ExperimentConfig.from_dict({"learning_rate": 0.1})
    with pytest.raises(ConfigError, match="epochs must be an integer"):
        ExperimentConfig.from_dict({"epochs": "ten"})
    with pytest.raises(ConfigError, match="listed twice"):
        ExperimentConfig.from_dict({"strategies": ["random", "random"]})


def test_yaml_round_trip(tmp_path):
    cfg = ExperimentConfig(epochs=3, milestones=[2], strategies=["random"])
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert ExperimentConfig.from_yaml(path) == cfg
    path.write_text("epochs: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        ExperimentConfig.from_yaml(path)


def test_area_under_curve_by_hand():
    fractions = np.array([0.1, 0.2, 0.4])
    acc = np.array([[0.5, 0.7, 0.9], [0.6, 0.6, 0.6]])
    # trapezoids: (0.5+0.7)/2*0.1 + (0.7+0.9)/2*0.2 = 0.06 + 0.16 = 0.22, over a range of 0.3
    np.testing.assert_allclose(area_under_curve(fractions, acc), [0.22 / 0.3, 0.6])


def test_summary_skips_unfinished_trials_and_formats_mean_and_std():
    rows = []
    for trial, accs in enumerate([[0.5, 0.7], [0.7, 0.9], [0.6]]):
        for cycle, acc in enumerate(accs):
            rows.append(
                {
                    "strategy": "s",
                    "trial": trial,
                    "cycle": cycle,
                    "labeled_fraction": [0.1, 0.2][cycle],
                    "test_accuracy": acc,
                }
            )
    (s,) = summarise(rows)
    assert s.trials == 2
    np.testing.assert_allclose(s.auc, [0.6, 0.8])
    table = format_table([s])
    assert "| s | 60.0 ± 14.1 | 80.0 ± 14.1 | 70.0 ± 14.1 |" in table


def test_run_experiment_writes_results_after_every_cycle(tmp_path, small_digits):
    seen = []
    cfg = ExperimentConfig(
        strategies=["random", "expected-gradnorm"], trials=2, cycles=3, epochs=1, batch_size=32
    )
    result = run_experiment(
        cfg, tmp_path / "run", progress=False, log=seen.append, bundle=small_digits
    )
    rows = read_results(tmp_path / "run" / "results.csv")
    assert len(rows) == 2 * 2 * 3 == len(result.rows)
    assert [(r["trial"], r["strategy"], r["cycle"]) for r in rows[:4]] == [
        (0, "random", 0),
        (0, "random", 1),
        (0, "random", 2),
        (0, "expected-gradnorm", 0),
    ]
    assert all(r["seed"] == r["trial"] for r in rows)
    assert rows[0]["test_accuracy"] == rows[3]["test_accuracy"]  # same start per trial
    assert sum("test accuracy" in line for line in seen) == 4
