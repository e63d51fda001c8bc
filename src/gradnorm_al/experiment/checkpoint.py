"""Checkpoints of a run folder, written atomically and loaded with ``weights_only=True``:

* ``state/<strategy>.t<trial>.pt``: one per strategy x trial, rewritten after every cycle (resume);
* ``models/<strategy>.t<trial>.c<cycle>.pt``: with ``keep_models``, the task model of every cycle
  after its training (T^c), which the model-based analyses read.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_open
from ..errors import RunDirectoryError
from ..loop import CycleRecord, TrialState

STATE_DIR = "state"
MODELS_DIR = "models"
FORMAT_VERSION = 2  # 2: the learner's state (with its labels); 1 is still read
READABLE_VERSIONS = (1, 2)
MODEL_FORMAT_VERSION = 1  # kept models: unchanged


def state_path(out_dir: Path, strategy: str, trial: int) -> Path:
    return out_dir / STATE_DIR / f"{strategy}.t{trial}.pt"


def model_path(out_dir: Path, strategy: str, trial: int, cycle: int) -> Path:
    return out_dir / MODELS_DIR / f"{strategy}.t{trial}.c{cycle}.pt"


def _save(path: Path, payload: dict[str, Any]) -> None:
    with atomic_open(path, "wb") as fh:
        torch.save(payload, fh)


def _load(path: Path, fix: str) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise RunDirectoryError(
            f"cannot read checkpoint {path} ({type(err).__name__}); {fix}"
        ) from None


def _check_owner(path: Path, payload: dict[str, Any], expected: dict[str, Any]) -> None:
    for key, value in expected.items():
        if payload.get(key) != value:
            raise RunDirectoryError(
                f"checkpoint {path} has {key}={payload.get(key)!r}, expected {value!r}; it belongs "
                "to another run: use the folder it came from"
            )


def save_model(
    path: Path, state: dict[str, torch.Tensor], *, strategy: str, trial: int, seed: int, cycle: int
) -> None:
    """Write one cycle's task model (``state_dict`` tensors on the CPU) atomically."""
    _save(
        path,
        {
            "version": MODEL_FORMAT_VERSION,
            "strategy": strategy,
            "trial": trial,
            "seed": seed,
            "cycle": cycle,
            "model": {k: v.detach().cpu() for k, v in state.items()},
        },
    )


def load_model(
    path: Path, *, strategy: str, trial: int, seed: int, cycle: int
) -> dict[str, torch.Tensor]:
    """The ``state_dict`` saved by :func:`save_model`, checked to belong to this strategy, trial,
    seed and cycle."""
    if not path.is_file():
        raise RunDirectoryError(
            f"{path} is missing: the model-based analyses need the run's per-cycle models; run it "
            "with --keep-models (gradnorm-al run ... --keep-models)"
        )
    payload = _load(path, "re-run with --keep-models to rewrite it")
    expected = {"version": MODEL_FORMAT_VERSION, "strategy": strategy, "trial": trial, "seed": seed}
    _check_owner(path, payload, {**expected, "cycle": cycle})
    return payload["model"]


def _record_dict(record: CycleRecord) -> dict[str, Any]:
    values = dataclasses.asdict(record)
    values["selected"] = None if record.selected is None else [int(i) for i in record.selected]
    values["scores"] = None if record.scores is None else [float(v) for v in record.scores]
    return values


def _record(values: dict[str, Any]) -> CycleRecord:
    values = dict(values)
    if "metrics" not in values:  # format 1: the two classification columns as fields
        values["metrics"] = {k: values.pop(k) for k in ("test_accuracy", "train_accuracy")}
    selected, scores = values.get("selected"), values.get("scores")
    values["selected"] = None if selected is None else np.asarray(selected, np.int64)
    values["scores"] = None if scores is None else np.asarray(scores, np.float64)
    return CycleRecord(**values)


def save_state(path: Path, state: TrialState, *, strategy: str, trial: int, seed: int) -> None:
    """Write ``state`` atomically (temporary file in the same folder, fsync, rename)."""
    payload = {
        "version": FORMAT_VERSION,
        "strategy": strategy,
        "trial": trial,
        "seed": seed,
        "next_cycle": state.next_cycle,
        "learner": state.learner,
        "records": [_record_dict(r) for r in state.records],
    }
    _save(path, payload)


def load_state(path: Path, *, strategy: str, trial: int, seed: int) -> TrialState:
    """Read a checkpoint written by :func:`save_state` (``weights_only=True``: tensors and plain
    containers only) and check that it belongs to this strategy, trial and seed."""
    payload = _load(path, "delete it to recompute that trial from its start")
    if payload.get("version") not in READABLE_VERSIONS:
        raise RunDirectoryError(
            f"checkpoint {path} has format version {payload.get('version')!r}, this gradnorm-al "
            f"reads {READABLE_VERSIONS}; delete it to recompute that trial from its start"
        )
    _check_owner(path, payload, {"strategy": strategy, "trial": trial, "seed": seed})
    next_cycle = int(payload["next_cycle"])
    learner = payload.get("learner")
    if learner is None:  # format 1: no labels (the oracle gives them again), no query records
        learner = {
            "cycle": next_cycle,
            "pool": payload["pool"],
            "labels": None,
            "model": payload["model"],
            "auxiliary": payload["auxiliary"],
        }
    return TrialState(next_cycle, learner, [_record(r) for r in payload["records"]])
