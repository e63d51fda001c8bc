"""A labelling project: the active-learning loop with people as the oracle, kept on disk.

``PROJECT/`` holds ``project.db`` (every item, label, round and batch; see :mod:`.db`),
``models/round-NNN.pt`` (the model of every round), ``batch-NNN.csv`` and
``batch-NNN.labelstudio.json`` (what each query asked for) and ``labelstudio.xml`` (the
labelling configuration for Label Studio).

Guarantees:

* every change is one SQLite transaction: a kill at any point leaves the database as before the
  command or as after it (an import applies all its rows or none);
* files are written atomically (temporary file, fsync, rename) *before* the transaction that
  records them: a kill in between leaves an unrecorded file, which the next command of that
  kind overwrites (its number is free again), never a record without its file;
* one command at a time changes a project: every changing command (and every changing method
  of :class:`Project`) holds the project's lock (``flock`` on ``PROJECT/.gradnorm-al.lock``,
  released by the OS however the process ends); a second one is refused at once, naming the
  holder. Reading (``status``, :meth:`Project.items`) needs no lock: it reads one committed state;
* labels are refused as a whole, listing every offending row, or applied as a whole.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import numbers
import os
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._torch import seeded_cpu
from ..atomic import atomic_write_text, remove_temporaries
from ..data.folders import stratified_split
from ..errors import (
    ConfigError,
    DataError,
    LabelImportError,
    ProjectError,
    ProjectLockedError,
    RunDirectoryError,
)
from ..experiment.checkpoint import load_checksummed, save_checksummed
from ..experiment.lock import LOCK_FILE, folder_lock
from ..experiment.runner import resolve_device
from ..learner import ActiveLearner
from ..options import option, to_mapping, validate
from ..seeding import MODEL_INIT, derive_seed
from ..strategies import Strategy, create_strategy
from ..tasks import ClassificationTask
from ..train import TrainConfig, predict
from . import db
from .images import check_readable, image_dataset, list_image_files
from .labelfiles import read_labels_file, write_batch_csv
from .labelstudio_files import image_reference, labeling_config, task, write_tasks
from .networks import build_model, check_spec

MODELS_DIR = "models"
LABELSTUDIO_CONFIG = "labelstudio.xml"
MODEL_KIND = "gradnorm-al project model"
MODEL_FORMAT = 1
DEFAULT_MODEL = "smallcnn"
DEFAULT_IMAGE_SIZE = 64


@dataclass
class ProjectTrainConfig(TrainConfig):
    """:class:`~gradnorm_al.train.TrainConfig` with defaults for a few hundred labelled images
    (the other options keep the run's defaults)."""

    epochs: int = option(20, "epochs per round", ge=1)
    lr: float = option(0.01, "SGD learning rate", gt=0.0)
    batch_size: int = option(32, "training batch", ge=1)


@dataclass(frozen=True)
class Item:
    """One image: its stable ``id``, ``path`` relative to the images folder, ``abspath``, its
    current ``label`` (a class name, None if unlabelled) and whether it is ``held_out``
    (validation: never trained on, never queried)."""

    id: int
    path: str
    abspath: Path
    label: str | None
    held_out: bool = False


@dataclass(frozen=True)
class BatchItem:
    """An item of a batch: ``score`` (None where the strategy gives none), the model's
    ``predicted`` class when queried, and whether it is ``answered`` (labelled) now."""

    id: int
    path: str
    score: float | None
    predicted: str | None
    answered: bool


@dataclass(frozen=True)
class Batch:
    """What one query asked for, best first; pending while an item is unanswered."""

    number: int
    path_csv: Path
    path_tasks: Path
    items: list[BatchItem]
    round: int = 0
    strategy: str = ""
    created: str = ""
    closed: str | None = None

    @property
    def pending(self) -> bool:
        return self.closed is None

    @property
    def answered(self) -> int:
        return sum(item.answered for item in self.items)


@dataclass(frozen=True)
class Round:
    """One training: its model file, the strategy the model was shaped for (``train
    --strategy``, or kept from the round it started from; None: plain) and metrics (accuracies
    in [0, 1]; ``heldout_accuracy`` None without a held-out split)."""

    number: int
    model_file: Path
    strategy: str | None
    num_labelled: int
    train_accuracy: float | None
    heldout_accuracy: float | None
    created: str


@dataclass(frozen=True)
class ImportSummary:
    """What an import changed: labels ``added`` (items unlabelled before), ``relabelled``,
    ``unchanged`` (the same label again: nothing to do) and the batches it ``closed``."""

    source: str
    added: int
    relabelled: int
    unchanged: int
    closed_batches: list[int]


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _round_file(number: int) -> str:
    return f"{MODELS_DIR}/round-{number:03d}.pt"


def _batch_files(number: int) -> tuple[str, str]:
    return f"batch-{number:03d}.csv", f"batch-{number:03d}.labelstudio.json"


def _check_classes(classes: Sequence[str]) -> list[str]:
    names = [c.strip() if isinstance(c, str) else c for c in classes]
    bad = [repr(c) for c in names if not isinstance(c, str) or not c]
    if bad:
        raise ConfigError(f"class names must be non-empty text, got {', '.join(bad)}")
    repeated = sorted({c for c in names if names.count(c) > 1})
    if repeated:
        raise ConfigError(f"class names given twice: {', '.join(repeated)}")
    if len(names) < 2:
        raise ConfigError(f"a project needs at least 2 classes, got {len(names)}")
    return names


class Project:
    """A labelling project on disk; make one with :meth:`create`, open one with :meth:`open`.

    Attributes: ``path`` (the project folder), ``images`` (the images folder), ``classes``,
    ``model`` (the model's name, see :mod:`.networks`), ``weights``, ``image_size``, ``seed``,
    ``image_url`` (what Label Studio tasks prefix relative paths with; None: absolute paths).
    """

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path, self._conn, self._lock_depth = path, conn, 0
        with db.snapshot(conn):
            meta = dict(conn.execute("SELECT key, value FROM meta"))
            self.classes: list[str] = [
                n for (n,) in conn.execute("SELECT name FROM classes ORDER BY id")
            ]
        self.images = Path(meta["images"])
        self.model: str = meta["model"]
        self.weights = Path(meta["weights"]) if meta.get("weights") else None
        self.image_size = int(meta["image_size"])
        self.seed = int(meta["seed"])
        self.image_url: str | None = meta.get("image_url") or None

    # ------------------------------------------------------------------ creating and opening
    @classmethod
    def create(
        cls,
        path: str | Path,
        images: str | Path,
        *,
        classes: Sequence[str] | None = None,
        labels: str | Path | Sequence[tuple[int | str, str]] | None = None,
        model: str = DEFAULT_MODEL,
        image_size: int = DEFAULT_IMAGE_SIZE,
        val_fraction: float = 0.0,
        seed: int = 0,
        weights: str | Path | None = None,
        image_url: str | None = None,
        progress: bool = False,
    ) -> Project:
        """A new project in the folder ``path`` (new, or empty) over the images under
        ``images``.

        ``classes``: the class names, in the order of the model's outputs (default: the sorted
        labels of ``labels``). ``labels``: the first labels, a labels file (CSV or Label Studio
        export) or ``(id or path, class)`` rows, checked as :meth:`import_labels` checks them.
        ``val_fraction``: the part of the first labels held out for validation, per class
        (seeded by ``seed``; a class with two labels or more gives at least one). ``model``,
        ``weights``: see :mod:`.networks`. ``image_url``: see :attr:`image_url`. Unless
        everything is valid, nothing is left but the folder and its lock file.
        """
        path = Path(path)
        images = Path(images).resolve()
        if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 4:
            raise ConfigError(f"image_size must be an integer >= 4, got {image_size!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
        check_spec(model)
        weights = Path(weights).resolve() if weights is not None else None
        if weights is not None and not weights.is_file():
            raise ConfigError(f"weights file {weights} not found")
        if path.exists() and not path.is_dir():
            raise ProjectError(f"{path} exists and is not a folder")
        _check_new(path)  # fails fast; checked again under the lock
        rows: list[Any] = []
        source = "init"
        if isinstance(labels, (str, Path)):
            rows, source = read_labels_file(labels), Path(labels).name
        elif labels is not None:
            rows = list(labels)
        if classes is None:
            given = sorted(
                {str(r[1]).strip() for r in rows if isinstance(r, (tuple, list)) and len(r) == 2}
            )
            if not given:
                raise ConfigError(
                    "give the classes (--classes a,b,c), or a labels file to read them from"
                )
            classes = given
        names = _check_classes(classes)
        with folder_lock(path, _refused(path)):
            _check_new(path)  # another init may have finished meanwhile
            paths = list_image_files(images, exclude=path.resolve())
            if not paths:
                raise DataError(f"no image files under {images}")
            check_readable(images, paths, progress)
            build_model(model, len(names), weights)  # an unusable model or weights file: now
            creating = path / f".{db.DB_FILE}.creating"
            _remove_database(creating)
            conn = db.connect(creating)
            try:
                db.upgrade(conn, creating)
                with db.transaction(conn):
                    meta = {
                        "images": str(images),
                        "model": model,
                        "weights": "" if weights is None else str(weights),
                        "image_size": str(image_size),
                        "seed": str(int(seed)),
                        "image_url": image_url or "",
                        "created": _now(),
                    }
                    conn.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
                    conn.executemany("INSERT INTO classes VALUES (?, ?)", enumerate(names))
                    conn.executemany(
                        "INSERT INTO items (id, path) VALUES (?, ?)", enumerate(paths, start=1)
                    )
                    _apply_labels(conn, rows, source=source, relabel=False, images=images)
                    if val_fraction > 0:
                        _hold_out(conn, val_fraction, int(seed))
                conn.execute("PRAGMA journal_mode = DELETE")  # one file to rename
                conn.close()
                atomic_write_text(path / LABELSTUDIO_CONFIG, labeling_config(names))
                os.replace(creating, path / db.DB_FILE)  # now it is a project
            except BaseException:
                conn.close()
                _remove_database(creating)
                raise
        return cls.open(path)

    @classmethod
    def open(cls, path: str | Path) -> Project:
        """The project in the folder ``path``; :class:`ProjectError` if there is none, or its
        database is one this gradnorm-al cannot read. An older schema is upgraded (under the
        project's lock)."""
        path = Path(path)
        file = path / db.DB_FILE
        if not file.is_file():
            raise ProjectError(
                f"{path} is not a gradnorm-al project (no {db.DB_FILE}); create one with "
                f"`gradnorm-al init {path} --images DIR`"
            )
        conn = db.connect(file)
        try:
            if db.check_version(conn, file) < db.SCHEMA_VERSION:
                with folder_lock(path, _refused(path)):
                    db.upgrade(conn, file)
            return cls(path, conn)
        except BaseException:
            conn.close()
            raise

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Project:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the project's lock for the block (re-entrant within this object): no other
        process changes the project meanwhile. :class:`ProjectLockedError` if one holds it."""
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        with folder_lock(self.path, _refused(self.path)):
            self._lock_depth = 1
            try:
                remove_temporaries(self.path)  # left by a killed writer; no live one now
                yield
            finally:
                self._lock_depth = 0

    # ------------------------------------------------------------------ reading
    def items(self) -> list[Item]:
        """Every item, by id, with its current label."""
        with db.snapshot(self._conn) as conn:
            return self._items(conn)

    def _items(self, conn: sqlite3.Connection) -> list[Item]:
        rows = conn.execute(
            "SELECT i.id, i.path, c.name, i.held_out FROM items i "
            "LEFT JOIN labels l ON l.item_id = i.id "
            "LEFT JOIN classes c ON c.id = l.class_id ORDER BY i.id"
        )
        return [Item(i, p, self.images / p, label, bool(h)) for i, p, label, h in rows]

    def batches(self, *, pending_only: bool = False) -> list[Batch]:
        """Every batch (or the pending ones), by number, with each item's state now."""
        with db.snapshot(self._conn) as conn:
            where = "WHERE closed IS NULL " if pending_only else ""
            heads = conn.execute(
                "SELECT number, round, strategy, csv_file, tasks_file, created, closed "
                f"FROM batches {where}ORDER BY number"
            ).fetchall()
            batches = []
            for number, rnd, strategy, csv_file, tasks_file, created, closed in heads:
                items = [
                    BatchItem(item, path, score, predicted, answered is not None)
                    for item, path, score, predicted, answered in conn.execute(
                        "SELECT b.item_id, i.path, b.score, c.name, l.item_id "
                        "FROM batch_items b JOIN items i ON i.id = b.item_id "
                        "LEFT JOIN classes c ON c.id = b.predicted_class_id "
                        "LEFT JOIN labels l ON l.item_id = b.item_id "
                        "WHERE b.batch = ? ORDER BY b.position",
                        (number,),
                    )
                ]
                batches.append(
                    Batch(
                        number,
                        self.path / csv_file,
                        self.path / tasks_file,
                        items,
                        rnd,
                        strategy,
                        created,
                        closed,
                    )
                )
        return batches

    def pending_batches(self) -> list[Batch]:
        """The batches with an unanswered item, by number."""
        return self.batches(pending_only=True)

    def rounds(self) -> list[Round]:
        """Every round, by number."""
        with db.snapshot(self._conn) as conn:
            return self._rounds(conn)

    def _rounds(self, conn: sqlite3.Connection, last_only: bool = False) -> list[Round]:
        rows = conn.execute(
            "SELECT number, model_file, strategy, num_labelled, train_accuracy, "
            "heldout_accuracy, created FROM rounds ORDER BY number"
            + (" DESC LIMIT 1" if last_only else "")
        )
        return [Round(n, self.path / f, *rest) for n, f, *rest in rows]

    def status(self) -> dict[str, Any]:
        """Counts and history as plain data: ``items``, ``labelled`` (trained on),
        ``held_out`` (labelled, validation), ``unlabelled``, ``per_class`` ({class:
        {"labelled", "held_out"}}), ``rounds`` (each as a dict), ``pending_batches`` (number,
        items, answered, strategy, round), ``heldout_accuracy`` (the last round's; None without
        a held-out split or a round) and the settings."""
        with db.snapshot(self._conn) as conn:
            counts = conn.execute(
                "SELECT c.name, i.held_out, COUNT(*) FROM labels l "
                "JOIN items i ON i.id = l.item_id JOIN classes c ON c.id = l.class_id "
                "GROUP BY c.name, i.held_out"
            ).fetchall()
            total = conn.execute("SELECT COUNT(*) FROM items").fetchone()[0]
            pending = conn.execute(
                "SELECT b.number, b.strategy, b.round, COUNT(*), COUNT(l.item_id) "
                "FROM batches b JOIN batch_items bi ON bi.batch = b.number "
                "LEFT JOIN labels l ON l.item_id = bi.item_id "
                "WHERE b.closed IS NULL GROUP BY b.number ORDER BY b.number"
            ).fetchall()
            closed = conn.execute(
                "SELECT COUNT(*) FROM batches WHERE closed IS NOT NULL"
            ).fetchone()[0]
            history = self._rounds(conn)
        per_class = {c: {"labelled": 0, "held_out": 0} for c in self.classes}
        for name, held_out, n in counts:
            per_class[name]["held_out" if held_out else "labelled"] = n
        labelled = sum(v["labelled"] for v in per_class.values())
        held_out = sum(v["held_out"] for v in per_class.values())
        rounds = [
            {
                "number": r.number,
                "model_file": str(r.model_file),
                "strategy": r.strategy,
                "num_labelled": r.num_labelled,
                "train_accuracy": r.train_accuracy,
                "heldout_accuracy": r.heldout_accuracy,
                "created": r.created,
            }
            for r in history
        ]
        return {
            "project": str(self.path),
            "schema_version": db.SCHEMA_VERSION,
            "images": str(self.images),
            "model": self.model,
            "image_size": self.image_size,
            "classes": list(self.classes),
            "items": total,
            "labelled": labelled,
            "held_out": held_out,
            "unlabelled": total - labelled - held_out,
            "per_class": per_class,
            "rounds": rounds,
            "pending_batches": [
                {"number": n, "strategy": s, "round": r, "items": k, "answered": a}
                for n, s, r, k, a in pending
            ],
            "closed_batches": closed,
            "heldout_accuracy": rounds[-1]["heldout_accuracy"] if rounds else None,
        }

    # ------------------------------------------------------------------ labels
    def import_labels(
        self, rows: Sequence[tuple[int | str, str]], *, source: str, relabel: bool = False
    ) -> ImportSummary:
        """Apply answers ``(item id or relative path, class name)``, all or none.

        Refused as a whole (:class:`LabelImportError` listing every offending row: where, which
        item, why) for an unknown item, an unknown class, an item given twice, or a label that
        differs from the item's current one unless ``relabel`` (every label given is kept in
        ``label_history``). The same label again changes nothing. A batch whose items are all
        labelled afterwards is closed. ``source`` (a file name, "labelstudio", ...) is recorded
        with each label. Rows that are :class:`~.labelfiles.LabelRow` name their place in the
        error; others are named ``row <n>``.
        """
        with self.locked(), db.transaction(self._conn) as conn:
            return _apply_labels(conn, rows, source=source, relabel=relabel, images=self.images)

    def import_file(self, file: str | Path, *, relabel: bool = False) -> ImportSummary:
        """:meth:`import_labels` of a labels CSV or a Label Studio JSON export."""
        rows = read_labels_file(file)
        return self.import_labels(rows, source=Path(file).name, relabel=relabel)

    # ------------------------------------------------------------------ training and querying
    def _snapshot(self) -> tuple[list[Item], Round | None, set[int], int]:
        """(items, last round, ids in pending batches, next batch number), one committed state."""
        with db.snapshot(self._conn) as conn:
            items = self._items(conn)
            last = self._rounds(conn, last_only=True)
            pending = {
                i
                for (i,) in conn.execute(
                    "SELECT bi.item_id FROM batch_items bi "
                    "JOIN batches b ON b.number = bi.batch WHERE b.closed IS NULL"
                )
            }
            number = conn.execute("SELECT COALESCE(MAX(number), 0) + 1 FROM batches").fetchone()
        return items, (last[0] if last else None), pending, int(number[0])

    def _learner(
        self,
        items: list[Item],
        strategy: str | Strategy,
        *,
        cycle: int,
        model_state: dict[str, Any] | None,
        weights: Path | None,
        config: TrainConfig,
        device: str | torch.device,
        batch_size: int = 128,
        progress: bool = False,
        name: str | None = None,
    ) -> ActiveLearner:
        """A learner over every item (pool index = position in ``items``) that knows the
        labels of the items trained on, with the model of ``model_state`` (a round file's
        payload) or a fresh one (seeded; from ``weights`` where given)."""
        classes = {c: k for k, c in enumerate(self.classes)}
        pool = image_dataset(
            self.images, [it.path for it in items], [-1] * len(items), self.image_size
        )
        with seeded_cpu(derive_seed(self.seed, MODEL_INIT, 0)):
            module = build_model(self.model, len(self.classes), weights)
        shaped_by = model_state.get("strategy") if model_state is not None else None
        if shaped_by is not None:  # that model's layers first (mc-dropout's dropout)
            module = create_strategy(shaped_by).prepare_model(module)
        learner = ActiveLearner(
            module,
            pool,
            ClassificationTask(len(self.classes)),
            strategy,
            train=config,
            device=device,
            seed=self.seed,
            batch_size=batch_size,
            progress=progress,
            name=name,
        )
        trained = [k for k, it in enumerate(items) if it.label is not None and not it.held_out]
        labeled_at = np.full(len(items), -1, dtype=np.int64)
        labeled_at[trained] = 0
        state = {
            "cycle": cycle,
            "pool": {"size": len(items), "labeled_at": labeled_at.tolist()},
            "labels": torch.tensor([classes[items[k].label] for k in trained], dtype=torch.int64),
            "queries": [],
            "model": None if model_state is None else model_state["model"],
            "auxiliary": None if model_state is None else model_state["auxiliary"],
        }
        try:
            learner.load_state_dict(state)
        except RuntimeError as err:  # the round's model is not the one this strategy builds
            other = f", or use strategy {shaped_by}" if shaped_by else ""
            raise ProjectError(
                f"the last round's model (trained for strategy {shaped_by or 'none'}) does "
                f"not fit strategy {learner.strategy.name!r}: one of them changes the model "
                f"({' '.join(str(err).split())[:120]}); train a round for it "
                f"(gradnorm-al train {self.path} --strategy {learner.strategy.name} --fresh)"
                f"{other}"
            ) from None
        return learner

    def _load_round(self, rnd: Round) -> dict[str, Any]:
        fix = f"train again (gradnorm-al train {self.path}) to write a new round"
        if not rnd.model_file.is_file():
            raise ProjectError(
                f"the model of round {rnd.number}, {rnd.model_file}, is missing; {fix}"
            )
        try:
            payload = load_checksummed(rnd.model_file, fix)
        except RunDirectoryError as err:
            raise ProjectError(str(err)) from None
        if payload.get("kind") != MODEL_KIND or payload.get("round") != rnd.number:
            raise ProjectError(f"{rnd.model_file} is not the model of round {rnd.number}; {fix}")
        if payload.get("classes") != self.classes or payload.get("model_spec") != self.model:
            raise ProjectError(f"{rnd.model_file} belongs to another project; {fix}")
        return payload

    def train(
        self,
        *,
        epochs: int | None = None,
        config: TrainConfig | None = None,
        device: str | torch.device = "cpu",
        strategy: str | None = None,
        fresh: bool = False,
        weights: str | Path | None = None,
        progress: bool = False,
    ) -> Round:
        """Train the next round's model on the labelled items (held-out ones excepted) and keep
        it (``models/round-NNN.pt``, atomically, then recorded).

        The model starts from the last round's (warm start) unless ``fresh`` or there is none:
        then a fresh one, seeded, from ``weights`` (or the project's weights file) where given
        (``weights`` implies ``fresh``). ``config`` is the recipe (default
        :class:`ProjectTrainConfig`; ``epochs`` overrides its epochs). ``strategy``: train the
        model as that strategy needs it (``mc-dropout`` adds dropout, ``ll4al`` trains its loss
        module alongside); needed before querying with such a strategy. A model shaped for a
        strategy keeps its shape in later rounds that start from it, and any strategy can query
        it (a strategy needing another shape is refused, naming the fix).
        """
        config = config if config is not None else ProjectTrainConfig()
        if epochs is not None:
            config = dataclasses.replace(config, epochs=epochs)
        validate(config)
        if strategy is not None:
            create_strategy(strategy)  # an unknown name: before the lock
        if weights is not None:
            weights, fresh = Path(weights).resolve(), True
        device = resolve_device(str(device))
        with self.locked():
            items, last, _, _ = self._snapshot()
            trained = [it for it in items if it.label is not None and not it.held_out]
            if len(trained) < 2:
                raise ProjectError(
                    f"{len(trained)} labelled item(s) to train on (held-out ones excepted); label "
                    f"at least 2 first: gradnorm-al import-labels {self.path} FILE"
                )
            number = 1 if last is None else last.number + 1
            start = self._load_round(last) if last is not None and not fresh else None
            # the strategy whose model this round's is: a warm start keeps the last one's
            shaped_by = strategy or (start["strategy"] if start is not None else None)
            learner = self._learner(
                items,
                strategy or "random",
                cycle=number - 1,
                model_state=start,
                weights=None if start is not None else (weights or self.weights),
                config=config,
                device=device,
                progress=progress,
                name=f"round {number}",
            )
            learner.fit()
            train_accuracy = learner.evaluate_labeled()["accuracy"]
            held = [it for it in items if it.held_out and it.label is not None]
            heldout_accuracy = None
            if held:
                targets = [self.classes.index(it.label) for it in held]  # type: ignore[arg-type]
                data = image_dataset(
                    self.images, [it.path for it in held], targets, self.image_size
                )
                heldout_accuracy = learner.evaluate(data)["accuracy"]
            assert learner.model is not None
            aux = learner.auxiliary
            save_checksummed(
                self.path / _round_file(number),
                {
                    "kind": MODEL_KIND,
                    "version": MODEL_FORMAT,
                    "round": number,
                    "model_spec": self.model,
                    "classes": list(self.classes),
                    "image_size": self.image_size,
                    "strategy": shaped_by,
                    "model": _cpu_state(learner.model),
                    "auxiliary": None if aux is None else _cpu_state(aux.module),
                },
            )
            created = _now()
            with db.transaction(self._conn) as conn:
                conn.execute(
                    "INSERT INTO rounds VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        number,
                        _round_file(number),
                        shaped_by,
                        json.dumps(to_mapping(config)),
                        len(trained),
                        train_accuracy,
                        heldout_accuracy,
                        created,
                    ),
                )
        return Round(
            number,
            self.path / _round_file(number),
            shaped_by,
            len(trained),
            train_accuracy,
            heldout_accuracy,
            created,
        )

    def query(
        self,
        budget: int,
        strategy: str,
        requery: bool = False,
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 128,
        progress: bool = False,
    ) -> Batch:
        """The ``budget`` unlabelled items most worth labelling next by ``strategy`` (any
        registered strategy, ``SCORER@SAMPLER`` too) with the last round's model, written to
        ``batch-NNN.csv`` and ``batch-NNN.labelstudio.json`` and recorded as pending.

        Candidates: unlabelled items, not held out, and not in a pending batch unless
        ``requery``. Seeded by the project's seed and the batch number.
        """
        if not isinstance(budget, numbers.Integral) or isinstance(budget, bool) or budget < 1:
            raise ConfigError(f"budget must be a whole number >= 1, got {budget!r}")
        chosen = create_strategy(strategy)
        device = resolve_device(str(device))
        with self.locked():
            items, last, pending, number = self._snapshot()
            if last is None:
                raise ProjectError(f"no model yet: train one first (gradnorm-al train {self.path})")
            free = [it.label is None and not it.held_out for it in items]
            candidates = [
                k for k, ok in enumerate(free) if ok and (requery or items[k].id not in pending)
            ]
            if budget > len(candidates):
                waiting = sum(ok and items[k].id in pending for k, ok in enumerate(free))
                more = (
                    f"; {waiting} more are in pending batches (requery offers them again)"
                    if waiting and not requery
                    else ""
                )
                raise ProjectError(
                    f"budget {budget} exceeds the {len(candidates)} item(s) that can be "
                    f"offered{more}"
                )
            payload = self._load_round(last)
            learner = self._learner(
                items,
                chosen,
                cycle=number - 1,
                model_state=payload,
                weights=None,
                config=ProjectTrainConfig(),
                device=device,
                batch_size=batch_size,
                progress=progress,
            )
            if learner.auxiliary is not None and payload["auxiliary"] is None:
                raise ProjectError(
                    f"strategy {learner.strategy.name!r} trains a module with the model, and the "
                    f"last round was not trained with it; train a round for it first: "
                    f"gradnorm-al train {self.path} --strategy {learner.strategy.name}"
                )
            picks = learner.query(budget, np.asarray(candidates, dtype=np.int64))
            scores = learner.last_scores
            assert learner.model is not None
            predicted, _ = predict(
                learner.model, learner.pool, picks, device=learner.device, batch_size=batch_size
            )
            batch_items = [
                BatchItem(
                    items[k].id,
                    items[k].path,
                    None if scores is None else float(scores[j]),
                    self.classes[int(predicted[j])],
                    False,
                )
                for j, k in enumerate(picks.tolist())
            ]
            csv_file, tasks_file = _batch_files(number)
            write_batch_csv(self.path / csv_file, [(b.id, b.path, b.score) for b in batch_items])
            version = f"round-{last.number:03d}"
            write_tasks(
                self.path / tasks_file,
                [
                    task(
                        b.id,
                        image_reference(b.path, self.images / b.path, self.image_url),
                        model_version=version,
                        predicted=b.predicted,
                        score=b.score,
                    )
                    for b in batch_items
                ],
            )
            created = _now()
            with db.transaction(self._conn) as conn:
                conn.execute(
                    "INSERT INTO batches VALUES (?, ?, ?, ?, ?, ?, NULL)",
                    (number, last.number, learner.strategy.name, csv_file, tasks_file, created),
                )
                conn.executemany(
                    "INSERT INTO batch_items VALUES (?, ?, ?, ?, ?)",
                    [
                        (number, j, b.id, b.score, self.classes.index(b.predicted))  # type: ignore[arg-type]
                        for j, b in enumerate(batch_items)
                    ],
                )
        return Batch(
            number,
            self.path / csv_file,
            self.path / tasks_file,
            batch_items,
            last.number,
            learner.strategy.name,
            created,
            None,
        )

    def integrity_problems(self) -> list[str]:
        """What SQLite's integrity and foreign-key checks find in the database ([]: sound)."""
        return db.integrity_problems(self._conn)


# ---------------------------------------------------------------------------------------------


def _refused(path: Path) -> Callable[[str], ProjectLockedError]:
    def refused(holder: str) -> ProjectLockedError:
        return ProjectLockedError(
            f"project {path} is in use by {holder}; wait for it to finish, then run the command "
            "again"
        )

    return refused


def _check_new(path: Path) -> None:
    """:class:`ProjectError` unless ``path`` is missing or an empty folder (its lock file and
    what an interrupted ``init`` left aside)."""
    if (path / db.DB_FILE).exists():
        raise ProjectError(f"{path} is already a project; open it, or choose another folder")
    if not path.is_dir():
        return
    creating = f".{db.DB_FILE}.creating"
    leftovers = sorted(
        p.name
        for p in path.iterdir()
        if p.name not in (LOCK_FILE, LABELSTUDIO_CONFIG) and not p.name.startswith(creating)
    )
    if leftovers:
        raise ProjectError(
            f"{path} is not empty ({', '.join(leftovers[:5])}); a project needs a new or empty "
            "folder"
        )


def _remove_database(file: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{file}{suffix}")


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _hold_out(conn: sqlite3.Connection, fraction: float, seed: int) -> None:
    """Mark a seeded stratified ``fraction`` of the labelled items as held out."""
    rows = conn.execute("SELECT item_id, class_id FROM labels ORDER BY item_id").fetchall()
    if not rows:
        raise ConfigError("val_fraction needs initial labels to hold some out")
    ids = np.asarray([i for i, _ in rows], dtype=np.int64)
    _, held = stratified_split(np.asarray([c for _, c in rows]), fraction, seed)
    conn.executemany("UPDATE items SET held_out = 1 WHERE id = ?", [(int(i),) for i in ids[held]])


def _resolve(key: object, by_path: dict[str, int], ids: dict[int, str], images: Path) -> int | None:
    """The item id named by ``key`` (an id, a relative path, an absolute path under the images
    folder, or the digits of an id), or None."""
    if isinstance(key, numbers.Integral) and not isinstance(key, bool):
        return int(key) if int(key) in ids else None
    if not isinstance(key, str):
        return None
    text = key.strip().replace("\\", "/")
    if text in by_path:
        return by_path[text]
    if text.startswith("./") and text[2:] in by_path:
        return by_path[text[2:]]
    if os.path.isabs(text):
        with contextlib.suppress(ValueError):
            return by_path.get(Path(text).relative_to(images).as_posix())
    if text.isdigit() and int(text) in ids:
        return int(text)
    return None


#: the pending batches every item of which is labelled
_COMPLETE = (
    "SELECT b.number FROM batches b WHERE b.closed IS NULL AND NOT EXISTS ("
    "SELECT 1 FROM batch_items bi LEFT JOIN labels l ON l.item_id = bi.item_id "
    "WHERE bi.batch = b.number AND l.item_id IS NULL)"
)


def _apply_labels(
    conn: sqlite3.Connection,
    rows: Sequence[Any],
    *,
    source: str,
    relabel: bool,
    images: Path,
) -> ImportSummary:
    """Check every row, then apply them all, inside the caller's transaction (see
    :meth:`Project.import_labels`)."""
    class_ids: dict[str, int] = dict(conn.execute("SELECT name, id FROM classes"))
    class_names = {v: k for k, v in class_ids.items()}
    by_path: dict[str, int] = dict(conn.execute("SELECT path, id FROM items"))
    ids = {v: k for k, v in by_path.items()}
    current: dict[int, int] = dict(conn.execute("SELECT item_id, class_id FROM labels"))
    problems: list[str] = []
    seen: dict[int, str] = {}
    added: list[tuple[int, int]] = []
    changed: list[tuple[int, int, int]] = []
    unchanged = 0
    for n, row in enumerate(rows, start=1):
        where = getattr(row, "where", "") or f"row {n}"
        if not isinstance(row, (tuple, list)) or len(row) != 2:
            problems.append(f"{where}: {row!r}: not an (id or path, label) pair")
            continue
        key, label = row
        item = _resolve(key, by_path, ids, images)
        if item is None:
            problems.append(f"{where}: {key!r}: unknown item (no item has this id or path)")
            continue
        name = f"item {item} ({ids[item]})"
        if item in seen:
            problems.append(f"{where}: {name}: duplicate: also given at {seen[item]}")
            continue
        seen[item] = where
        text = label.strip() if isinstance(label, str) else label
        if text not in class_ids:
            problems.append(
                f"{where}: {name}: unknown class {label!r} (classes: {', '.join(class_ids)})"
            )
            continue
        new, old = class_ids[text], current.get(item)
        if old is None:
            added.append((item, new))
        elif old == new:
            unchanged += 1
        elif relabel:
            changed.append((item, old, new))
        else:
            problems.append(
                f"{where}: {name}: conflicting relabel: labelled {class_names[old]!r}, this row "
                f"says {text!r} (pass --relabel, or relabel=True, to replace it)"
            )
    if problems:
        raise LabelImportError(
            f"{source}: refused, nothing imported: {len(problems)} offending row(s) of "
            f"{len(rows)}: " + "; ".join(problems),
            problems,
        )
    now = _now()
    conn.executemany(
        "INSERT INTO labels VALUES (?, ?, ?, ?)", [(i, c, source, now) for i, c in added]
    )
    conn.executemany(
        "UPDATE labels SET class_id = ?, source = ?, labelled_at = ? WHERE item_id = ?",
        [(c, source, now, i) for i, _, c in changed],
    )
    conn.executemany(
        "INSERT INTO label_history (item_id, old_class_id, new_class_id, source, changed_at) "
        "VALUES (?, ?, ?, ?, ?)",
        [(i, None, c, source, now) for i, c in added]
        + [(i, o, c, source, now) for i, o, c in changed],
    )
    closed = [n for (n,) in conn.execute(_COMPLETE)]
    conn.executemany("UPDATE batches SET closed = ? WHERE number = ?", [(now, n) for n in closed])
    return ImportSummary(source, len(added), len(changed), unchanged, closed)
