"""``gradnorm-al labelstudio push|pull`` against a real Label Studio server.

A session fixture starts Label Studio (its own virtual environment: ``$GRADNORM_AL_LABEL_STUDIO``
names its ``label-studio`` executable, default ``.ci/label-studio-venv/bin/label-studio``, which
``.ci/run`` installs) on 127.0.0.1 with a fresh SQLite database, a user and a legacy API token:
about 6 s from a copy of a database ``label-studio init`` migrated (``.ci/run`` makes one in
``.ci/label-studio-template``; ``$GRADNORM_AL_LABEL_STUDIO_TEMPLATE`` names another), about 40 s
without, most of it Label Studio's database migrations. Without the executable
or the ``label-studio-sdk`` package these tests skip with the reason. The annotator's part is
played through the same REST API the labelling interface uses.

Each test works on a real labelling project (:class:`gradnorm_al.project.Project`) of a few
small images with a first model.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gradnorm_al.cli import main
from gradnorm_al.errors import DataError, FileFormatError
from gradnorm_al.project import Batch, Project, labelstudio
from gradnorm_al.project.labelstudio import LabelStudioError, pull, push

REPO = Path(__file__).resolve().parents[1]
EXECUTABLE_ENV = "GRADNORM_AL_LABEL_STUDIO"
TEMPLATE_ENV = "GRADNORM_AL_LABEL_STUDIO_TEMPLATE"
TEMPLATE_USER = "gradnorm-al-user.json"
DEFAULT_EXECUTABLE = REPO / ".ci" / "label-studio-venv" / "bin" / "label-studio"
START_TIMEOUT_S = 300  # a cold start migrates a new database: ~35 s here, more on a busy machine
CLASSES = ["cat", "dog", 'red "fox" & <co>']  # the last one checks the escaping end to end


def region(choice: str) -> dict[str, Any]:
    """One choice, as Label Studio writes it in a prediction's or an annotation's result."""
    return {
        "from_name": "label",
        "to_name": "image",
        "type": "choices",
        "value": {"choices": [choice]},
    }


# -- a real project over small images --------------------------------------------------------


SEEDS = 2  # images labelled at init (so that a first model can be trained), ids 1 and 2


def make_project(folder: Path, images: Path, n: int = 8) -> Project:
    """A labelling project of ``SEEDS`` labelled and ``n`` unlabelled small PNG images (ids
    ``SEEDS + 1 ...``, in two sub-folders of ``images``, names with a space), with a first
    model trained."""
    from PIL import Image

    rows = []
    for k in range(1, SEEDS + n + 1):
        rel = f"0seed/img {k:02d}.png" if k <= SEEDS else f"{'ab'[k % 2]}/img {k:02d}.png"
        path = images / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (6, 4), (20 * k, 0, 255 - 20 * k)).save(path)
        if k <= SEEDS:
            rows.append((rel, CLASSES[k - 1]))
    project = Project.create(folder, images, classes=CLASSES, labels=rows, image_size=8)
    project.train(epochs=1)
    return project


def query(project: Project, n: int) -> Batch:
    """A batch of ``n`` items (entropy: every item gets a score and a predicted class)."""
    return project.query(n, "entropy")


def sources(project: Project) -> set[str]:
    """Where the labels given after init came from."""
    with sqlite3.connect(f"file:{project.path / 'project.db'}?mode=ro", uri=True) as conn:
        return {s for (s,) in conn.execute("SELECT source FROM labels WHERE source != 'init'")}


# -- the server --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    url: str
    token: str
    files: Path  # its LOCAL_FILES_DOCUMENT_ROOT
    log: Path


def _executable() -> Path:
    named = os.environ.get(EXECUTABLE_ENV)
    path = Path(named) if named else DEFAULT_EXECUTABLE
    if not path.is_file():
        how = f"${EXECUTABLE_ENV}={named}" if named else f"{path} (set ${EXECUTABLE_ENV})"
        pytest.skip(f"no Label Studio server executable: {how}; .ci/run installs one")
    return path


def _template(executable: Path) -> Path | None:
    """A data folder that ``label-studio init`` made (its database migrated, its user and token
    in ``gradnorm-al-user.json``):
    ``$GRADNORM_AL_LABEL_STUDIO_TEMPLATE``, else ``label-studio-template`` next to the
    executable's virtual environment (what .ci/run makes); None: the server migrates a new one."""
    named = os.environ.get(TEMPLATE_ENV)
    path = Path(named) if named else executable.parents[2] / "label-studio-template"
    made = (path / "label_studio.sqlite3").is_file() and (path / TEMPLATE_USER).is_file()
    return path if made else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _log_tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def _wait_until_ready(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"Label Studio exited ({process.returncode}):\n{_log_tail(log)}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        time.sleep(0.25)
    pytest.fail(f"Label Studio not ready after {START_TIMEOUT_S} s:\n{_log_tail(log)}")


def _stop(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)  # its own session: the server and any child
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    pytest.importorskip(
        "label_studio_sdk", reason="no label-studio-sdk: pip install 'gradnorm-al[labelstudio]'"
    )
    executable = _executable()
    base = tmp_path_factory.mktemp("label-studio")
    files = base / "files"
    files.mkdir()
    url, token = f"http://127.0.0.1:{_free_port()}", secrets.token_hex(20)
    user = {"username": "annotator@example.com", "password": secrets.token_hex(8), "token": token}
    template = _template(executable)
    if template is not None:  # an initialised database: no migrations to run (~6 s, not ~40)
        shutil.copytree(template, base / "data")
        user = json.loads((template / TEMPLATE_USER).read_text())  # the user it was made with
        token = user["token"]
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(base),
        "LANG": "C.UTF-8",
        "LABEL_STUDIO_BASE_DATA_DIR": str(base / "data"),
        "LABEL_STUDIO_USERNAME": user["username"],
        "LABEL_STUDIO_PASSWORD": user["password"],
        "LABEL_STUDIO_USER_TOKEN": token,
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "LOCAL_FILES_SERVING_ENABLED": "true",
        "LOCAL_FILES_DOCUMENT_ROOT": str(files),
        "LATEST_VERSION_CHECK": "false",
        "COLLECT_ANALYTICS": "false",
    }
    log = base / "server.log"
    port = url.rsplit(":", 1)[1]
    command = [str(executable), "start", "--internal-host", "127.0.0.1", "--port", port]
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*command, "--no-browser"],
            env=env,
            cwd=base,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_until_ready(url, process, log)
        yield Server(url, token, files, log)
    finally:
        _stop(process)


@pytest.fixture
def client(server: Server) -> Any:
    from label_studio_sdk import LabelStudio

    return LabelStudio(base_url=server.url, api_key=server.token)


@pytest.fixture
def project(server: Server, tmp_path: Path) -> Project:
    return make_project(tmp_path / "project", server.files / tmp_path.name / "images")


def tasks_of(client: Any, project_id: int) -> dict[int, Any]:
    """The Label Studio project's tasks by item id."""
    return {t.data["item_id"]: t for t in client.tasks.list(project=project_id, fields="all")}


def annotate(client: Any, task: Any, choice: str | None, *, cancelled: bool = False) -> None:
    """What an annotator's submit (or skip, ``cancelled``) sends."""
    result = [] if choice is None else [region(choice)]
    client.annotations.create(task.id, result=result, was_cancelled=cancelled)


def settings(server: Server) -> dict[str, Any]:
    return {"url": server.url, "token": server.token}


# -- push and pull -------------------------------------------------------------------------------


@pytest.mark.slow
def test_push_answer_pull(server: Server, client: Any, project: Project) -> None:
    batch = query(project, 4)
    first = push(project, **settings(server), document_root=server.files)
    assert (first.created, first.pushed, first.already, first.batches) == (True, 4, 0, (1,))
    record = json.loads((project.path / "labelstudio.json").read_text())
    assert record == {"servers": {server.url: {"project_id": first.project_id}}}

    tasks = tasks_of(client, first.project_id)
    assert sorted(tasks) == sorted(i.id for i in batch.items)
    for item in batch.items:
        task = tasks[item.id]
        assert task.data["batch"] == 1
        (prediction,) = task.predictions
        assert prediction.model_version == "round-001"
        assert prediction.score == pytest.approx(item.score)
        assert prediction.result[0]["value"] == {"choices": [item.predicted]}
    # the image URL the labelling interface loads serves the file itself
    item = project.items()[batch.items[0].id - 1]
    request = urllib.request.Request(
        server.url + tasks[item.id].data["image"],
        headers={"Authorization": f"Token {server.token}"},
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.read() == item.abspath.read_bytes()

    again = push(project, **settings(server), document_root=server.files)
    assert (again.created, again.project_id, again.pushed, again.already) == (
        False,
        first.project_id,
        0,
        4,
    )
    assert len(tasks_of(client, first.project_id)) == 4

    a, b, c, _ = (tasks[i.id] for i in batch.items)
    annotate(client, a, "cat")
    annotate(client, b, "cat")
    annotate(client, b, CLASSES[2])  # corrected: the last annotation counts
    annotate(client, c, "dog", cancelled=True)  # skipped: no answer
    pulled = pull(project, **settings(server))
    assert (pulled.tasks, pulled.imported, pulled.unchanged, pulled.unanswered) == (4, 2, 0, 2)
    labels = {i.id: i.label for i in project.items()}
    assert (labels[a.data["item_id"]], labels[b.data["item_id"]]) == ("cat", CLASSES[2])
    assert sum(label is not None for label in labels.values()) == SEEDS + 2
    assert sources(project) == {f"labelstudio:{first.project_id}"}

    second = pull(project, **settings(server))
    assert (second.imported, second.unchanged, second.unanswered) == (0, 2, 2)

    query(project, 2)  # a new batch while the first one is still pending
    third = push(project, **settings(server), document_root=server.files)
    assert (third.pushed, third.already, third.batches) == (2, 2, (1, 2))
    assert len(tasks_of(client, first.project_id)) == 6


@pytest.mark.slow
def test_a_changed_answer_needs_relabel_and_nothing_is_half_imported(
    server: Server, client: Any, project: Project
) -> None:
    batch = query(project, 2)
    pushed = push(project, **settings(server), document_root=server.files)
    tasks = tasks_of(client, pushed.project_id)
    first, second = (tasks[i.id] for i in batch.items)
    annotate(client, first, "cat")
    assert pull(project, **settings(server)).imported == 1
    annotate(client, first, "dog")  # the annotator changes their mind
    annotate(client, second, "cat")
    with pytest.raises(DataError, match="conflicting relabel: labelled 'cat', this row says 'dog'"):
        pull(project, **settings(server))
    labels = {i.id: i.label for i in project.items()}
    assert (labels[first.data["item_id"]], labels[second.data["item_id"]]) == ("cat", None)
    personal = client.tokens.create().token  # a personal access token works as well
    assert pull(project, url=server.url, token=personal, relabel=True).imported == 2
    labels = {i.id: i.label for i in project.items()}
    assert (labels[first.data["item_id"]], labels[second.data["item_id"]]) == ("dog", "cat")


@pytest.mark.slow
def test_wrong_token_unreachable_server_and_missing_project_are_one_clear_line(
    server: Server, client: Any, project: Project
) -> None:
    query(project, 2)
    with pytest.raises(LabelStudioError, match="refused the token") as refused:
        push(project, url=server.url, token="not-a-token", document_root=server.files)
    assert server.url in str(refused.value) and "--token" in str(refused.value)
    closed = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(LabelStudioError, match="cannot reach Label Studio") as unreachable:
        push(project, url=closed, token=server.token, document_root=server.files)
    assert closed in str(unreachable.value) and "--url" in str(unreachable.value)
    with pytest.raises(LabelStudioError, match="nothing was pushed"):
        pull(project, **settings(server))
    assert not (project.path / "labelstudio.json").exists()

    pushed = push(project, **settings(server), document_root=server.files)
    client.projects.delete(pushed.project_id)
    with pytest.raises(LabelStudioError, match=f"has no project {pushed.project_id}"):
        push(project, **settings(server), document_root=server.files)
    for message in (refused.value, unreachable.value):
        assert "\n" not in str(message)


@pytest.mark.slow
def test_images_outside_the_document_root_are_refused_before_anything_is_made(
    server: Server, client: Any, tmp_path: Path
) -> None:
    project = make_project(tmp_path / "project", tmp_path / "images")  # not under server.files
    query(project, 2)
    before = len(list(client.projects.list()))
    with pytest.raises(LabelStudioError, match="must be inside Label Studio's document root"):
        push(project, **settings(server), document_root=server.files)
    assert len(list(client.projects.list())) == before
    assert not (project.path / "labelstudio.json").exists()


@pytest.mark.slow
def test_cli_push_and_pull(
    server: Server,
    client: Any,
    project: Project,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    batch = query(project, 3)
    where = ["--url", server.url, "--token", server.token]
    push_args = ["labelstudio", "push", str(project.path), *where]
    assert main([*push_args, "--document-root", str(server.files), "--title", "Pets"]) == 0
    out = capsys.readouterr().out
    assert "pushed 3 task(s) to Label Studio project" in out and "(new)" in out
    project_id = json.loads((project.path / "labelstudio.json").read_text())["servers"][server.url][
        "project_id"
    ]
    assert client.projects.get(project_id).title == "Pets"
    assert f"{server.url}/projects/{project_id}/data" in out

    annotate(client, tasks_of(client, project_id)[batch.items[0].id], "dog")
    monkeypatch.setenv("LABEL_STUDIO_URL", server.url + "/")  # the environment instead of options
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", server.token)
    assert main(["labelstudio", "pull", str(project.path)]) == 0
    assert "imported 1 label(s)" in capsys.readouterr().out
    assert project.items()[batch.items[0].id - 1].label == "dog"

    assert main(["labelstudio", "pull", str(project.path), "--token", "wrong-token"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gradnorm-al: error: Label Studio at")


# -- without a server ----------------------------------------------------------------------------


def test_label_config_escapes_class_names() -> None:
    view = ET.fromstring(labelstudio.label_config(CLASSES))
    (image,) = view.iter("Image")
    (choices,) = view.iter("Choices")
    assert (image.get("name"), image.get("value")) == ("image", "$image")
    assert (choices.get("name"), choices.get("toName"), choices.get("required")) == (
        "label",
        "image",
        "true",
    )
    assert [c.get("value") for c in choices.iter("Choice")] == CLASSES


def test_the_last_annotation_not_skipped_counts() -> None:
    def note(id: int, updated: str, choice: str | None, cancelled: bool = False) -> dict:
        result = [] if choice is None else [region(choice)]
        return {"id": id, "updated_at": updated, "was_cancelled": cancelled, "result": result}

    answer = labelstudio._answer
    assert answer([]) is None
    assert answer([note(1, "2026-01-02", "dog"), note(2, "2026-01-01", "cat")]) == "dog"
    assert answer([note(1, "2026-01-01", "cat"), note(2, "2026-01-02", "dog", True)]) == "cat"
    assert answer([note(1, "2026-01-01", "cat", True)]) is None
    assert answer([note(1, "2026-01-01", None)]) is None


def test_url_and_token_from_options_or_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LABEL_STUDIO_URL", raising=False)
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    with pytest.raises(LabelStudioError, match="no token for Label Studio at http://localhost"):
        labelstudio.connection_settings()
    monkeypatch.setenv("LABEL_STUDIO_URL", "http://ls.example:9000/")
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "env-token")
    assert labelstudio.connection_settings() == ("http://ls.example:9000", "env-token")
    assert labelstudio.connection_settings("http://h:1", "t") == ("http://h:1", "t")


def test_a_damaged_record_file_names_itself(tmp_path: Path) -> None:
    record = labelstudio._Record(tmp_path / "labelstudio.json")
    assert record.project_id("http://h:1") is None
    record.set_project_id("http://h:1", 7)
    record.set_project_id("http://h:2", 9)
    assert (record.project_id("http://h:1"), record.project_id("http://h:2")) == (7, 9)
    record.path.write_text('{"servers": {\n"http://h:1": 7}}')
    with pytest.raises(FileFormatError, match=r"labelstudio.json:1: expected"):
        record.project_id("http://h:1")
    record.path.write_text('{"servers":\n\n  oops}')
    with pytest.raises(FileFormatError, match=r"labelstudio.json:3: not JSON"):
        record.project_id("http://h:1")
