"""Labelling projects: init -> train -> query -> people answer -> import, on a generated folder
of tiny images whose true classes play the annotators. Kills and concurrent commands are in
tests/test_project_reliability.py."""

from __future__ import annotations

import csv
import json
import re
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from project_data import CLASSES, labelstudio_export, make_images, write_csv, write_json
from torch import nn

from gradnorm_al import ActiveLearner, ClassificationTask, HumanOracle
from gradnorm_al.cli import main
from gradnorm_al.errors import (
    ConfigError,
    DataError,
    LabelImportError,
    OracleTimeoutError,
    ProjectError,
)
from gradnorm_al.project import Project, read_labelstudio_export
from gradnorm_al.project import db as project_db
from gradnorm_al.project.images import image_dataset
from gradnorm_al.project.networks import TorchvisionClassifier, build_model
from gradnorm_al.train import predict

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("images")
    return root, make_images(root)


@pytest.fixture
def project(tmp_path: Path, images: tuple[Path, dict[str, str]]) -> Project:
    """A project whose first 4 items of each class are labelled (no held-out split)."""
    root, truth = images
    first = [p for c in CLASSES for p in sorted(p for p in truth if truth[p] == c)[:4]]
    proj = Project.create(
        tmp_path / "proj", root, labels=[(p, truth[p]) for p in first], image_size=8
    )
    yield proj
    proj.close()


def dump(project: Project) -> list[str]:
    """Every row of the database, as SQL (what "unchanged" is checked against)."""
    conn = sqlite3.connect(project.path / "project.db")
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gradnorm-al: error: "), err
    return err[0]


# ---------------------------------------------------------------------------------- workflow


def test_the_whole_workflow_through_the_command_line(tmp_path, images, capsys):
    root, truth = images
    paths = sorted(truth)
    first = paths[::3]  # 12 labels, 4 per class
    labels = write_csv(tmp_path / "first.csv", ["path", "label"], [(p, truth[p]) for p in first])
    proj = tmp_path / "proj"
    assert (
        main(
            ["init", str(proj), "--images", str(root), "--labels", str(labels)]
            + ["--image-size", "8", "--val-fraction", "0.25", "--quiet"]
        )
        == 0
    )
    assert "36 images" in capsys.readouterr().out
    with Project.open(proj) as project:
        assert project.classes == CLASSES  # from the labels file, sorted
        items = project.items()
    assert [it.path for it in items] == paths and [it.id for it in items] == list(range(1, 37))
    assert all(it.abspath == root / it.path for it in items)
    by_id = {it.id: it for it in items}
    held = [it for it in items if it.held_out]
    assert sorted(truth[it.path] for it in held) == CLASSES  # one of each class's 4 labels

    assert main(["train", str(proj), "--epochs", "2", "--quiet"]) == 0
    assert (
        main(["query", str(proj), "--budget", "5", "--strategy", "entropy-gradnorm"] + ["--quiet"])
        == 0
    )
    with open(proj / "batch-001.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["id", "path", "score"] and len(rows) == 6
    scores = [float(r[2]) for r in rows[1:]]
    assert scores == sorted(scores, reverse=True)
    batch1 = [int(r[0]) for r in rows[1:]]
    assert [by_id[i].path for i in batch1] == [r[1] for r in rows[1:]]
    assert all(by_id[i].label is None and not by_id[i].held_out for i in batch1)
    tasks = json.loads((proj / "batch-001.labelstudio.json").read_text())
    for task, row in zip(tasks, rows[1:]):
        (prediction,) = task["predictions"]
        assert task["data"] == {"image": str(root / row[1]), "item_id": int(row[0])}
        assert prediction["model_version"] == "round-001"
        assert prediction["score"] == float(row[2])
        (result,) = prediction["result"]
        assert set(result) == {"from_name", "to_name", "type", "value"}
        assert (result["from_name"], result["to_name"], result["type"]) == (
            "label",
            "image",
            "choices",
        )
        assert result["value"]["choices"][0] in CLASSES

    answers = write_csv(
        tmp_path / "answers.csv", ["id", "label"], [(i, truth[by_id[i].path]) for i in batch1]
    )
    capsys.readouterr()
    assert main(["import-labels", str(proj), str(answers)]) == 0
    assert "5 added, 0 relabelled, 0 unchanged; closed batch(es) 1" in capsys.readouterr().out
    assert main(["train", str(proj), "--epochs", "2", "--quiet"]) == 0
    assert main(["query", str(proj), "--budget", "4", "--strategy", "entropy", "--quiet"]) == 0
    tasks = json.loads((proj / "batch-002.labelstudio.json").read_text())
    batch2 = [t["data"]["item_id"] for t in tasks]
    assert not set(batch2) & set(batch1)
    right = [truth[by_id[i].path] for i in batch2]
    wrong = next(c for c in CLASSES if c != right[0])
    export = labelstudio_export(
        tasks,
        [
            [wrong, right[0]],  # corrected by a later annotation: the later one counts
            [right[1], None],  # answered, then skipped by someone else: the answer counts
            [right[2]],
            [None],  # only skipped: not answered
        ],
    )
    assert main(["import-labels", str(proj), str(write_json(tmp_path / "ls.json", export))]) == 0
    assert "3 added" in capsys.readouterr().out

    assert main(["status", str(proj), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    labelled = set(first) | {by_id[i].path for i in batch1 + batch2[:3]}
    for c in CLASSES:
        n = status["per_class"][c]
        assert n["labelled"] + n["held_out"] == sum(truth[p] == c for p in labelled)
        assert n["held_out"] == 1
    assert (status["labelled"], status["held_out"], status["unlabelled"]) == (17, 3, 16)
    assert [r["number"] for r in status["rounds"]] == [1, 2]
    assert [r["num_labelled"] for r in status["rounds"]] == [9, 14]
    assert status["pending_batches"] == [
        {"number": 2, "strategy": "entropy", "round": 2, "items": 4, "answered": 3}
    ]
    assert status["closed_batches"] == 1
    with Project.open(proj) as project:  # every label is the annotators' answer
        assert all(it.label == truth[it.path] for it in project.items() if it.label)

    # the held-out accuracy is the last model's, recomputed here from its file
    payload = torch.load(proj / "models" / "round-002.pt", weights_only=True)
    net = build_model("smallcnn", 3)
    net.load_state_dict(payload["model"])
    data = image_dataset(
        root, [it.path for it in held], [CLASSES.index(truth[it.path]) for it in held], 8
    )
    pred, target = predict(net, data, device=torch.device("cpu"))
    assert status["heldout_accuracy"] == pytest.approx(float((pred == target).mean()))
    assert status["rounds"][-1]["heldout_accuracy"] == status["heldout_accuracy"]
    assert main(["status", str(proj)]) == 0
    text = capsys.readouterr().out
    assert "batch 2 (entropy, round 2): 3/4 answered" in text
    assert f"held-out accuracy of the last model: {status['heldout_accuracy']:.3f}" in text


# ---------------------------------------------------------------------------------- imports


def _refused(project: Project, rows, relabel: bool = False) -> LabelImportError:
    before = dump(project)
    with pytest.raises(LabelImportError) as caught:
        project.import_labels(rows, source="answers.csv", relabel=relabel)
    assert dump(project) == before  # nothing applied, not even the valid rows
    return caught.value


def _unlabelled(project: Project) -> list:
    return [it for it in project.items() if it.label is None]


def test_an_unknown_id_or_path_refuses_the_whole_import(project, images):
    free = _unlabelled(project)
    err = _refused(project, [(free[0].id, "dark"), (999, "dark"), ("no/such.png", "dark")])
    assert err.problems == [
        "row 2: 999: unknown item (no item has this id or path)",
        "row 3: 'no/such.png': unknown item (no item has this id or path)",
    ]
    assert "refused, nothing imported: 2 offending row(s) of 3" in str(err)


def test_an_unknown_class_refuses_the_whole_import(project):
    free = _unlabelled(project)
    err = _refused(project, [(free[0].id, "dark"), (free[1].path, "cat")])
    (problem,) = err.problems
    assert problem.startswith(f"row 2: item {free[1].id} ({free[1].path}): unknown class 'cat'")


def test_an_item_given_twice_refuses_the_whole_import(project):
    free = _unlabelled(project)
    err = _refused(project, [(free[0].id, "dark"), (free[1].id, "dark"), (free[1].path, "dark")])
    assert err.problems == [
        f"row 3: item {free[1].id} ({free[1].path}): duplicate: also given at row 2"
    ]


def test_a_conflicting_relabel_refuses_the_whole_import_unless_asked(project):
    free = _unlabelled(project)
    done = next(it for it in project.items() if it.label == "dark")
    err = _refused(project, [(free[0].id, "dark"), (done.id, "bright")])
    assert err.problems == [
        f"row 2: item {done.id} ({done.path}): conflicting relabel: labelled 'dark', this row "
        "says 'bright' (pass --relabel, or relabel=True, to replace it)"
    ]
    summary = project.import_labels(
        [(free[0].id, "dark"), (done.id, "bright")], source="fix.csv", relabel=True
    )
    assert (summary.added, summary.relabelled, summary.unchanged) == (1, 1, 0)
    labels = {it.id: it.label for it in project.items()}
    assert labels[done.id] == "bright" and labels[free[0].id] == "dark"
    conn = sqlite3.connect(project.path / "project.db")
    history = conn.execute(
        "SELECT o.name, n.name, h.source FROM label_history h LEFT JOIN classes o ON "
        "o.id = h.old_class_id JOIN classes n ON n.id = h.new_class_id WHERE h.item_id = ? "
        "ORDER BY h.id",
        (done.id,),
    ).fetchall()
    conn.close()
    assert history == [(None, "dark", "init"), ("dark", "bright", "fix.csv")]
    before = dump(project)  # the same labels again: nothing to do
    summary = project.import_labels([(done.path, "bright")], source="again.csv")
    assert (summary.added, summary.relabelled, summary.unchanged) == (0, 0, 1)
    assert dump(project) == before


def test_a_bad_labels_file_is_one_error_line_listing_every_offending_row(project, tmp_path, capsys):
    free = _unlabelled(project)
    done = next(it for it in project.items() if it.label == "dark")
    bad = write_csv(
        tmp_path / "bad.csv",
        ["id", "label"],
        [
            (free[0].id, "dark"),
            (999, "dark"),
            (free[1].path, "cat"),
            (free[0].path, "dark"),
            (done.id, "half"),
        ],
    )
    before = dump(project)
    assert main(["import-labels", str(project.path), str(bad)]) == 2
    line = one_error_line(capsys)
    assert "bad.csv: refused, nothing imported: 4 offending row(s) of 5" in line
    for n, why in ((3, "unknown item"), (4, "unknown class"), (5, "duplicate"), (6, "conflict")):
        assert re.search(rf"bad\.csv:{n}: [^;]*{why}", line), (n, line)
    assert "bad.csv:2: " not in line  # the valid row (named only as the first of the pair)
    assert dump(project) == before
    wrong = write_csv(tmp_path / "wrong.csv", ["name", "label"], [(1, "dark")])
    assert main(["import-labels", str(project.path), str(wrong)]) == 2
    assert "wrong.csv:1: header 'name,label' is not id,label nor path,label" in one_error_line(
        capsys
    )


def test_labelstudio_export_reading(tmp_path):
    tasks = [
        {"data": {"image": "/data/local-files/?d=imgs/a%20b.png"}},
        {"data": {"image": "x.png", "item_id": 7}},
        {"data": {"image": "y.png", "item_id": "8"}},
    ]
    export = labelstudio_export(tasks, [["dark"], [None, "half", None], []])
    path = write_json(tmp_path / "export.json", export)
    rows = read_labelstudio_export(path, image_url="/data/local-files/?d=imgs/")
    assert rows == [("a b.png", "dark"), (7, "half")]
    assert [r.where for r in rows] == [
        "export.json task 1 (Label Studio id 1)",
        "export.json task 2 (Label Studio id 2)",
    ]
    export[0]["annotations"][0]["result"] = []
    del export[1]["data"]["item_id"], export[1]["data"]["image"]
    with pytest.raises(LabelImportError) as caught:
        read_labelstudio_export(write_json(path, export))
    assert caught.value.problems == [
        "export.json task 1 (Label Studio id 1): its annotation holds no choice",
        "export.json task 2 (Label Studio id 2): no data.item_id nor data.image: cannot tell "
        "which item",
    ]


# ---------------------------------------------------------------------------------- batches


def test_pending_batches_are_not_offered_again_unless_requery(project):
    project.train(epochs=1)
    free = {it.id for it in _unlabelled(project)}
    first = project.query(4, "entropy")
    second = project.query(4, "entropy")
    ids1, ids2 = {b.id for b in first.items}, {b.id for b in second.items}
    assert len(ids1) == len(ids2) == 4 and not ids1 & ids2 and ids1 | ids2 <= free
    assert [b.number for b in project.pending_batches()] == [1, 2]
    with pytest.raises(ProjectError, match="8 more are in pending batches"):
        project.query(len(free) - 7, "entropy")
    everything = project.query(len(free), "random", requery=True)
    assert {b.id for b in everything.items} == free
    assert [b.score for b in everything.items] == [None] * len(free)  # random has no scores
    truth = {it.id: it.path.split("/")[0] for it in project.items()}
    project.import_labels([(i, truth[i]) for i in sorted(ids1)[:3]], source="part.csv")
    (b1, _, _) = project.pending_batches()
    assert [item.answered for item in b1.items].count(True) == 3 and b1.answered == 3
    summary = project.import_labels([(i, truth[i]) for i in sorted(ids1)[3:]], source="rest.csv")
    assert summary.closed_batches == [1]
    assert [b.number for b in project.pending_batches()] == [2, 3]
    with open(first.path_csv) as fh:  # the batch's file stays as written
        assert len(fh.read().splitlines()) == 5


def test_strategies_that_change_training_need_a_round_trained_for_them(project):
    project.train(epochs=1)
    with pytest.raises(ProjectError, match="'ll4al' trains a module with the model"):
        project.query(2, "ll4al")
    with pytest.raises(ProjectError, match=r"--strategy mc-dropout --fresh\)$"):
        project.query(2, "mc-dropout")
    assert project.train(epochs=1, strategy="ll4al").strategy == "ll4al"
    assert len(project.query(2, "ll4al").items) == 2
    with pytest.raises(ProjectError, match="or use strategy ll4al$"):
        project.train(epochs=1, strategy="mc-dropout")  # a warm start cannot add the dropout
    assert project.train(epochs=1, strategy="mc-dropout", fresh=True).strategy == "mc-dropout"
    assert project.train(epochs=1).strategy == "mc-dropout"  # kept by the warm start
    for strategy in ("mc-dropout", "entropy"):  # any strategy queries that model
        assert len(project.query(2, strategy).items) == 2
    assert [r.strategy for r in project.rounds()] == [None, "ll4al", "mc-dropout", "mc-dropout"]


# ---------------------------------------------------------------------------------- models


def test_torchvision_models_weights_and_factories(tmp_path, images, monkeypatch):
    import torchvision

    net = torchvision.models.resnet18(weights=None)
    torch.save(net.state_dict(), tmp_path / "resnet18.pth")
    model = build_model("torchvision:resnet18", 3, tmp_path / "resnet18.pth")
    assert isinstance(model, TorchvisionClassifier) and model.classifier.out_features == 3
    assert torch.equal(model.backbone.conv1.weight, net.conv1.weight)
    assert model.embed(torch.zeros(2, 3, 32, 32)).shape == (2, 512)
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "other.pth")
    with pytest.raises(ConfigError, match=r"does not fit model ResNet: \d+ unexpected"):
        build_model("torchvision:resnet18", 3, tmp_path / "other.pth")
    with pytest.raises(ConfigError, match="unknown torchvision classification model 'nope'"):
        build_model("torchvision:nope", 3)
    (tmp_path / "mynets.py").write_text(
        "from torch import nn\n"
        "def tiny(num_classes):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, num_classes))\n"
        "def broken(num_classes):\n"
        "    return 'not a module'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert build_model("mynets:tiny", 5)[1].out_features == 5
    with pytest.raises(ConfigError, match="returned a str, not a torch nn.Module"):
        build_model("mynets:broken", 5)
    with pytest.raises(ConfigError, match="cannot import module 'nomodule'"):
        build_model("nomodule:f", 5)
    # a torchvision model through a whole round; core-set needs its embedding
    root, truth = images
    first = [p for c in CLASSES for p in sorted(p for p in truth if truth[p] == c)[:2]]
    with Project.create(
        tmp_path / "tv",
        root,
        labels=[(p, truth[p]) for p in first],
        model="torchvision:resnet18",
        image_size=8,
    ) as proj:
        proj.train(epochs=1, config=None)
        batch = proj.query(3, "core-set")
        assert len(batch.items) == 3 and all(b.predicted in CLASSES for b in batch.items)


# ---------------------------------------------------------------------------------- schema


def test_the_schema_version_is_recorded_and_older_ones_are_migrated(project, monkeypatch):
    path = project.path
    project.close()
    conn = sqlite3.connect(path / "project.db")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == project_db.SCHEMA_VERSION == 1
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()

    def add_column(c: sqlite3.Connection) -> None:
        c.execute("ALTER TABLE items ADD COLUMN note TEXT")

    def failing(c: sqlite3.Connection) -> None:
        add_column(c)
        raise RuntimeError("migration failed half-way")

    monkeypatch.setattr(project_db, "SCHEMA_VERSION", 2)
    monkeypatch.setitem(project_db.MIGRATIONS, 1, failing)
    with pytest.raises(RuntimeError, match="half-way"):
        Project.open(path)
    conn = sqlite3.connect(path / "project.db")
    columns = [row[1] for row in conn.execute("PRAGMA table_info(items)")]
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1 and "note" not in columns
    conn.close()
    monkeypatch.setitem(project_db.MIGRATIONS, 1, add_column)
    with Project.open(path) as migrated:
        assert len(migrated.items()) == 36
    conn = sqlite3.connect(path / "project.db")
    columns = [row[1] for row in conn.execute("PRAGMA table_info(items)")]
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 2 and "note" in columns
    conn.close()


def test_unknown_schemas_are_refused(tmp_path, capsys):
    (tmp_path / "foreign").mkdir()
    conn = sqlite3.connect(tmp_path / "foreign" / "project.db")
    conn.execute("CREATE TABLE photos (name TEXT)")
    conn.commit()
    conn.close()
    with pytest.raises(ProjectError, match="holds tables \\(photos\\) but no gradnorm-al schema"):
        Project.open(tmp_path / "foreign")
    (tmp_path / "newer").mkdir()
    conn = sqlite3.connect(tmp_path / "newer" / "project.db")
    conn.execute("PRAGMA user_version = 7")
    conn.close()
    assert main(["status", str(tmp_path / "newer")]) == 2
    assert "schema version 7, written by a newer gradnorm-al" in one_error_line(capsys)
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "project.db").write_bytes(b"not a database at all" * 100)
    with pytest.raises(ProjectError, match="is not a gradnorm-al project database"):
        Project.open(tmp_path / "garbage")


# ---------------------------------------------------------------------------------- errors


def test_command_errors_are_one_line_with_exit_code_2(tmp_path, images, capsys):
    root, truth = images
    proj = str(tmp_path / "p")
    broken = tmp_path / "broken"
    shutil.copytree(root, broken)
    (broken / "dark" / "zz.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    labels = write_csv(tmp_path / "l.csv", ["path", "label"], [("dark/00.png", "dark")])
    cases = [
        (["status", proj], "is not a gradnorm-al project (no project.db)"),
        (["init", proj, "--images", str(root), "--classes", "a,b", "--model", "nope"],
         "unknown model 'nope'"),
        (["init", proj, "--images", str(broken), "--classes", "a,b"],
         "1 file(s) under"),
        (["init", proj, "--images", str(root), "--classes", "a,b", "--labels", str(labels)],
         "unknown class 'dark'"),
        (["init", proj, "--images", str(root)], "give the classes"),
        (["init", proj, "--images", str(root), "--classes", "a,a"], "class names given twice"),
        (["init", proj, "--images", str(root), "--classes", "dark,bright", "--model",
          "fcn-small"], "not a 2-D image classifier"),
        (["init", proj, "--images", str(root), "--classes", "dark,bright,half",
          "--val-fraction", "1"], "val_fraction must be in [0, 1)"),
        (["init", proj, "--images", str(root), "--classes", "dark,bright,half"], None),
        (["init", proj, "--images", str(root), "--classes", "a,b"], "is already a project"),
        (["train", proj, "--quiet"], "0 labelled item(s) to train on"),
        (["query", proj, "--budget", "3"], "no model yet: train one first"),
        (["query", proj, "--budget", "0"], "budget must be a whole number >= 1"),
        (["import-labels", proj, str(tmp_path / "none.csv")], "file not found"),
        (["train", proj, "--lr", "-1"], "lr must be"),
    ]  # fmt: skip
    for argv, message in cases:
        code = main(argv + (["--quiet"] if argv[0] == "init" else []))
        if message is None:
            assert code == 0
            capsys.readouterr()
            continue
        assert code == 2, argv
        line = one_error_line(capsys)
        assert message in line, (argv, line)
        assert "Traceback" not in line
        if "under" in message:
            assert "dark/zz.png (UnidentifiedImageError" in line

    def disk_error(self: Project) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Project, "status", disk_error)
        assert main(["status", proj]) == 2
        assert one_error_line(capsys).endswith(f"project {proj}: database error: disk I/O error")
    for argv in (["query", proj], ["init", proj], ["import-labels", proj]):  # usage errors
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2 and "--help" in one_error_line(capsys)
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == [
        ".gradnorm-al.lock",
        "labelstudio.xml",
        "project.db",
    ]


# ---------------------------------------------------------------------------------- a person


def _readme_block(heading: str) -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)[-1]


def _person(folder: Path, answer, stop: threading.Event) -> None:
    """A simulated annotator: answers every request-NNN.csv in ``folder`` (written elsewhere,
    renamed into place) with ``answer(index)``."""
    number = 1
    while not stop.is_set():
        request = folder / f"request-{number:03d}.csv"
        if not request.exists():
            time.sleep(0.02)
            continue
        with open(request, newline="") as fh:
            asked = [int(row["index"]) for row in csv.DictReader(fh)]
        write_csv(folder / "draft.csv", ["index", "label"], [(i, answer(i)) for i in asked])
        (folder / "draft.csv").replace(folder / f"answers-{number:03d}.csv")
        number += 1


def test_the_readme_person_in_the_loop_example_runs_as_written(tmp_path, monkeypatch, capsys):
    from sklearn.datasets import load_digits

    code = _readme_block("Labelling workflow (your annotators)")
    assert "HumanOracle" in code and len(code.strip().splitlines()) <= 20
    code = code.replace("timeout=3600)", "timeout=3600, poll=0.02)")  # a quick test person
    monkeypatch.chdir(tmp_path)
    (tmp_path / "answers").mkdir()
    y = load_digits().target
    stop = threading.Event()
    person = threading.Thread(target=_person, args=(tmp_path / "answers", lambda i: y[i], stop))
    person.start()
    try:
        exec(compile(code, "README", "exec"), {"__name__": "__main__"})
    finally:
        stop.set()
        person.join()
    out = capsys.readouterr().out
    accuracy = float(re.search(r"'accuracy': ([0-9.]+)", out).group(1))
    assert accuracy > 0.5 and "90 labels" in out
    assert sorted(p.name for p in (tmp_path / "answers").glob("answers-*")) == [
        f"answers-{n:03d}.csv" for n in range(1, 5)
    ]


def test_a_human_oracle_refuses_wrong_answers_and_times_out(tmp_path):
    pool = torch.utils.data.TensorDataset(torch.randn(10, 4))
    oracle = HumanOracle(
        tmp_path, classes=["no", "yes"], paths=[f"f{i}.png" for i in range(10)], poll=0.01
    )
    learner = ActiveLearner(nn.Linear(4, 2), pool, ClassificationTask(2), "random", oracle=oracle)
    write_csv(
        tmp_path / "answers-001.csv",
        ["index", "label"],
        [(3, "yes"), (3, "no"), (5, "maybe"), (9, "no")],
    )
    with pytest.raises(DataError) as caught:
        learner.update(np.array([3, 4, 5]))
    assert str(caught.value).endswith(
        "answers-001.csv: line 3: index 3 answered twice; line 4: unknown class 'maybe'; line 5: "
        "index 9 was not asked for; 2 index(es) not answered (e.g. 4); correct it and call "
        "update again"
    )
    assert len(learner.labeled) == 0
    with open(tmp_path / "request-001.csv", newline="") as fh:
        assert list(csv.reader(fh)) == [
            ["index", "path"],
            ["3", "f3.png"],
            ["4", "f4.png"],
            ["5", "f5.png"],
        ]
    write_csv(tmp_path / "answers-001.csv", ["index", "label"], [(5, "no"), (3, "yes"), (4, "no")])
    learner.update(np.array([3, 4, 5]))
    assert learner.labels().tolist() == [1, 0, 0]
    oracle.timeout = 0.05
    with pytest.raises(OracleTimeoutError, match="no answers in .*answers-002.csv after 0.05 s"):
        learner.update(np.array([0]))
