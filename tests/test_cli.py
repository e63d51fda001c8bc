"""The ``gradnorm-al`` command line: ``run`` end to end, config files, determinism, every user
error as exit code 2 with one line on stderr, ``list`` and ``demo --help``.

Runs are tiny (digits, 1 epoch, a few cycles), so the whole file takes well under a minute on two
CPU cores. Most tests call :func:`gradnorm_al.cli.main` in process; a few start a real
``python -m gradnorm_al.cli`` to check the exit status and stderr that a shell would see.
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from gradnorm_al import DATASETS, MODELS, SAMPLERS, STRATEGIES
from gradnorm_al.cli import main
from gradnorm_al.experiment.config import ExperimentConfig
from gradnorm_al.experiment.lock import LOCK_FILE

DIGITS_POOL = 1437  # digits: 1,797 images, stratified 20% test split -> 1,437 in the pool
HEADER = (
    "strategy,trial,cycle,num_labeled,labeled_fraction,test_accuracy,train_accuracy,"
    "train_seconds,select_seconds,seed"
)
RUN_FILES = ("results.csv", "selections.jsonl", "summary.md", "curves.png", "config.yaml")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# a tiny schedule: 1 epoch, 1 trial, 2 cycles (one selection)
TINY = [
    "--dataset", "digits", "--epochs", "1", "--trials", "1", "--cycles", "2",
    "--batch-size", "64", "--quiet",
]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# helpers


@dataclass
class Outcome:
    code: int
    out: str
    err: str


def call(capsys: pytest.CaptureFixture[str], *argv: str) -> Outcome:
    """``main(argv)`` with its stdout and stderr."""
    capsys.readouterr()  # drop anything printed before
    code = main(list(argv))
    out, err = capsys.readouterr()
    return Outcome(code, out, err)


def call_quietly(*argv: str) -> Outcome:
    """``main(argv)`` capturing output without capsys (usable in module-scoped fixtures)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return Outcome(code, out.getvalue(), err.getvalue())


def one_error_line(err: str) -> str:
    """The single line of an error report on stderr (fails unless there is exactly one)."""
    assert err.endswith("\n"), repr(err)
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    assert "Traceback" not in err
    return lines[0]


def expect_usage_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run ``main(argv)``, check it is refused with status 2 and one line; return that line."""
    result = call(capsys, *argv)
    assert result.code == 2, (result.code, result.out, result.err)
    assert result.out == ""
    line = one_error_line(result.err)
    assert line.startswith("gradnorm-al: error: "), line
    return line


def read_csv(path: Path) -> tuple[str, list[dict[str, str]]]:
    text = path.read_text(encoding="utf-8")
    header = text.splitlines()[0]
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return header, rows


def read_selections(path: Path) -> list[dict]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def column(rows: list[dict[str, str]], name: str) -> list[str]:
    return [row[name] for row in rows]


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of a uint8 array: 0x0000, type 0x08, ndim, big-endian int32 dims, data."""
    assert array.dtype == np.uint8
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    return header + array.tobytes()


def write_mnist(folder: Path, train_labels: np.ndarray, test_labels: np.ndarray) -> None:
    """The four standard MNIST IDX files in ``folder``: random 28x28 images, the given labels."""
    gen = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, labels in (("train", train_labels), ("t10k", test_labels)):
        images = gen.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
        data = idx_bytes(images)
        assert data[:4] == (0x00000803).to_bytes(4, "big")
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(data)
        data = idx_bytes(np.asarray(labels, dtype=np.uint8))
        assert data[:4] == (0x00000801).to_bytes(4, "big")
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(data)


def run_subprocess(cwd: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gradnorm_al.cli", *argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing a test does (a default --out, say) lands in the repository."""
    monkeypatch.chdir(tmp_path)


# ---------------------------------------------------------------------------------------------
# 1. run end to end: random vs entropy-gradnorm, 2 trials x 3 cycles

SEED = 3
TRIALS, CYCLES = 2, 3
INITIAL, BUDGET = 0.10, 0.05
K = round(BUDGET * DIGITS_POOL)  # 72 per selection
START = round(INITIAL * DIGITS_POOL)  # 144 initially labelled
BOTH = ["random", "entropy-gradnorm"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Outcome, Path]:
    out = tmp_path_factory.mktemp("cli") / "run"
    result = call_quietly(
        "run",
        "--dataset", "digits",
        "--strategy", "random",
        "--strategy", "entropy-gradnorm",
        "--epochs", "1",
        "--trials", str(TRIALS),
        "--cycles", str(CYCLES),
        "--initial-fraction", str(INITIAL),
        "--budget-fraction", str(BUDGET),
        "--batch-size", "64",
        "--seed", str(SEED),
        "--quiet",
        "--out", str(out),
    )  # fmt: skip
    return result, out


def test_run_exit_status_and_files(full_run: tuple[Outcome, Path]) -> None:
    result, out = full_run
    assert result.code == 0, result.err
    assert result.err == ""  # --quiet: no progress bars, no log lines
    assert sorted(p.name for p in out.iterdir()) == sorted([*RUN_FILES, "state", LOCK_FILE])
    # one checkpoint per strategy x trial
    assert len(list((out / "state").glob("*.pt"))) == 2 * TRIALS


def test_run_results_csv(full_run: tuple[Outcome, Path]) -> None:
    _, out = full_run
    header, rows = read_csv(out / "results.csv")
    assert header == HEADER
    keys = [(r["strategy"], int(r["trial"]), int(r["cycle"])) for r in rows]
    assert len(keys) == len(BOTH) * TRIALS * CYCLES
    assert set(keys) == set(itertools.product(BOTH, range(TRIALS), range(CYCLES)))
    for row in rows:
        trial, cycle = int(row["trial"]), int(row["cycle"])
        assert int(row["seed"]) == SEED + trial
        num_labeled = int(row["num_labeled"])
        assert num_labeled == START + cycle * K
        assert float(row["labeled_fraction"]) == pytest.approx(num_labeled / DIGITS_POOL)
        assert 0.0 <= float(row["test_accuracy"]) <= 1.0
        assert 0.0 <= float(row["train_accuracy"]) <= 1.0
        assert float(row["train_seconds"]) > 0.0
        if cycle == CYCLES - 1:
            assert row["select_seconds"] == ""  # no selection after the last training
        else:
            assert float(row["select_seconds"]) >= 0.0
    # all strategies of a trial start from the same pool and the same initial model, so their
    # first training (cycle 0) is identical
    for trial in range(TRIALS):
        first = {
            r["strategy"]: (r["test_accuracy"], r["train_accuracy"])
            for r in rows
            if int(r["trial"]) == trial and int(r["cycle"]) == 0
        }
        assert first["random"] == first["entropy-gradnorm"]


def test_run_selections_jsonl(full_run: tuple[Outcome, Path]) -> None:
    _, out = full_run
    selections = read_selections(out / "selections.jsonl")
    base = {"strategy", "trial", "cycle", "indices"}
    for s in selections:  # the scores of the selected samples where the strategy has scores
        assert set(s) == (base if s["strategy"] == "random" else base | {"scores"})
        if "scores" in s:
            assert len(s["scores"]) == len(s["indices"]) and s["scores"] == sorted(
                s["scores"], reverse=True
            )
    keys = [(s["strategy"], s["trial"], s["cycle"]) for s in selections]
    assert len(keys) == len(BOTH) * TRIALS * (CYCLES - 1)  # no selection in the last cycle
    assert set(keys) == set(itertools.product(BOTH, range(TRIALS), range(CYCLES - 1)))
    for s in selections:
        indices = s["indices"]
        assert len(indices) == K
        assert len(set(indices)) == K
        assert all(isinstance(i, int) and 0 <= i < DIGITS_POOL for i in indices)
    for strategy, trial in itertools.product(BOTH, range(TRIALS)):
        chosen = [
            set(s["indices"])
            for s in selections
            if (s["strategy"], s["trial"]) == (strategy, trial)
        ]
        assert len(chosen) == CYCLES - 1
        union = set().union(*chosen)
        assert len(union) == K * (CYCLES - 1), f"{strategy} t{trial} relabelled a sample"
    # trials use different seeds: the random strategy picks different samples in each
    random_first = [
        set(s["indices"]) for s in selections if s["strategy"] == "random" and s["cycle"] == 0
    ]
    assert random_first[0] != random_first[1]


def test_run_table_summary_plot_and_config(full_run: tuple[Outcome, Path]) -> None:
    result, out = full_run
    _, rows = read_csv(out / "results.csv")
    printed = result.out.splitlines()
    # the table: header, separator, one line per strategy; a blank line, the paired statistics;
    # then the "wrote ..." line
    lines = printed[: printed.index("")]
    assert len(lines) == 2 + len(BOTH), result.out
    assert lines[0] == "| strategy | 10% | 15% | 20% | AUC |"
    assert lines[1].startswith("|---|")
    assert printed[-1].startswith(f"wrote {out}/ ") and "results.csv" in printed[-1]
    auc = {}
    for line, strategy in zip(lines[2:], BOTH):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == strategy
        assert len(cells) == 1 + CYCLES + 1
        acc = np.array(
            [
                [
                    float(r["test_accuracy"])
                    for r in rows
                    if r["strategy"] == strategy and int(r["trial"]) == trial
                ]
                for trial in range(TRIALS)
            ]
        )  # [trials, cycles], rows in cycle order
        assert acc.shape == (TRIALS, CYCLES)
        for cycle in range(CYCLES):
            expected = f"{100 * acc[:, cycle].mean():.1f} ± {100 * acc[:, cycle].std(ddof=1):.1f}"
            assert cells[1 + cycle] == expected
        auc[strategy] = (acc[:, 0] + 2 * acc[:, 1] + acc[:, 2]) / 4  # equal fraction steps
    # paired statistics: gradnorm against random (and random against its best other)
    diff = 100 * (auc["entropy-gradnorm"] - auc["random"])
    pairs = {line.split("**")[1]: line for line in printed if line.startswith("- **")}
    assert set(pairs) == set(BOTH)
    assert f"vs random {diff.mean():+.2f} [" in pairs["entropy-gradnorm"]
    assert f"wins {int((diff > 0).sum())}/{TRIALS}: " in pairs["entropy-gradnorm"]
    assert f"vs best other (entropy-gradnorm) {-diff.mean():+.2f} [" in pairs["random"]
    table = "\n".join(printed[:-1]) + "\n"
    summary = (out / "summary.md").read_text(encoding="utf-8")
    assert "digits" in summary
    assert table in summary

    png = (out / "curves.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE)
    assert png[12:16] == b"IHDR"
    width, height = struct.unpack(">II", png[16:24])
    assert width > 100 and height > 100

    config = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    assert isinstance(config, dict)
    expected = {
        "dataset": "digits",
        "strategies": BOTH,
        "epochs": 1,
        "trials": TRIALS,
        "cycles": CYCLES,
        "initial_fraction": INITIAL,
        "budget_fraction": BUDGET,
        "batch_size": 64,
        "seed": SEED,
        "device": "cpu",
    }
    assert {k: config[k] for k in expected} == expected
    assert not {"out", "quiet", "overwrite", "config", "command"} & set(config)
    # the written config is a valid --config file describing the same experiment
    assert ExperimentConfig.from_yaml(out / "config.yaml").to_dict() == config


# ---------------------------------------------------------------------------------------------
# 2. --config file, command line overriding it


def test_config_file_with_command_line_override(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config_file = tmp_path / "exp.yaml"
    config_file.write_text(
        "dataset: digits\n"
        "strategy: random\n"  # the singular key is accepted
        "epochs: 1\n"
        "cycles: 3\n"
        "trials: 1\n"
        "batch-size: 64\n"  # as are dashes
        "seed: 11\n"
        "budget_fraction: 0.04\n",
        encoding="utf-8",
    )
    out = tmp_path / "run"
    result = call(
        capsys, "run", "--config", str(config_file), "--cycles", "2", "--quiet", "--out", str(out)
    )
    assert result.code == 0, result.err
    _, rows = read_csv(out / "results.csv")
    assert [int(r["cycle"]) for r in rows] == [0, 1]  # the command line's 2, not the file's 3
    assert set(column(rows, "strategy")) == {"random"}  # from the file
    assert set(column(rows, "seed")) == {"11"}  # from the file
    k = round(0.04 * DIGITS_POOL)
    assert int(rows[1]["num_labeled"]) - int(rows[0]["num_labeled"]) == k
    (selection,) = read_selections(out / "selections.jsonl")
    assert len(selection["indices"]) == k

    written = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    assert written["cycles"] == 2
    assert written["epochs"] == 1
    assert written["seed"] == 11
    assert written["strategies"] == ["random"]
    assert written["batch_size"] == 64
    assert written["budget_fraction"] == 0.04
    assert written["trials"] == 1


def test_command_line_strategies_replace_those_of_the_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config_file = tmp_path / "exp.yaml"
    config_file.write_text("strategies: [random, entropy-gradnorm]\n", encoding="utf-8")
    out = tmp_path / "run"
    result = call(
        capsys, "run", "--config", str(config_file), *TINY, "--cycles", "1",
        "--strategy", "random", "--out", str(out),
    )  # fmt: skip
    assert result.code == 0, result.err
    assert yaml.safe_load((out / "config.yaml").read_text())["strategies"] == ["random"]
    _, rows = read_csv(out / "results.csv")
    assert column(rows, "strategy") == ["random"]


# ---------------------------------------------------------------------------------------------
# 3. determinism


def test_same_seed_same_results_other_seed_other_selections(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    args = [
        "run", *TINY, "--cycles", "3", "--strategy", "random", "--strategy", "entropy-gradnorm",
        "--subset-size", "150",
    ]  # fmt: skip
    runs = {}
    for name, seed in (("a", "5"), ("b", "5"), ("c", "6")):
        result = call(capsys, *args, "--seed", seed, "--out", str(tmp_path / name))
        assert result.code == 0, result.err
        runs[name] = (read_csv(tmp_path / name / "results.csv")[1], tmp_path / name)

    rows_a, dir_a = runs["a"]
    rows_b, dir_b = runs["b"]
    rows_c, dir_c = runs["c"]
    for name in ("strategy", "trial", "cycle", "num_labeled", "test_accuracy", "train_accuracy"):
        assert column(rows_a, name) == column(rows_b, name)
    sel_a = (dir_a / "selections.jsonl").read_bytes()
    assert sel_a == (dir_b / "selections.jsonl").read_bytes()
    assert len(read_selections(dir_a / "selections.jsonl")) == 2 * 2

    assert set(column(rows_c, "seed")) == {"6"}
    selections_a = read_selections(dir_a / "selections.jsonl")
    selections_c = read_selections(dir_c / "selections.jsonl")
    assert [(s["strategy"], s["cycle"]) for s in selections_a] == [
        (s["strategy"], s["cycle"]) for s in selections_c
    ]
    for sa, sc in zip(selections_a, selections_c):
        assert set(sa["indices"]) != set(sc["indices"]), (sa["strategy"], sa["cycle"])


# ---------------------------------------------------------------------------------------------
# 4. bad input: exit status 2, one line on stderr naming the problem, nothing written


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--dataset", "nope"], ["unknown dataset 'nope'", "digits", "mnist", "cifar10"]),
        (
            ["--strategy", "nope"],
            ["unknown strategy 'nope'", "random", "entropy-gradnorm", "expected-gradnorm"],
        ),
        (["--model", "nope"], ["unknown model 'nope'", "smallcnn", "resnet18-cifar"]),
        (
            ["--initial-fraction", "0.9", "--budget-fraction", "0.2", "--cycles", "3"],
            [f"budget {round(0.2 * DIGITS_POOL)}", "larger than the unlabelled pool"],
        ),
        (["--initial-fraction=0"], ["initial-fraction must be a number in (0, 1]", "got 0.0"]),
        (["--initial-fraction=1.5"], ["initial-fraction must be a number in (0, 1]", "got 1.5"]),
        (["--initial-fraction=-0.1"], ["initial-fraction must be a number in (0, 1]", "got -0.1"]),
        (["--budget-fraction=0"], ["budget-fraction must be a number in (0, 1]", "got 0.0"]),
        (["--budget-fraction=1.5"], ["budget-fraction must be a number in (0, 1]", "got 1.5"]),
        (["--budget-fraction=-0.1"], ["budget-fraction must be a number in (0, 1]", "got -0.1"]),
        (["--cycles", "0"], ["cycles must be an integer >= 1", "got 0"]),
        (["--epochs", "0"], ["epochs must be an integer >= 1", "got 0"]),
        (["--seed=-1"], ["seed must be an integer >= 0, got -1"]),
        (["--strategy", "random", "--strategy", "random"], ["listed twice"]),
        (["--device", "banana"], ["unknown device 'banana'"]),
        (["--subset-size", "10"], ["subset-size 10 is smaller than the budget"]),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) and v and v[0].startswith("-") else None,
)
def test_bad_option_values(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, extra: list[str], expected: list[str]
) -> None:
    out = tmp_path / "run"
    line = expect_usage_error(capsys, "run", *TINY, *extra, "--out", str(out))
    for text in expected:
        assert text in line
    assert not out.exists()  # refused before anything is written


def test_missing_data_says_where_it_looked(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "run"
    line = expect_usage_error(
        capsys, "run", *TINY, "--dataset", "mnist", "--data-root", str(empty), "--out", str(out)
    )
    assert "mnist" in line
    assert "not found" in line
    assert f"looked in: {empty}" in line
    assert "train-images-idx3-ubyte" in line
    assert not out.exists()


def test_mnist_without_data_root(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    line = expect_usage_error(
        capsys, "run", *TINY, "--dataset", "mnist", "--out", str(tmp_path / "run")
    )
    assert "no --data-root given" in line


def test_labels_out_of_range(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    root = tmp_path / "mnist-files"
    train_labels = np.arange(40) % 10
    train_labels[7] = 12
    write_mnist(root, train_labels, np.arange(20) % 10)
    out = tmp_path / "run"
    line = expect_usage_error(
        capsys, "run", *TINY, "--dataset", "mnist", "--data-root", str(root), "--out", str(out)
    )
    assert "training labels" in line
    assert "label 12 is out of range [0, 10)" in line
    assert not out.exists()


def test_mnist_idx_files_run(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """The same kind of files with valid labels are read and run (so the test above fails on the
    label, not on the file format)."""
    root = tmp_path / "mnist-files"
    write_mnist(root, np.arange(100) % 10, np.arange(30) % 10)
    out = tmp_path / "run"
    result = call(
        capsys, "run", *TINY, "--dataset", "mnist", "--data-root", str(root),
        "--strategy", "random", "--initial-fraction", "0.2", "--budget-fraction", "0.1",
        "--out", str(out),
    )  # fmt: skip
    assert result.code == 0, result.err
    _, rows = read_csv(out / "results.csv")
    assert column(rows, "num_labeled") == ["20", "30"]
    assert [float(x) for x in column(rows, "labeled_fraction")] == [0.2, 0.3]


def test_output_folder_holding_a_run_needs_overwrite(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "run"
    args = ["run", *TINY, "--cycles", "1", "--strategy", "random", "--out", str(out)]
    assert call(capsys, *args, "--seed", "1").code == 0
    before = {name: (out / name).read_bytes() for name in RUN_FILES}

    line = expect_usage_error(capsys, *args, "--seed", "2")
    assert str(out) in line
    assert "already holds a run" in line
    assert "--overwrite" in line
    assert {name: (out / name).read_bytes() for name in RUN_FILES} == before  # untouched

    result = call(capsys, *args, "--seed", "2", "--overwrite")
    assert result.code == 0, result.err
    assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == 2
    _, rows = read_csv(out / "results.csv")
    assert column(rows, "seed") == ["2"]


def test_output_folder_with_other_files_is_used(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    result = call(capsys, "run", *TINY, "--cycles", "1", "--strategy", "random", "--out", str(out))
    assert result.code == 0, result.err
    assert (out / "notes.txt").read_text() == "mine\n"
    assert (out / "results.csv").is_file()


def test_output_path_that_is_a_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    target = tmp_path / "afile"
    target.write_text("x")
    line = expect_usage_error(capsys, "run", *TINY, "--strategy", "random", "--out", str(target))
    assert f"output path {target} exists and is not a folder" in line
    assert target.read_text() == "x"


def test_output_path_below_a_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    target = tmp_path / "afile"
    target.write_text("x")
    line = expect_usage_error(
        capsys, "run", *TINY, "--strategy", "random", "--out", str(target / "sub")
    )
    assert str(target / "sub") in line and "cannot use output folder" in line


def test_strategies_given_as_one_string_in_yaml(tmp_path: Path) -> None:
    from gradnorm_al.experiment.config import ExperimentConfig

    config_file = tmp_path / "exp.yaml"
    config_file.write_text("strategies: random\n", encoding="utf-8")
    assert ExperimentConfig.from_yaml(config_file).strategies == ["random"]


def test_config_path_that_is_a_folder(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    line = expect_usage_error(capsys, "run", "--config", str(tmp_path), *TINY)
    assert "is not a file" in line


def test_unknown_option_in_config_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config_file = tmp_path / "exp.yaml"
    config_file.write_text("epochs: 1\nepoch: 2\n", encoding="utf-8")
    line = expect_usage_error(
        capsys, "run", "--config", str(config_file), *TINY, "--out", str(tmp_path / "run")
    )
    assert "unknown option 'epoch'" in line
    assert "epochs" in line  # the known options are listed
    assert not (tmp_path / "run").exists()


def test_config_file_that_does_not_exist(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    missing = tmp_path / "nope.yaml"
    line = expect_usage_error(capsys, "run", "--config", str(missing), *TINY)
    assert f"config file {missing} does not exist" in line


def test_config_file_with_bad_yaml(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config_file = tmp_path / "exp.yaml"
    config_file.write_text("epochs: [1\ncycles: 2\n", encoding="utf-8")
    line = expect_usage_error(capsys, "run", "--config", str(config_file), *TINY)
    # the bracket opened on line 1 is not closed: the line, what is wrong and the fix
    assert line.startswith(f"gradnorm-al: error: {config_file}:1: not valid YAML (")
    assert line.endswith("; correct the YAML syntax there")


def test_config_file_not_a_mapping(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config_file = tmp_path / "exp.yaml"
    config_file.write_text("- epochs\n- 1\n", encoding="utf-8")
    line = expect_usage_error(capsys, "run", "--config", str(config_file), *TINY)
    assert "must hold a mapping" in line


def test_config_file_value_of_wrong_type(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config_file = tmp_path / "exp.yaml"
    config_file.write_text("epochs: many\n", encoding="utf-8")
    line = expect_usage_error(capsys, "run", "--config", str(config_file), "--quiet")
    assert "epochs must be an integer >= 1, got 'many'" in line


def test_non_numeric_epochs(capsys: pytest.CaptureFixture[str]) -> None:
    # argparse errors leave main() through SystemExit, still as one line and status 2
    with pytest.raises(SystemExit) as exc:
        main(["run", "--epochs", "abc", "--quiet"])
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    line = one_error_line(err)
    assert line.startswith("gradnorm-al: error: argument --epochs")
    assert "'abc'" in line


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["run", "--no-such-option"],
        ["run", "--lr", "fast"],
        ["run", "--norm", "l3"],
    ],
    ids=["no-command", "unknown-command", "unknown-option", "bad-float", "bad-choice"],
)
def test_argparse_errors_are_one_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "error:" in one_error_line(err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_device_without_cuda(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "run"
    line = expect_usage_error(capsys, "run", *TINY, "--device", "cuda", "--out", str(out))
    assert "CUDA is not available" in line
    assert "--device cpu" in line
    assert not out.exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--dataset", "nope", "--quiet", "--out", "run"],
        ["run", "--epochs", "abc", "--quiet"],
    ],
    ids=["unknown-dataset", "non-numeric-epochs"],
)
def test_subprocess_usage_error(tmp_path: Path, argv: list[str]) -> None:
    proc = run_subprocess(tmp_path, *argv)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    line = one_error_line(proc.stderr)
    assert "error:" in line
    assert ("nope" in line) if "nope" in argv else ("--epochs" in line)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# 5. list, 6. demo --help


def test_list(capsys: pytest.CaptureFixture[str]) -> None:
    result = call(capsys, "list")
    assert result.code == 0
    assert result.err == ""
    lines = result.out.splitlines()
    assert [line.split(":")[0] for line in lines[:4]] == [
        "datasets",
        "models",
        "strategies",
        "samplers",
    ]
    assert "SCORER@SAMPLER" in lines[4]
    listed = {line.split(": ")[0]: line.split(": ")[1].split(", ") for line in lines[:4]}
    assert listed["samplers"] == SAMPLERS.names()
    assert listed["datasets"] == DATASETS.names()
    assert listed["models"] == MODELS.names()
    assert listed["strategies"] == STRATEGIES.names()
    assert {"digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "svhn"} <= set(
        listed["datasets"]
    )
    assert {"smallcnn", "resnet18-cifar"} <= set(listed["models"])
    assert {"random", "entropy-gradnorm", "expected-gradnorm"} <= set(listed["strategies"])


@pytest.mark.parametrize("how", ["console script", "python -m gradnorm_al"])
def test_list_through_a_shell_command(tmp_path: Path, how: str) -> None:
    command = [sys.executable, "-m", "gradnorm_al"]
    if how == "console script":
        script = Path(sys.executable).parent / "gradnorm-al"
        if not script.is_file():
            pytest.skip("the gradnorm-al console script is not installed next to this Python")
        command = [str(script)]
    proc = subprocess.run(
        [*command, "list"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].startswith("datasets: ")
    assert "digits" in proc.stdout


def test_demo_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.startswith("usage: gradnorm-al demo")
    assert "--out" in out and "--overwrite" in out and "--quiet" in out
    assert not Path("gradnorm-al-demo").exists()  # help runs nothing


def test_run_help_lists_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["run", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in (
        "--config",
        "--dataset",
        "--strategy",
        "--cycles",
        "--budget-fraction",
        "--initial-fraction",
        "--epochs",
        "--seed",
        "--device",
        "--data-root",
    ):
        assert option in out
