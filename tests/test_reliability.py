"""Nothing lost, nothing silently wrong: every guarantee of a run folder tested by injecting its
fault (kill -9 at chosen moments, concurrent writers, flipped bytes, hand-edited files, a
read-only or full disk, a diverging model) and checking that the outcome is either the exact
uninterrupted result or one clear error line, never a traceback or a silently wrong number."""

from __future__ import annotations

import contextlib
import csv
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import make_context
from torch import nn

import gradnorm_al.learner
from gradnorm_al.cli import main
from gradnorm_al.errors import ChecksumError, NonFiniteError
from gradnorm_al.experiment.checkpoint import load_model, load_state, model_path, state_path
from gradnorm_al.experiment.config import ExperimentConfig
from gradnorm_al.experiment.lock import LOCK_FILE, run_lock
from gradnorm_al.experiment.runner import strategy_kwargs
from gradnorm_al.strategies import create_strategy

STRATEGIES = ("random", "entropy")
ARGS = [
    "run", "--dataset", "digits", "--pool-size", "200", "--cycles", "3", "--epochs", "1",
    "--trials", "1", "--batch-size", "32", "--seed", "1", "--keep-models", "--quiet",
    *[a for s in STRATEGIES for a in ("--strategy", s)],
]  # fmt: skip
ROWS = len(STRATEGIES) * 3
TIMING = ("train_seconds", "select_seconds")
SRC = str(Path(__file__).resolve().parents[1] / "src")

#: the CLI in a child process that kills itself with SIGKILL around the nth replacement of a
#: file whose path ends with TARGET ("before": the temporary file is written, not renamed)
KILLER = textwrap.dedent(
    """
    import os, signal, sys
    target, when, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
    real, seen = os.replace, [0]
    def replace(src, dst, *args, **kwargs):
        if not str(dst).endswith(target):
            return real(src, dst, *args, **kwargs)
        seen[0] += 1
        if seen[0] == nth and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        real(src, dst, *args, **kwargs)
        if seen[0] == nth and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)
    os.replace = replace
    from gradnorm_al.cli import main
    sys.exit(main(sys.argv[4:]))
    """
)


def child(*argv: str, kill: tuple[str, str, int] | None = None) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    if kill is None:
        command = [sys.executable, "-m", "gradnorm_al", *argv]
    else:
        command = [sys.executable, "-c", KILLER, *map(str, kill), *argv]
    return subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def rows(out: Path) -> list[dict[str, str]]:
    with open(out / "results.csv", newline="") as fh:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(fh)]


def one_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradnorm-al: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run every faulted run must end up equal to."""
    out = tmp_path_factory.mktemp("reference") / "run"
    code, err = finish(child(*ARGS, "--out", str(out)))
    assert code == 0, err
    assert len(rows(out)) == ROWS
    return out


def copy_run(reference: Path, dest: Path) -> Path:
    shutil.copytree(reference, dest)
    return dest


def assert_equals_reference(out: Path, reference: Path) -> None:
    assert rows(out) == rows(reference)
    for name in ("selections.jsonl", "summary.md"):
        assert (out / name).read_text() == (reference / name).read_text()
    left = [p for p in out.rglob(".*.tmp")]
    assert not left, f"temporary files left behind: {left}"


# ------------------------------------------------------------------------ kill -9, resume


@pytest.mark.parametrize(
    "kill",
    [
        ("state/entropy.t0.pt", "before", 2),  # a state's temporary written, not renamed
        ("results.csv", "after", 4),  # the results of a cycle written, its successor not begun
        ("models/random.t0.c1.pt", "before", 1),  # a kept model half done
    ],
    ids=["state-temp", "results", "model-temp"],
)
def test_killed_at_a_chosen_moment_resumes_to_the_uninterrupted_run(tmp_path, reference, kill):
    out = tmp_path / "run"
    code, _ = finish(child(*ARGS, "--out", str(out), kill=kill))
    assert code == -signal.SIGKILL
    assert len(rows(out)) < ROWS
    code, err = finish(child("run", "--resume", str(out), "--quiet"))
    assert code == 0, err
    assert_equals_reference(out, reference)


def test_kill_during_resume_of_a_finished_run_never_shrinks_the_results(tmp_path, reference):
    out = copy_run(reference, tmp_path / "run")
    # killed right after the first rewrite of results.csv by the resume
    code, _ = finish(
        child("run", "--resume", str(out), "--quiet", kill=("results.csv", "after", 1))
    )
    assert code == -signal.SIGKILL
    assert rows(out) == rows(reference)  # all 6 rows, not those of the first strategy only


def test_a_killed_run_leaves_no_lock_behind(tmp_path):
    out = tmp_path / "run"
    code, _ = finish(child(*ARGS, "--out", str(out), kill=("state/random.t0.pt", "after", 1)))
    assert code == -signal.SIGKILL
    with run_lock(out):  # the OS dropped the dead process's lock
        pass


# ------------------------------------------------------------------------ concurrent writers


def test_a_second_writer_is_refused_naming_the_holder(tmp_path, reference, capsys):
    out = copy_run(reference, tmp_path / "run")
    with run_lock(out):
        assert main(["run", "--resume", str(out), "--quiet"]) == 2
        line = one_line(capsys.readouterr().err)
        assert f"is in use by pid {os.getpid()}" in line
        assert main([*ARGS, "--out", str(out), "--overwrite"]) == 2
        assert f"pid {os.getpid()}" in one_line(capsys.readouterr().err)
    assert rows(out) == rows(reference)  # nothing was touched


def test_two_runs_started_together_one_wins_and_its_results_are_whole(tmp_path, reference):
    out = tmp_path / "run"
    procs = [child(*ARGS, "--out", str(out)) for _ in range(2)]
    outcomes = sorted(finish(p) for p in procs)
    assert [code for code, _ in outcomes] == [0, 2], outcomes
    line = one_line(outcomes[1][1])
    assert "is in use by pid" in line or "already holds a run" in line
    assert_equals_reference(out, reference)


# ------------------------------------------------------------------------ overwrite


def test_overwrite_refuses_a_folder_that_holds_no_run(tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "models").mkdir(parents=True)
    (out / "state").mkdir()
    (out / "models" / "resnet.t0.c0.pt").write_bytes(b"user weights")
    (out / "state" / "notes.txt").write_text("user notes")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    for extra in ([], ["--overwrite"]):
        assert main([*ARGS, "--out", str(out), *extra]) == 2
        assert "no run" in one_line(capsys.readouterr().err)
    (out / "models" / "resnet.t0.c0.pt").unlink()
    (out / "models").rmdir()
    (out / "state").rename(out / "notes")  # no clash, but not empty: only --overwrite refuses
    assert main([*ARGS, "--out", str(out), "--overwrite"]) == 2
    assert "no run" in one_line(capsys.readouterr().err)
    assert (out / "notes" / "notes.txt").read_text() == "user notes"
    assert before  # the folder was not empty to begin with


def test_overwrite_removes_only_what_the_run_wrote(tmp_path, reference):
    out = copy_run(reference, tmp_path / "run")
    (out / "report.html").write_text("<html>old report</html>")
    (out / "analysis").mkdir()
    (out / "analysis" / "topk-overlap.csv").write_text("old analysis")
    (out / ".results.csv.x1y2.tmp").write_text("left by a kill")
    (out / "notes.txt").write_text("mine")
    (out / "models" / "my-own-model.bin").write_bytes(b"mine")
    args = [a for a in ARGS if a not in ("--keep-models",)]
    code, err = finish(child(*args, "--out", str(out), "--overwrite"))
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "models" / "my-own-model.bin").read_bytes() == b"mine"
    assert sorted(p.name for p in (out / "models").iterdir()) == ["my-own-model.bin"]
    assert not (out / "report.html").exists() and not (out / "analysis").exists()
    assert not list(out.rglob(".*.tmp"))
    assert "keep_models: false" in (out / "config.yaml").read_text()


# ------------------------------------------------------------------------ verified state


def _flip_tensor_bytes(path: Path, count: int = 64) -> None:
    """Flip ``count`` bytes in the middle of the largest tensor record of a torch zip file: the
    file still loads, with changed numbers."""
    with zipfile.ZipFile(path) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    header = info.header_offset
    name_len, extra_len = (
        int.from_bytes(data[header + 26 : header + 28], "little"),
        int.from_bytes(data[header + 28 : header + 30], "little"),
    )
    start = header + 30 + name_len + extra_len + info.file_size // 2 - count // 2
    for i in range(start, start + count):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    torch.load(path, weights_only=True)  # still loads: only a checksum can tell


def test_flipped_bytes_in_a_state_are_refused_by_name(tmp_path, reference, capsys):
    out = copy_run(reference, tmp_path / "run")
    path = state_path(out, "entropy", 0)
    _flip_tensor_bytes(path)
    assert main(["run", "--resume", str(out), "--quiet"]) == 2
    line = one_line(capsys.readouterr().err)
    assert str(path) in line and "fails its checksum" in line and "--resume" in line


def test_flipped_bytes_in_a_kept_model_are_refused_by_name(tmp_path, reference):
    out = copy_run(reference, tmp_path / "run")
    path = model_path(out, "random", 0, 1)
    load_model(path, strategy="random", trial=0, seed=1, cycle=1)
    _flip_tensor_bytes(path)
    with pytest.raises(ChecksumError, match="fails its checksum.*--keep-models"):
        load_model(path, strategy="random", trial=0, seed=1, cycle=1)


def test_an_edited_config_is_refused_on_resume_naming_the_changed_keys(tmp_path, reference, capsys):
    out = copy_run(reference, tmp_path / "run")
    config = yaml.safe_load((out / "config.yaml").read_text())
    config.update(epochs=2, lr=0.5)
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", "--resume", str(out), "--quiet"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "epochs: 1 -> 2" in line and "lr: 0.1 -> 0.5" in line
    # a strategy dropped from the file would drop its finished rows: refused too
    config.update(epochs=1, lr=0.1, strategies=["entropy"])
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", "--resume", str(out), "--quiet"]) == 2
    assert "random.t0.pt" in one_line(capsys.readouterr().err)
    assert rows(out) == rows(reference)
    # what may change on resume: where the data is and what computes
    config.update(strategies=list(STRATEGIES))
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", "--resume", str(out), "--quiet", "--device", "cpu"]) == 0
    assert rows(out) == rows(reference)


def test_resume_refuses_another_out(tmp_path, reference, capsys):
    out = copy_run(reference, tmp_path / "run")
    assert main(["run", "--resume", str(out), "--out", str(tmp_path / "other")]) == 2
    assert "drop --out" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "other").exists()


# ------------------------------------------------------------------------ non-finite


def test_a_diverging_learning_rate_stops_with_one_line(tmp_path, capsys):
    assert main([*ARGS, "--lr", "1e6", "--out", str(tmp_path / "run")]) == 2
    line = one_line(capsys.readouterr().err)
    assert re.search(r"strategy random, trial 0, cycle \d+, .*not finite", line), line


@pytest.mark.parametrize("lr", ["0", "-0.1", "inf", "nan"])
def test_non_positive_or_non_finite_learning_rates_are_refused_up_front(tmp_path, capsys, lr):
    assert main([*ARGS, "--lr", lr, "--out", str(tmp_path / "run")]) == 2
    assert "lr must be a number > 0" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_a_non_finite_loss_in_a_later_cycle_keeps_the_last_good_state(
    tmp_path, reference, monkeypatch, capsys
):
    real_fit = gradnorm_al.learner.fit

    def poisoned_fit(model, *args, **kwargs):
        if kwargs["desc"].endswith(" c1"):  # the second cycle of every trial
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
        return real_fit(model, *args, **kwargs)

    out = tmp_path / "run"
    monkeypatch.setattr(gradnorm_al.learner, "fit", poisoned_fit)
    assert main([*ARGS, "--out", str(out)]) == 2
    line = one_line(capsys.readouterr().err)
    assert "strategy random, trial 0, cycle 1, epoch 1: the training loss" in line
    state = load_state(state_path(out, "random", 0), strategy="random", trial=0, seed=1)
    assert state.next_cycle == 1  # the last good state, resumable
    monkeypatch.setattr(gradnorm_al.learner, "fit", real_fit)
    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    assert rows(out) == rows(reference)


class Diverged(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(64, 8)
        self.head = nn.Linear(8, 10)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.flatten(1)) * float("inf")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


@pytest.mark.parametrize("name", ["entropy", "margin", "core-set", "badge", "entropy-gradnorm"])
def test_strategies_refuse_non_finite_outputs(small_digits, name):
    ctx = make_context(Diverged(), small_digits.train_eval, np.arange(20, 60), np.arange(20))
    with pytest.raises(NonFiniteError, match="not finite|non-finite"):
        create_strategy(name).query(ctx, 5)


# ------------------------------------------------------------------------ the disk


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    path.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
        ).returncode
    ):
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_disk_is_one_line_and_the_run_resumes(tmp_path, reference):
    with tmpfs(tmp_path / "disk", "8m") as disk:
        out = disk / "run"
        filler = disk / "filler"
        free = shutil.disk_usage(disk).free
        filler.write_bytes(b"\0" * (free - 6 * 4096))  # room for config and a little more
        code, err = finish(child(*ARGS, "--out", str(out)))
        assert code == 2
        line = one_line(err)
        assert "cannot write" in line and "No space left on device" in line
        assert not list(out.rglob(".*.tmp"))
        filler.unlink()
        code, err = finish(child("run", "--resume", str(out), "--quiet"))
        assert code == 0, err
        assert_equals_reference(out, reference)


def test_a_read_only_folder_is_one_line_and_the_run_resumes(tmp_path, reference):
    with tmpfs(tmp_path / "disk", "4m") as disk:
        # a finished run: its resume rewrites the results and summary first thing (a run
        # killed mid-way is resumed by the tests above)
        out = copy_run(reference, disk / "run")
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        code, err = finish(child("run", "--resume", str(out), "--quiet"))
        assert code == 2 and "Read-only file system" in one_line(err)
        subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
        code, err = finish(child("run", "--resume", str(out), "--quiet"))
        assert code == 0, err
        assert_equals_reference(out, reference)


def test_files_follow_the_umask(tmp_path):
    out = tmp_path / "run"
    old = os.umask(0o027)
    try:
        assert main([*ARGS, "--out", str(out)]) == 0
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_file()}
    assert set(modes.values()) == {0o640}, modes
    assert LOCK_FILE in modes


# ------------------------------------------------------------------------ one behaviour


def test_egl_has_one_norm_from_the_cli_and_the_api():
    config = ExperimentConfig.from_dict(
        {"strategies": ["egl", "entropy-gradnorm"], "norm": "tensor-sum"}
    )
    assert (
        create_strategy("egl", **strategy_kwargs(config, "egl")).norm
        == create_strategy("egl").norm
        == "l2"
    )
    gradnorm = create_strategy("entropy-gradnorm", **strategy_kwargs(config, "entropy-gradnorm"))
    assert gradnorm.norm == "tensor-sum"


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--bogus"],
        ["report"],
        ["analyze", "nonsense"],
        ["run", "--epochs", "x"],
        ["demo", "--what"],
    ],
)
def test_every_usage_error_has_the_one_format(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    line = one_line(capsys.readouterr().err)
    assert "--help" in line


def test_a_selection_missing_from_a_finished_cycle_is_named(tmp_path, reference, capsys):
    out = copy_run(reference, tmp_path / "run")
    lines = (out / "selections.jsonl").read_text().splitlines(keepends=True)
    (out / "selections.jsonl").write_text("".join(lines[:1] + lines[2:]))  # random t0 c1 gone
    assert main(["analyze", "topk-overlap", str(out), "--quiet"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "selections.jsonl lacks the selection of random trial 0 cycle 1" in line
