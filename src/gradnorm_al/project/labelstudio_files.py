"""Label Studio's file formats (no server, no SDK): the tasks a query writes, the labelling
configuration they need, and the JSON export of a Label Studio project read back as label rows.

A task (what ``batch-NNN.labelstudio.json`` holds a list of)::

    {"data": {"image": "<url or path>", "item_id": 17},
     "predictions": [{"model_version": "round-003", "score": 0.42,
                      "result": [{"from_name": "label", "to_name": "image", "type": "choices",
                                  "value": {"choices": ["cat"]}}]}]}

``score`` is left out where the strategy gives none (random, core-set, BADGE, the GCNs). The
labelling configuration (:func:`labeling_config`) names its controls ``label`` (the choices)
and ``image``, as the predictions do.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote
from xml.sax.saxutils import quoteattr

from ..atomic import atomic_write_text
from ..errors import FileFormatError, LabelImportError, read_text
from .labelfiles import LabelRow

FROM_NAME = "label"
TO_NAME = "image"
EXPORT_FIX = "export the Label Studio project as JSON (Export > JSON) and import that file"


def labeling_config(classes: Sequence[str]) -> str:
    """Label Studio's labelling configuration for single-choice image classification."""
    choices = "\n".join(f"    <Choice value={quoteattr(c)}/>" for c in classes)
    return (
        "<View>\n"
        f'  <Image name="{TO_NAME}" value="$image"/>\n'
        f'  <Choices name="{FROM_NAME}" toName="{TO_NAME}" choice="single" showInline="true">\n'
        f"{choices}\n"
        "  </Choices>\n"
        "</View>\n"
    )


def image_reference(path: str, abspath: Path, image_url: str | None) -> str:
    """What a task's ``data.image`` holds: ``image_url`` + the URL-quoted relative path, or the
    absolute file path when there is no ``image_url``."""
    if image_url is None:
        return str(abspath)
    return image_url + quote(path)


def task(
    item_id: int,
    image: str,
    *,
    model_version: str,
    predicted: str | None,
    score: float | None,
) -> dict[str, Any]:
    """One Label Studio task with the model's prediction (none when ``predicted`` is None)."""
    entry: dict[str, Any] = {"data": {"image": image, "item_id": int(item_id)}}
    if predicted is not None:
        prediction: dict[str, Any] = {"model_version": model_version}
        if score is not None:
            prediction["score"] = float(score)
        prediction["result"] = [
            {
                "from_name": FROM_NAME,
                "to_name": TO_NAME,
                "type": "choices",
                "value": {"choices": [predicted]},
            }
        ]
        entry["predictions"] = [prediction]
    return entry


def write_tasks(path: Path, tasks: Sequence[dict[str, Any]]) -> None:
    """The tasks as a JSON list (what Label Studio imports), atomically."""
    atomic_write_text(path, json.dumps(list(tasks), indent=1, ensure_ascii=False) + "\n")


def _choice(annotation: dict[str, Any]) -> str | None:
    """The first choice of the annotation's ``label`` control (or of its first choices
    control), or None."""
    results = [r for r in annotation.get("result") or [] if isinstance(r, dict)]
    picked = [r for r in results if r.get("from_name") == FROM_NAME] or results
    for result in picked:
        value = result.get("value")
        choices = value.get("choices") if isinstance(value, dict) else None
        if isinstance(choices, list) and choices and isinstance(choices[0], str):
            return choices[0]
    return None


def _last_annotation(annotations: list[Any]) -> dict[str, Any] | None:
    """The last annotation not cancelled (skipped): the latest ``updated_at`` where every one has
    it, else the last in the list."""
    kept = [a for a in annotations if isinstance(a, dict) and not a.get("was_cancelled")]
    if not kept:
        return None
    stamps = [a.get("updated_at") or a.get("created_at") for a in kept]
    if all(isinstance(s, str) for s in stamps):
        return max(enumerate(kept), key=lambda pair: (stamps[pair[0]], pair[0]))[1]
    return kept[-1]


def _key(data: dict[str, Any], image_url: str | None) -> int | str | None:
    item_id = data.get("item_id")
    if isinstance(item_id, int) and not isinstance(item_id, bool):
        return item_id
    if isinstance(item_id, str) and item_id.strip().isdigit():
        return int(item_id)
    image = data.get("image")
    if isinstance(image, str) and image:
        if image_url and image.startswith(image_url):
            return unquote(image[len(image_url) :])
        return image
    return None


def read_labelstudio_export(path: str | Path, *, image_url: str | None = None) -> list[LabelRow]:
    """The answers in a Label Studio JSON export, one ``(key, label)`` row per answered task.

    The key is ``data.item_id`` (what our tasks carry), else ``data.image`` (with ``image_url``
    stripped and URL-unquoted where it starts with it: a path relative to the images folder; an
    absolute path also resolves). The label is ``value.choices[0]`` of the last annotation not
    cancelled (see :func:`_last_annotation`). Tasks without such an annotation are skipped (not
    answered yet). A file that is not a JSON list of tasks is a :class:`FileFormatError`; tasks
    without a key, or whose annotation holds no choice, are refused together in one
    :class:`LabelImportError`. Each row's ``where`` is ``<file> task <n> (Label Studio id <id>)``,
    ``n`` counted from 1.
    """
    path = Path(path)
    text = read_text(path, EXPORT_FIX)
    try:
        tasks = json.loads(text)
    except json.JSONDecodeError as err:
        raise FileFormatError(path, err.lineno, f"not JSON ({err.msg})", EXPORT_FIX) from None
    if not isinstance(tasks, list):
        raise FileFormatError(path, 1, "not a list of tasks", EXPORT_FIX)
    rows, problems = [], []
    for n, entry in enumerate(tasks, start=1):
        where = f"{path.name} task {n}"
        if isinstance(entry, dict) and "id" in entry:
            where += f" (Label Studio id {entry['id']})"
        if not isinstance(entry, dict) or not isinstance(entry.get("data"), dict):
            problems.append(f"{where}: no `data` object: not a Label Studio task")
            continue
        annotations = entry.get("annotations") or []
        if not isinstance(annotations, list):
            problems.append(f"{where}: `annotations` is not a list")
            continue
        annotation = _last_annotation(annotations)
        if annotation is None:
            continue  # not answered (or only skipped)
        key = _key(entry["data"], image_url)
        if key is None:
            problems.append(f"{where}: no data.item_id nor data.image: cannot tell which item")
            continue
        label = _choice(annotation)
        if label is None:
            problems.append(f"{where}: its annotation holds no choice")
            continue
        rows.append(LabelRow(key, label.strip(), where))
    if problems:
        raise LabelImportError(
            f"{path}: refused, nothing imported: {len(problems)} offending task(s): "
            + "; ".join(problems),
            problems,
        )
    return rows
