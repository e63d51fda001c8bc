"""Crash-safe runs: a run killed with SIGKILL mid-cycle resumes to exactly the uninterrupted
results, without recomputing a finished cycle; checkpoints load with weights_only=True."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import gradnorm_al.learner
from gradnorm_al.cli import main
from gradnorm_al.experiment.checkpoint import content_digest, load_state, state_path

BASE = ["run", "--dataset", "digits", "--batch-size", "32", "--lr", "0.05", "--seed", "3"]
BOTH = ["--strategy", "random", "--strategy", "entropy-gradnorm"]
ARGS = [*BASE, *BOTH, "--trials", "2", "--cycles", "4", "--epochs", "3", "--quiet"]
TIMING = ("train_seconds", "select_seconds")


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "results.csv", newline="") as fh:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(fh)]


def _finished_cycles(out: Path) -> int:
    total = 0
    for path in (out / "state").glob("*.pt"):
        total += torch.load(path, weights_only=True)["next_cycle"]
    return total


@pytest.mark.slow
def test_a_run_killed_mid_cycle_resumes_to_the_uninterrupted_results(tmp_path, monkeypatch):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert main([*ARGS, "--out", str(reference)]) == 0
    total_cycles = 2 * 2 * 4

    proc = subprocess.Popen(
        [sys.executable, "-m", "gradnorm_al.cli", *ARGS, "--out", str(killed)],
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    # kill -9 while the second strategy of the first trial is in the middle of its cycles
    checkpoint = state_path(killed, "entropy-gradnorm", 0)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if checkpoint.exists() and torch.load(checkpoint, weights_only=True)["next_cycle"] >= 1:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = _finished_cycles(killed)
    assert 0 < finished < total_cycles
    assert len(_rows(killed)) <= finished  # results.csv never runs ahead of the checkpoints

    fits = []
    real_fit = gradnorm_al.learner.ActiveLearner.fit
    monkeypatch.setattr(
        gradnorm_al.learner.ActiveLearner,
        "fit",
        lambda *a, **k: fits.append(1) or real_fit(*a, **k),
    )
    assert main(["run", "--resume", str(killed), "--quiet"]) == 0
    assert len(fits) == total_cycles - finished  # no finished cycle is trained again
    assert _rows(killed) == _rows(reference)
    assert (killed / "selections.jsonl").read_text() == (reference / "selections.jsonl").read_text()
    assert (killed / "summary.md").read_text() == (reference / "summary.md").read_text()


def test_checkpoints_hold_the_trial_state_and_load_with_weights_only(tmp_path):
    out = tmp_path / "run"
    args = [*BASE, *BOTH, "--trials", "1", "--cycles", "3", "--epochs", "1", "--quiet"]
    assert main([*args, "--out", str(out)]) == 0
    state = load_state(state_path(out, "random", 0), strategy="random", trial=0, seed=3)
    assert state.next_cycle == 3 and len(state.records) == 3
    assert state.learner["model"] is None  # a finished trial keeps records, pool, labels
    labeled_at = state.learner["pool"]["labeled_at"]
    assert sum(c >= 0 for c in labeled_at) == len(state.learner["labels"])
    assert sum(c >= 0 for c in labeled_at) == state.records[-1].num_labeled
    # resuming a finished run recomputes nothing and keeps the results
    before = _rows(out)
    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    assert _rows(out) == before


def test_resume_refuses_other_runs_checkpoints_and_extra_options(tmp_path, capsys):
    out = tmp_path / "run"
    args = [*BASE, "--strategy", "random", "--trials", "1", "--cycles", "2", "--epochs", "1"]
    args.append("--quiet")
    assert main([*args, "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["run", "--resume", str(out), "--epochs", "3"]) == 2
    assert "drop --epochs" in capsys.readouterr().err
    assert main(["run", "--resume", str(tmp_path / "nothing")]) == 2
    assert "no run to resume" in capsys.readouterr().err
    # a checkpoint of another seed is refused, not silently mixed in: an edit fails the checksum,
    # and with its checksum recomputed, the owner check
    path = state_path(out, "random", 0)
    payload = torch.load(path, weights_only=True)
    payload["seed"] = 99
    torch.save(payload, path)
    assert main(["run", "--resume", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "fails its checksum" in err and err.count("\n") == 1
    del payload["checksum"]
    torch.save({**payload, "checksum": content_digest(payload)}, path)
    assert main(["run", "--resume", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "belongs to another run" in err and err.count("\n") == 1


@pytest.mark.parametrize("name", ["ll4al", "mc-dropout"])
def test_resuming_from_any_cycle_state_equals_the_uninterrupted_trial(small_digits, name):
    """In-process: the state after every cycle, including a jointly trained auxiliary module
    (learning loss) and a model the strategy changed (MC dropout), resumes to the same trial."""
    from conftest import bundle_trial

    from gradnorm_al import create_strategy
    from gradnorm_al.loop import LoopConfig
    from gradnorm_al.train import TrainConfig

    def trial(**kwargs):
        return bundle_trial(
            small_digits,
            create_strategy(name),
            loop=LoopConfig(cycles=3, initial_fraction=0.1, budget_fraction=0.05),
            train=TrainConfig(epochs=2, lr=0.05, batch_size=32),
            seed=1,
            **kwargs,
        )

    def key(records):
        return [(r.cycle, r.test_accuracy, r.train_accuracy, None if r.selected is None else
                 r.selected.tolist()) for r in records]  # fmt: skip

    states = []
    full = trial(on_state=states.append)
    assert [s.next_cycle for s in states] == [1, 2, 3]
    if name == "ll4al":
        assert states[0].learner["auxiliary"] is not None
    for state in states[:-1]:
        assert key(trial(resume=state)) == key(full)
