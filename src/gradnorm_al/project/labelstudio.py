"""A labelling project's batches on a Label Studio server: :func:`push` sends the pending batches
as tasks (the model's guess as a pre-annotation), :func:`pull` imports the finished annotations.

Through the official SDK (``label-studio-sdk`` 2.x, the ``LabelStudio`` client; the optional
dependency ``gradnorm-al[labelstudio]``). The server needs a token (a legacy token or a personal
access token, both from *Account & Settings* in Label Studio) and must read the images from its
own disk: it serves them as ``/data/local-files/?d=<path relative to its
LOCAL_FILES_DOCUMENT_ROOT>`` through a Local Storage on the project's images folder, which
:func:`push` creates (it is never synced: tasks come from :func:`push` only).

The Label Studio project made for a labelling project is recorded, per server URL, in
``PROJECT/labelstudio.json`` (written atomically), so every push adds to the same one. What is
already on the server is read back from it (each task's ``data.item_id``): pushing twice, or
after a crash, never duplicates a task.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote
from xml.sax.saxutils import quoteattr

from ..atomic import atomic_write_text
from ..errors import FileFormatError, GradnormALError

if TYPE_CHECKING:
    from label_studio_sdk import LabelStudio

    from . import Project

RECORD_FILE = "labelstudio.json"
DEFAULT_URL = "http://localhost:8080"
FROM_NAME, TO_NAME = "label", "image"  # label_config's tag names, as the tasks files use them
SOURCE_PREFIX = "labelstudio:"  # a label's source: labelstudio:<Label Studio project id>
_TITLE_LENGTH = 50  # Label Studio refuses longer project titles (and shorter than 3 characters)
_IMPORT_CHUNK = 1000  # tasks per import request


class LabelStudioError(GradnormALError):
    """The Label Studio server cannot be used as asked (unreachable, a refused token, an answer
    that is not Label Studio's); the message names the URL and the fix."""


@dataclass(frozen=True)
class PushResult:
    """What :func:`push` did: ``pushed`` new tasks, ``already`` items that were on the server
    before (not sent again), ``batches`` the pending batch numbers looked at."""

    url: str
    project_id: int
    created: bool
    pushed: int
    already: int
    batches: tuple[int, ...]


@dataclass(frozen=True)
class PullResult:
    """What :func:`pull` found in the Label Studio project's ``tasks``: ``imported`` labels
    given to the project (new ones, and changed ones with ``relabel``), ``unchanged`` answers
    the project already holds, ``unanswered`` tasks with no finished annotation (none, only
    skipped ones, or one without a choice), ``foreign`` tasks that :func:`push` did not make."""

    url: str
    project_id: int
    tasks: int
    imported: int
    unchanged: int
    unanswered: int
    foreign: int


def label_config(classes: Iterable[str]) -> str:
    """The labelling interface: the image and one required choice among ``classes``."""
    choices = "".join(f"<Choice value={quoteattr(c)}/>" for c in classes)
    return (
        f'<View><Image name="{TO_NAME}" value="$image"/>'
        f'<Choices name="{FROM_NAME}" toName="{TO_NAME}" choice="single" required="true">'
        f"{choices}</Choices></View>"
    )


def connection_settings(url: str | None = None, token: str | None = None) -> tuple[str, str]:
    """``(url, token)``: the arguments, else ``LABEL_STUDIO_URL`` (else :data:`DEFAULT_URL`)
    and ``LABEL_STUDIO_API_KEY``; the URL without a trailing ``/``."""
    url = (url or os.environ.get("LABEL_STUDIO_URL") or DEFAULT_URL).strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise LabelStudioError(
            f"the Label Studio URL {url!r} is not an address: give it as http://HOST:PORT "
            "with --url or LABEL_STUDIO_URL"
        )
    token = (token or os.environ.get("LABEL_STUDIO_API_KEY") or "").strip()
    if not token:
        raise LabelStudioError(
            f"no token for Label Studio at {url}: copy it from Account & Settings in Label "
            "Studio and pass --token or set LABEL_STUDIO_API_KEY"
        )
    return url, token


def push(
    project: Project,
    *,
    url: str | None = None,
    token: str | None = None,
    title: str | None = None,
    document_root: str | Path | None = None,
) -> PushResult:
    """Send the unanswered items of ``project``'s pending batches to Label Studio as tasks.

    Creates the Label Studio project on the first push to ``url`` (titled ``title``, default
    ``gradnorm-al <folder name>``) and the Local Storage that serves the images; each task is
    the batch's tasks-file entry (its ``predictions`` are the pre-annotation) with
    ``data.image`` the local-files URL and ``data.batch`` the batch number. Items already on
    the server are skipped. ``document_root`` is the server's LOCAL_FILES_DOCUMENT_ROOT (default:
    that environment variable, else ``/``, Label Studio's own default).
    """
    url, token = connection_settings(url, token)
    root = _document_root(document_root)
    client = _connect(url, token)
    with project.locked():  # two pushes at once would send the same tasks twice
        return _push(project, client, url, root, title)


def _push(project: Project, client: Any, url: str, root: Path, title: str | None) -> PushResult:
    items = list(project.items())
    paths = {item.id: Path(os.path.abspath(item.abspath)) for item in items}
    found, batches = [], []  # every unanswered item of the pending batches, in order
    for batch in project.pending_batches():
        batches.append(batch.number)
        wanted = {item.id for item in batch.items if not item.answered}
        in_file = _read_tasks(Path(batch.path_tasks))
        found += [(batch.number, t) for t in in_file if t["data"]["item_id"] in wanted]
    folder = _images_folder(items[0]) if found else None
    if folder is not None:
        _check_inside(folder, root)  # before creating anything on the server
    candidates = [_task(task, number, paths, root) for number, task in found]
    project_id, created = _project_for(client, Path(project.path), url, project.classes, title)
    on_server = {
        (t.data or {}).get("item_id")
        for t in _server_tasks(client, url, project_id, include="id,data")
    }
    tasks = []
    for task in candidates:
        item_id = task["data"]["item_id"]
        if item_id not in on_server:
            tasks.append(task)
            on_server.add(item_id)  # an item in two pending batches is sent once
    if folder is not None and tasks:
        _ensure_storage(client, url, project_id, folder)
    for start in range(0, len(tasks), _IMPORT_CHUNK):
        with _api(url, "importing tasks"):
            chunk: Any = tasks[start : start + _IMPORT_CHUNK]  # JSON, as the SDK sends it
            client.projects.import_tasks(project_id, request=chunk)
    already = len(candidates) - len(tasks)
    return PushResult(url, project_id, created, len(tasks), already, tuple(batches))


def pull(
    project: Project, *, url: str | None = None, token: str | None = None, relabel: bool = False
) -> PullResult:
    """Import the finished annotations of the Label Studio project that :func:`push` made.

    Per task the last annotation that was not cancelled (skipped) counts. Answers equal to the
    project's current label are left alone, so pulling twice imports nothing the second time;
    the others go to ``project.import_labels`` in one call (source ``labelstudio:<id>``), which
    takes all of them or none: an answer that changes an existing label is refused unless
    ``relabel``.
    """
    url, token = connection_settings(url, token)
    client = _connect(url, token)
    with project.locked():
        return _pull(project, client, url, relabel)


def _pull(project: Project, client: Any, url: str, relabel: bool) -> PullResult:
    project_id = _Record(Path(project.path) / RECORD_FILE).project_id(url)
    if project_id is None:
        raise LabelStudioError(
            f"nothing was pushed from {project.path} to Label Studio at {url}: run "
            "`gradnorm-al labelstudio push` first (or give the --url that was pushed to)"
        )
    _get_project(client, url, project_id, Path(project.path) / RECORD_FILE)
    current = {item.id: item.label for item in project.items()}
    rows: list[tuple[int | str, str]] = []
    n_tasks = unchanged = unanswered = foreign = 0
    for task in _server_tasks(client, url, project_id, fields="all"):
        n_tasks += 1
        item_id = (task.data or {}).get("item_id")
        if item_id is None:
            foreign += 1
            continue
        answer = _answer(task.annotations or [])
        if answer is None:
            unanswered += 1
        elif current.get(item_id) == answer:
            unchanged += 1
        else:
            rows.append((item_id, answer))
    if rows:
        project.import_labels(rows, source=f"{SOURCE_PREFIX}{project_id}", relabel=relabel)
    return PullResult(url, project_id, n_tasks, len(rows), unchanged, unanswered, foreign)


def _task(task: dict[str, Any], batch: int, paths: dict[int, Path], root: Path) -> dict[str, Any]:
    """A tasks-file entry as sent: the image as a local-files URL, the batch number added."""
    image = _local_files_url(paths[task["data"]["item_id"]], root)
    return {**task, "data": {**task["data"], "image": image, "batch": batch}}


def _answer(annotations: list[Any]) -> str | None:
    """The class chosen in the last annotation that was not cancelled, or None."""
    done = [_as_dict(a) for a in annotations]
    done = [a for a in done if not a.get("was_cancelled")]
    if not done:
        return None
    last = max(done, key=lambda a: (a.get("updated_at") or a.get("created_at") or "", a["id"]))
    for region in last.get("result") or []:
        if region.get("from_name") == FROM_NAME and region.get("type") == "choices":
            choices = region.get("value", {}).get("choices") or []
            if choices:
                return str(choices[0])
    return None


def _as_dict(annotation: Any) -> dict[str, Any]:
    if isinstance(annotation, dict):
        return annotation
    return annotation.model_dump() if hasattr(annotation, "model_dump") else dict(annotation)


# -- the server -------------------------------------------------------------------------------


def _connect(url: str, token: str) -> LabelStudio:
    """A client whose URL and token the server accepted (one request)."""
    try:
        from label_studio_sdk import LabelStudio
    except ImportError:
        raise LabelStudioError(
            "the Label Studio commands need the label-studio-sdk package: "
            "pip install 'gradnorm-al[labelstudio]'"
        ) from None
    with _api(url, "checking the token"):
        client = LabelStudio(base_url=url, api_key=token)  # exchanges a personal access token
        client.users.whoami()
    return client


@contextlib.contextmanager
def _api(url: str, doing: str, not_found: str | None = None) -> Iterator[None]:
    """Turn the SDK's and httpx's exceptions into one-line :class:`LabelStudioError`\\ s
    (``not_found``: the message for a 404)."""
    import httpx
    from label_studio_sdk.core.api_error import ApiError

    try:
        yield
    except httpx.TransportError as err:
        raise LabelStudioError(
            f"cannot reach Label Studio at {url} ({type(err).__name__}: {err}): start it "
            "(label-studio start) or give its address with --url or LABEL_STUDIO_URL"
        ) from None
    except ApiError as err:
        status, detail = err.status_code, _detail(err.body)
        if status in (401, 403):
            raise LabelStudioError(
                f"Label Studio at {url} refused the token ({status} {detail}): copy the token "
                "from Account & Settings in Label Studio and pass --token or set "
                "LABEL_STUDIO_API_KEY (a legacy token works only where the organization "
                "enables legacy tokens)"
            ) from None
        if status == 404 and not_found is not None:
            raise LabelStudioError(not_found) from None
        if not isinstance(err.body, dict):
            raise LabelStudioError(
                f"{url} does not answer like Label Studio while {doing} ({status} {detail}): "
                "check --url or LABEL_STUDIO_URL"
            ) from None
        raise LabelStudioError(
            f"Label Studio at {url} answered {status} while {doing}: {detail}"
        ) from None


def _detail(body: Any) -> str:
    if isinstance(body, dict):
        parts = [str(body.get("detail") or "")]
        if body.get("validation_errors"):
            parts.append(json.dumps(body["validation_errors"], ensure_ascii=False))
        text = " ".join(p for p in parts if p) or json.dumps(body, ensure_ascii=False)
    elif str(body).lstrip().startswith("<"):
        text = "an HTML page"
    else:
        text = str(body)
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:297] + "..."


def _server_tasks(client: LabelStudio, url: str, project_id: int, **query: str) -> Iterator[Any]:
    """Every task of the Label Studio project, page after page."""
    with _api(url, "listing the project's tasks"):
        yield from client.tasks.list(project=project_id, **query)


def _project_for(
    client: LabelStudio, folder: Path, url: str, classes: list[str], title: str | None
) -> tuple[int, bool]:
    """The Label Studio project recorded for ``url`` in ``folder``, else a new one (recorded
    at once, so a failure after it reuses it)."""
    record = _Record(folder / RECORD_FILE)
    project_id = record.project_id(url)
    if project_id is not None:
        _get_project(client, url, project_id, record.path)
        return project_id, False
    title = title or f"gradnorm-al {folder.resolve().name}"
    title = title[:_TITLE_LENGTH].ljust(3, ".")
    with _api(url, "creating the project"):
        created = client.projects.create(title=title, label_config=label_config(classes))
    project_id = int(created.id or 0)
    record.set_project_id(url, project_id)
    return project_id, True


def _get_project(client: LabelStudio, url: str, project_id: int, record_path: Path) -> None:
    gone = (
        f"Label Studio at {url} has no project {project_id} (recorded in {record_path}): it "
        f"was deleted, or the URL names another server; remove the {url} entry from that file "
        "to push into a new project"
    )
    with _api(url, "reading the project", not_found=gone):
        client.projects.get(project_id)


def _check_inside(folder: Path, root: Path) -> None:
    # Label Studio refuses a Local Storage on its document root itself
    if root not in folder.parents:
        raise LabelStudioError(
            f"the images folder {folder} must be inside Label Studio's document root {root} "
            "(and not the root itself): start Label Studio with LOCAL_FILES_DOCUMENT_ROOT set "
            "to a folder above it and give the same folder with --document-root"
        )


def _ensure_storage(client: LabelStudio, url: str, project_id: int, folder: Path) -> None:
    """A Local Storage on ``folder`` (never synced) lets the server serve its images."""
    with _api(url, "reading the project's local storages"):
        storages = client.import_storage.local.list(project=project_id)
    if any(posixpath.normpath(s.path or "") == folder.as_posix() for s in storages):
        return
    with _api(url, "adding a local storage for the images (is LOCAL_FILES_SERVING_ENABLED=true?)"):
        client.import_storage.local.create(
            project=project_id,
            path=str(folder),
            title="gradnorm-al images",
            description="serves the images of the tasks gradnorm-al pushes; do not sync it",
            use_blob_urls=True,
        )


def _document_root(root: str | Path | None) -> Path:
    root = root or os.environ.get("LOCAL_FILES_DOCUMENT_ROOT") or os.sep
    return Path(os.path.abspath(os.path.expanduser(root)))


def _images_folder(item: Any) -> Path:
    """The folder that item paths are relative to: an item's absolute path minus its path."""
    folder = Path(os.path.abspath(item.abspath))
    for _ in Path(item.path).parts:
        folder = folder.parent
    return folder


def _local_files_url(path: Path, root: Path) -> str:
    return "/data/local-files/?d=" + quote(path.relative_to(root).as_posix(), safe="/")


def _read_tasks(path: Path) -> list[dict[str, Any]]:
    fix = "write it again with `gradnorm-al query`"
    try:
        tasks = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise FileFormatError(path, err.lineno, f"not JSON ({err.msg})", fix) from None
    if not isinstance(tasks, list) or not all(
        isinstance(t, dict) and isinstance(t.get("data"), dict) and "item_id" in t["data"]
        for t in tasks
    ):
        raise FileFormatError(path, 1, "not a list of tasks with data.item_id", fix)
    return tasks


# -- PROJECT/labelstudio.json -------------------------------------------------------------------


class _Record:
    """``{"servers": {URL: {"project_id": N}}}``: the Label Studio project of each server."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _load(self) -> dict[str, Any]:
        fix = "repair it or delete it (a new push then creates a new Label Studio project)"
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {"servers": {}}
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise FileFormatError(self.path, err.lineno, f"not JSON ({err.msg})", fix) from None
        servers = data.get("servers") if isinstance(data, dict) else None
        if not isinstance(servers, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("project_id"), int) for v in servers.values()
        ):
            raise FileFormatError(
                self.path, 1, 'expected {"servers": {URL: {"project_id": N}}}', fix
            )
        return data

    def project_id(self, url: str) -> int | None:
        entry = self._load()["servers"].get(url)
        return None if entry is None else entry["project_id"]

    def set_project_id(self, url: str, project_id: int) -> None:
        data = self._load()
        data["servers"][url] = {"project_id": project_id}
        atomic_write_text(self.path, json.dumps(data, indent=2, sort_keys=True) + "\n")
