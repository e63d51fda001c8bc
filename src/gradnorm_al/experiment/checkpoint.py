"""Per-trial checkpoints of a run folder: ``state/<strategy>.t<trial>.pt``, one per strategy x
trial, rewritten atomically after every cycle, loaded with ``weights_only=True``."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import RunDirectoryError
from ..loop import CycleRecord, TrialState

STATE_DIR = "state"
FORMAT_VERSION = 1


def state_path(out_dir: Path, strategy: str, trial: int) -> Path:
    return out_dir / STATE_DIR / f"{strategy}.t{trial}.pt"


def _record_dict(record: CycleRecord) -> dict[str, Any]:
    values = dataclasses.asdict(record)
    values["selected"] = None if record.selected is None else [int(i) for i in record.selected]
    return values


def _record(values: dict[str, Any]) -> CycleRecord:
    selected = values.get("selected")
    return CycleRecord(
        **{**values, "selected": None if selected is None else np.asarray(selected, np.int64)}
    )


def save_state(path: Path, state: TrialState, *, strategy: str, trial: int, seed: int) -> None:
    """Write ``state`` atomically (temporary file in the same folder, fsync, rename)."""
    payload = {
        "version": FORMAT_VERSION,
        "strategy": strategy,
        "trial": trial,
        "seed": seed,
        "next_cycle": state.next_cycle,
        "pool": state.pool,
        "model": state.model,
        "auxiliary": state.auxiliary,
        "records": [_record_dict(r) for r in state.records],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_state(path: Path, *, strategy: str, trial: int, seed: int) -> TrialState:
    """Read a checkpoint written by :func:`save_state` (``weights_only=True``: tensors and plain
    containers only) and check that it belongs to this strategy, trial and seed."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise RunDirectoryError(
            f"cannot read checkpoint {path} ({type(err).__name__}); delete it to recompute that "
            "trial from its start"
        ) from None
    expected = {"version": FORMAT_VERSION, "strategy": strategy, "trial": trial, "seed": seed}
    for key, value in expected.items():
        if payload.get(key) != value:
            raise RunDirectoryError(
                f"checkpoint {path} has {key}={payload.get(key)!r}, expected {value!r}; it belongs "
                "to another run: resume the folder it came from"
            )
    return TrialState(
        next_cycle=int(payload["next_cycle"]),
        pool=payload["pool"],
        model=payload["model"],
        auxiliary=payload["auxiliary"],
        records=[_record(r) for r in payload["records"]],
    )
