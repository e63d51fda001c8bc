"""A labelling project loses nothing and never holds half a change: kill -9 at chosen moments of
import-labels, query and train (each in its own process, all started together), and two
commands on one project at once (the second is refused while the first holds the lock)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from project_data import CLASSES, make_images, write_csv

from gradnorm_al.cli import main
from gradnorm_al.errors import ProjectLockedError
from gradnorm_al.project import Project

SRC = str(Path(__file__).resolve().parents[1] / "src")

#: the CLI in a child process that kills itself with SIGKILL at a chosen moment:
#: "sql PATTERN N": as the Nth SQL statement starting with PATTERN begins (inside its transaction);
#: "committed - N": right after the Nth transaction commits;
#: "replace SUFFIX N": when a finished temporary file is about to be renamed onto *SUFFIX;
#: "hold FILE 0": training waits (holding the project's lock) until FILE exists.
#: "many JSON": one process per [moment, argv] of JSON, forked from this one once it has
#: imported everything (the imports take seconds), run together; prints their exit codes
#: (-9: killed) as the last line.
CHILD = textwrap.dedent(
    """
    import contextlib, json, os, signal, sys, time, traceback
    from gradnorm_al.cli import main
    from gradnorm_al.project import db

    def kill():
        os.kill(os.getpid(), signal.SIGKILL)

    def arm(mode, pattern, nth):
        seen = [0]
        if mode == "sql":
            connect = db.connect
            def traced(path):
                conn = connect(path)
                def trace(sql):
                    if sql.startswith(pattern):
                        seen[0] += 1
                        if seen[0] == nth:
                            kill()
                conn.set_trace_callback(trace)
                return conn
            db.connect = traced
        elif mode == "committed":
            transaction = db.transaction
            @contextlib.contextmanager
            def counted(conn):
                with transaction(conn) as c:
                    yield c
                seen[0] += 1
                if seen[0] == nth:
                    kill()
            db.transaction = counted
        elif mode == "replace":
            replace = os.replace
            def killing(src, dst, *args, **kwargs):
                if str(dst).endswith(pattern):
                    kill()
                return replace(src, dst, *args, **kwargs)
            os.replace = killing
        elif mode == "hold":
            import gradnorm_al.learner
            fit = gradnorm_al.learner.ActiveLearner.fit
            def held(self):
                print("training", flush=True)
                while not os.path.exists(pattern):
                    time.sleep(0.02)
                return fit(self)
            gradnorm_al.learner.ActiveLearner.fit = held

    def run(moment, argv):
        arm(*moment)
        sys.argv[1:] = argv  # the lock names the command as given
        return main(argv)

    if sys.argv[1] == "many":
        scenarios, pids = json.loads(sys.argv[2]), {}
        for k, (moment, argv) in enumerate(scenarios):
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    import torch
                    torch.set_num_threads(1)
                    code = run(moment, argv)
                except BaseException:
                    traceback.print_exc()
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            pids[pid] = k
        codes = [None] * len(scenarios)
        for _ in scenarios:
            pid, status = os.wait()
            killed = os.WIFSIGNALED(status)
            codes[pids[pid]] = -os.WTERMSIG(status) if killed else os.WEXITSTATUS(status)
        print(json.dumps(codes))
    else:
        sys.exit(run((sys.argv[1], sys.argv[2], int(sys.argv[3])), sys.argv[4:]))
    """
)


def child(moment: tuple[str, str, int], *argv: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, *map(str, moment), *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def children(scenarios: list[tuple[tuple[str, str, int], list[str]]]) -> list[int]:
    """Run each ``(moment, argv)`` in its own process, together; their exit codes."""
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, "many", json.dumps(scenarios)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A project with 12 labels and one trained round, and the true class of every path."""
    base = tmp_path_factory.mktemp("template")
    truth = make_images(base / "images")
    first = sorted(truth)[::3]
    with Project.create(
        base / "proj", base / "images", labels=[(p, truth[p]) for p in first], image_size=8
    ) as project:
        project.train(epochs=1)
    return base / "proj", truth


def copy_of(template: tuple[Path, dict[str, str]], dest: Path) -> Path:
    shutil.copytree(template[0], dest)
    return dest


def labels(proj: Path) -> dict[int, str | None]:
    with Project.open(proj) as project:
        assert project.integrity_problems() == []
        return {it.id: it.label for it in project.items()}


def answers_file(proj: Path, truth: dict[str, str], dest: Path) -> Path:
    with Project.open(proj) as project:
        free = [it for it in project.items() if it.label is None]
    return write_csv(dest, ["path", "label"], [(it.path, truth[it.path]) for it in free])


def test_kill_9_at_chosen_moments_leaves_a_consistent_project(tmp_path, template):
    truth = template[1]
    moments = {
        "import, mid-insert": ("sql", "INSERT INTO labels", 10),
        "import, just committed": ("committed", "-", 1),
        "query, files written, batch not recorded": ("sql", "INSERT INTO batch_items", 2),
        "train, model half written": ("replace", "round-002.pt", 1),
        "train, model written, round not recorded": ("sql", "INSERT INTO rounds", 1),
    }
    projects, scenarios = {}, []
    for n, (name, moment) in enumerate(moments.items()):
        proj = projects[name] = copy_of(template, tmp_path / f"p{n}")
        if name.startswith("import"):
            argv = [
                "import-labels",
                str(proj),
                str(answers_file(proj, truth, tmp_path / f"a{n}.csv")),
            ]
        elif name.startswith("query"):
            argv = ["query", str(proj), "--budget", "5", "--quiet"]
        else:
            argv = ["train", str(proj), "--epochs", "1", "--quiet"]
        scenarios.append((moment, argv))
    assert children(scenarios) == [-signal.SIGKILL] * len(moments)
    before = labels(template[0])

    # the import: none of its rows, or all of them
    assert labels(projects["import, mid-insert"]) == before
    after = labels(projects["import, just committed"])
    assert all(after[i] == before[i] for i in before if before[i] is not None)
    assert None not in after.values()
    # the query: its files were written, but no batch is recorded: the next query takes number 1
    proj = projects["query, files written, batch not recorded"]
    assert (proj / "batch-001.csv").is_file() and (proj / "batch-001.labelstudio.json").is_file()
    with Project.open(proj) as project:
        assert project.integrity_problems() == [] and project.batches() == []
        batch = project.query(3, "entropy")
    assert batch.number == 1 and len((proj / "batch-001.csv").read_text().splitlines()) == 4
    # the training: a temporary file or an unrecorded model file; one round recorded
    half = projects["train, model half written"]
    (leftover,) = (half / "models").glob(".round-002.pt.*.tmp")
    assert not (half / "models" / "round-002.pt").exists()
    unrecorded = projects["train, model written, round not recorded"]
    assert (unrecorded / "models" / "round-002.pt").is_file()
    for proj in (half, unrecorded):
        with Project.open(proj) as project:
            assert project.integrity_problems() == []
            assert [r.number for r in project.rounds()] == [1]
            rnd = project.train(epochs=1)  # takes the lock: the dead process's lock is gone
            assert rnd.number == 2 and [r.number for r in project.rounds()] == [1, 2]
    assert not leftover.exists()  # removed by the next command holding the lock


def test_two_commands_on_one_project_are_never_interleaved(tmp_path, template, capsys):
    proj = copy_of(template, tmp_path / "proj")
    answers = answers_file(proj, template[1], tmp_path / "answers.csv")
    go = tmp_path / "go"
    trainer = child(("hold", str(go), 0), "train", str(proj), "--epochs", "1", "--quiet")
    try:
        assert trainer.stdout.readline() == "training\n"  # holds the lock, mid-command
        before = labels(proj)
        assert main(["import-labels", str(proj), str(answers)]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith(f"gradnorm-al: error: project {proj} is in use by pid {trainer.pid}")
        assert f"(gradnorm-al train {proj} --epochs 1 --quiet), since " in line
        assert line.endswith("; wait for it to finish, then run the command again")
        with Project.open(proj) as project, pytest.raises(ProjectLockedError):
            project.query(2, "entropy")
        assert labels(proj) == before
        assert main(["status", str(proj)]) == 0  # reading needs no lock
        assert "rounds: none yet" not in capsys.readouterr().out
    finally:
        go.touch()
        _, err = trainer.communicate(timeout=300)
    assert trainer.returncode == 0, err
    assert main(["import-labels", str(proj), str(answers)]) == 0
    with Project.open(proj) as project:
        assert [r.number for r in project.rounds()] == [1, 2]
        assert sorted({it.label for it in project.items()}) == CLASSES


def test_the_database_is_written_in_wal_mode_one_transaction_per_change(tmp_path, template):
    proj = copy_of(template, tmp_path / "proj")
    conn = sqlite3.connect(proj / "project.db")
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    conn.close()
    statements: list[str] = []
    with Project.open(proj) as project:
        free = [it for it in project.items() if it.label is None][:3]
        project._conn.set_trace_callback(statements.append)
        project.import_labels([(it.id, template[1][it.path]) for it in free], source="t")
    writes = [s.split()[0] for s in statements if not s.startswith("SELECT")]
    assert writes[0] == "BEGIN" and statements[0] == "BEGIN IMMEDIATE"
    assert writes[-1] == "COMMIT" and writes.count("BEGIN") == writes.count("COMMIT") == 1
