"""What the labelling-project tests share: a generated folder of tiny images whose true classes
are known (the simulated annotators answer from them), and Label Studio's export format."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

#: sorted, as `init` orders classes read from a labels file
CLASSES = ["bright", "dark", "half"]


def make_images(root: Path, per_class: int = 12, size: int = 16, seed: int = 0) -> dict[str, str]:
    """``root/<class>/[more/]NN.png`` (grey PNGs: bright, dark, or dark left and bright right,
    with noise); half of each class one folder deeper. The true class of each relative path."""
    rng = np.random.default_rng(seed)
    truth = {}
    for name in CLASSES:
        for j in range(per_class):
            noise = rng.integers(0, 50, (size, size))
            if name == "bright":
                pixels = 200 + noise
            elif name == "dark":
                pixels = noise
            else:
                pixels = noise + np.where(np.arange(size) < size // 2, 0, 200)[None, :]
            rel = f"{name}/{'more/' if j % 2 else ''}{j:02d}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / rel)
            truth[rel] = name
    return truth


def write_csv(path: Path, header: list[str], rows: list[tuple]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _annotation(number: int, task_id: int, label: str | None, when: str) -> dict:
    """One annotation as Label Studio exports it (``label`` None: a skipped, cancelled one)."""
    result = []
    if label is not None:
        result = [
            {
                "value": {"choices": [label]},
                "id": f"r{number:04d}",
                "from_name": "label",
                "to_name": "image",
                "type": "choices",
                "origin": "manual",
            }
        ]
    return {
        "id": number,
        "completed_by": 1,
        "result": result,
        "was_cancelled": label is None,
        "ground_truth": False,
        "created_at": when,
        "updated_at": when,
        "draft_created_at": None,
        "lead_time": 3.2,
        "prediction": {},
        "result_count": 0,
        "unique_id": f"u-{number}",
        "import_id": None,
        "last_action": None,
        "task": task_id,
        "project": 1,
        "updated_by": 1,
        "parent_prediction": task_id,
        "parent_annotation": None,
        "last_created_by": None,
    }


def labelstudio_export(tasks: list[dict], answers: list[list[str | None]]) -> list[dict]:
    """Label Studio's JSON export of ``tasks`` (our ``batch-NNN.labelstudio.json``) after
    annotators answered: ``answers[k]`` the annotations of task k in the order they were made
    (a class name, or None for a skipped task)."""
    out, number = [], 0
    for k, (entry, given) in enumerate(zip(tasks, answers), start=1):
        annotations = []
        for j, label in enumerate(given):
            number += 1
            when = f"2024-05-0{1 + j}T10:{k:02d}:00.000000Z"
            annotations.append(_annotation(number, k, label, when))
        out.append(
            {
                "id": k,
                "annotations": annotations,
                "file_upload": None,
                "drafts": [],
                "predictions": [k],
                "data": entry["data"],
                "meta": {},
                "created_at": "2024-04-30T09:00:00.000000Z",
                "updated_at": "2024-05-03T10:00:00.000000Z",
                "inner_id": k,
                "total_annotations": sum(a is not None for a in given),
                "cancelled_annotations": sum(a is None for a in given),
                "total_predictions": 1,
                "comment_count": 0,
                "unresolved_comment_count": 0,
                "last_comment_updated_at": None,
                "project": 1,
                "updated_by": 1,
                "comment_authors": [],
            }
        )
    return out


def write_json(path: Path, value: object) -> Path:
    path.write_text(json.dumps(value, indent=2), encoding="utf-8")
    return path
