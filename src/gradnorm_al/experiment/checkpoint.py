"""Checkpoints of a run folder, written atomically and loaded with ``weights_only=True``:

* ``state/<strategy>.t<trial>.pt``: one per strategy x trial, rewritten after every cycle (resume);
* ``models/<strategy>.t<trial>.c<cycle>.pt``: with ``keep_models``, the task model of every cycle
  after its training (T^c), which the model-based analyses read.

Each carries a SHA-256 checksum of its content (every key, number, string and tensor byte; see
:func:`content_digest`), verified on load: a flipped byte that still unpickles is refused by
name (:class:`~gradnorm_al.errors.ChecksumError`), never resumed from. A state also records the
run's resolved configuration, which ``--resume`` compares with the run's ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_write_bytes
from ..errors import ChecksumError, RunDirectoryError
from ..loop import CycleRecord, TrialState

STATE_DIR = "state"
MODELS_DIR = "models"
#: 3: a checksum and the run's configuration; 2: the learner's state (with its labels);
#: 1 and 2 are still read (without a checksum to verify)
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
MODEL_FORMAT_VERSION = 2  # 2: with a checksum; 1 is still read
READABLE_MODEL_VERSIONS = (1, 2)
CHECKSUM = "checksum"


def state_path(out_dir: Path, strategy: str, trial: int) -> Path:
    return out_dir / STATE_DIR / f"{strategy}.t{trial}.pt"


def model_path(out_dir: Path, strategy: str, trial: int, cycle: int) -> Path:
    return out_dir / MODELS_DIR / f"{strategy}.t{trial}.c{cycle}.pt"


def content_digest(value: Any) -> str:
    """SHA-256 of a checkpoint's content: dict keys (sorted) and values, lists, strings, numbers,
    None, numpy arrays and tensors (dtype, shape and every byte), each tagged by its type."""
    h = hashlib.sha256()

    def feed(tag: bytes, data: bytes) -> None:
        h.update(tag + struct.pack("<Q", len(data)) + data)

    def walk(v: Any) -> None:
        if isinstance(v, dict):
            feed(b"d", str(len(v)).encode())
            for key in sorted(v, key=repr):
                walk(key)
                walk(v[key])
        elif isinstance(v, (list, tuple)):
            feed(b"l", str(len(v)).encode())
            for item in v:
                walk(item)
        elif isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            feed(b"t", f"{t.dtype}{tuple(t.shape)}".encode())
            feed(b"b", t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(v, np.ndarray):
            a = np.ascontiguousarray(v)
            feed(b"a", f"{a.dtype.str}{a.shape}".encode())
            feed(b"b", a.tobytes())
        elif v is None or isinstance(v, (bool, int, float, str, bytes, np.generic)):
            feed(type(v).__name__.encode(), repr(v).encode())
        else:
            raise TypeError(f"cannot checksum a {type(v).__name__}")

    walk(value)
    return h.hexdigest()


def save_checksummed(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` (tensors and plain containers) with its :func:`content_digest`,
    atomically."""
    payload = {**payload, CHECKSUM: content_digest(payload)}
    buffer = io.BytesIO()  # serialised in memory, so a full disk is an OSError of the write
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checksummed(path: Path, fix: str) -> dict[str, Any]:
    """A payload of :func:`save_checksummed`, loaded with ``weights_only=True`` and its checksum
    verified (a payload without one is returned as it is); errors name ``path`` and ``fix``."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise RunDirectoryError(
            f"cannot read checkpoint {path} ({type(err).__name__}); {fix}"
        ) from None
    if not isinstance(payload, dict):
        raise RunDirectoryError(f"checkpoint {path} holds no gradnorm-al checkpoint; {fix}")
    if CHECKSUM in payload:
        content = {k: v for k, v in payload.items() if k != CHECKSUM}
        try:
            digest = content_digest(content)
        except TypeError:
            digest = None
        if digest != payload[CHECKSUM]:
            raise ChecksumError(
                f"checkpoint {path} fails its checksum (its bytes were changed after it was "
                f"written); {fix}"
            )
    return payload


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
    save_checksummed(
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
    payload = load_checksummed(
        path, "delete it and re-run that run with --keep-models to recompute it"
    )
    if payload.get("version") not in READABLE_MODEL_VERSIONS:
        raise RunDirectoryError(
            f"model {path} has format version {payload.get('version')!r}, this gradnorm-al reads "
            f"{READABLE_MODEL_VERSIONS}; re-run that run with --keep-models to rewrite it"
        )
    _check_owner(
        path, payload, {"strategy": strategy, "trial": trial, "seed": seed, "cycle": cycle}
    )
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


def save_state(
    path: Path,
    state: TrialState,
    *,
    strategy: str,
    trial: int,
    seed: int,
    config: dict[str, Any] | None = None,
) -> None:
    """Write ``state`` atomically (temporary file in the same folder, fsync, rename), with its
    checksum and the run's resolved ``config`` (plain values)."""
    payload = {
        "config": config,
        "version": FORMAT_VERSION,
        "strategy": strategy,
        "trial": trial,
        "seed": seed,
        "next_cycle": state.next_cycle,
        "learner": state.learner,
        "records": [_record_dict(r) for r in state.records],
    }
    save_checksummed(path, payload)


RECOMPUTE = (
    "delete it and resume (gradnorm-al run --resume DIR) to recompute that trial from its start"
)


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every key whose value differs between two configurations."""
    missing = object()
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, missing), new.get(key, missing)
        if a != b:
            show = ["(none)" if v is missing else repr(v) for v in (a, b)]
            changes.append(f"{key}: {show[0]} -> {show[1]}")
    return changes


def load_state(
    path: Path, *, strategy: str, trial: int, seed: int, config: dict[str, Any] | None = None
) -> TrialState:
    """Read a checkpoint written by :func:`save_state` (``weights_only=True``: tensors and plain
    containers only), verify its checksum and check that it belongs to this strategy, trial and
    seed, and (when both are known) that it was written under this resolved ``config``."""
    payload = load_checksummed(path, RECOMPUTE)
    if payload.get("version") not in READABLE_VERSIONS:
        raise RunDirectoryError(
            f"checkpoint {path} has format version {payload.get('version')!r}, this gradnorm-al "
            f"reads {READABLE_VERSIONS}; delete it to recompute that trial from its start"
        )
    _check_owner(path, payload, {"strategy": strategy, "trial": trial, "seed": seed})
    written_with = payload.get("config")
    if config is not None and written_with is not None and written_with != config:
        changes = "; ".join(changed_keys(written_with, config))
        raise RunDirectoryError(
            f"the run's configuration changed since {path} was written ({changes}); a resumed "
            "run must keep its protocol: restore config.yaml, or start a new run in another --out"
        )
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
