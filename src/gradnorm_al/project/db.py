"""The project database: one SQLite file, ``PROJECT/project.db``, in WAL mode.

Every change is one transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``): a kill at any moment
leaves the database as it was before the change or as it is after it, never in between.
``PRAGMA user_version`` holds the schema version. :func:`upgrade` brings an older database to
:data:`SCHEMA_VERSION` through :data:`MIGRATIONS` (one function per version step, all in one
transaction) and refuses a database written by a newer gradnorm-al, or one that is not ours.

Schema 1:

``meta(key, value)``
    the project's settings: ``images`` (the absolute images folder), ``model``, ``weights``,
    ``image_size``, ``seed``, ``image_url``, ``created``.
``classes(id, name)``
    class ``id`` is its position in the class list (the model's output index).
``items(id, path, held_out)``
    one image file: a stable integer id (1, 2, ... in the sorted order of the paths at
    ``init``), its path relative to the images folder ('/'-separated), and whether it belongs to
    the held-out validation split (never trained on, never queried).
``labels(item_id, class_id, source, labelled_at)``
    the current label of each labelled item.
``label_history(id, item_id, old_class_id, new_class_id, source, changed_at)``
    every label given, in order (``old_class_id`` NULL for a first label): relabels are kept.
``rounds(number, model_file, strategy, config, num_labelled, train_accuracy, heldout_accuracy,
created)``
    one per ``train``: its model file (relative to the project) and metrics.
``batches(number, round, strategy, csv_file, tasks_file, created, closed)``
    one per ``query``; ``closed`` is NULL while the batch is pending (some item unanswered).
``batch_items(batch, position, item_id, score, predicted_class_id)``
    a batch's items, best first.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import ProjectError

DB_FILE = "project.db"
SCHEMA_VERSION = 1

_SCHEMA_V1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE classes (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
CREATE TABLE items (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,
    held_out INTEGER NOT NULL DEFAULT 0 CHECK (held_out IN (0, 1))
);
CREATE TABLE labels (
    item_id INTEGER PRIMARY KEY REFERENCES items(id),
    class_id INTEGER NOT NULL REFERENCES classes(id),
    source TEXT NOT NULL,
    labelled_at TEXT NOT NULL
);
CREATE TABLE label_history (
    id INTEGER PRIMARY KEY,
    item_id INTEGER NOT NULL REFERENCES items(id),
    old_class_id INTEGER REFERENCES classes(id),
    new_class_id INTEGER NOT NULL REFERENCES classes(id),
    source TEXT NOT NULL,
    changed_at TEXT NOT NULL
);
CREATE TABLE rounds (
    number INTEGER PRIMARY KEY,
    model_file TEXT NOT NULL,
    strategy TEXT,
    config TEXT NOT NULL,
    num_labelled INTEGER NOT NULL,
    train_accuracy REAL,
    heldout_accuracy REAL,
    created TEXT NOT NULL
);
CREATE TABLE batches (
    number INTEGER PRIMARY KEY,
    round INTEGER NOT NULL REFERENCES rounds(number),
    strategy TEXT NOT NULL,
    csv_file TEXT NOT NULL,
    tasks_file TEXT NOT NULL,
    created TEXT NOT NULL,
    closed TEXT
);
CREATE TABLE batch_items (
    batch INTEGER NOT NULL REFERENCES batches(number),
    position INTEGER NOT NULL,
    item_id INTEGER NOT NULL REFERENCES items(id),
    score REAL,
    predicted_class_id INTEGER REFERENCES classes(id),
    PRIMARY KEY (batch, position),
    UNIQUE (batch, item_id)
);
CREATE INDEX batch_items_by_item ON batch_items(item_id);
"""


def _create_v1(conn: sqlite3.Connection) -> None:
    for statement in _SCHEMA_V1.split(";"):
        if statement.strip():
            conn.execute(statement)


#: version v -> the function that turns a database of version v into one of version v + 1,
#: run inside the upgrade's transaction. 0 -> 1 creates the schema in an empty database.
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {0: _create_v1}


def connect(path: Path) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL journal, foreign keys on,
    ``synchronous=FULL`` (a committed change survives a power loss, not only a kill)."""
    try:
        conn = sqlite3.connect(str(path), isolation_level=None, timeout=30.0)
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA journal_mode = WAL")
    except sqlite3.DatabaseError as err:
        raise ProjectError(f"{path} is not a gradnorm-al project database ({err})") from None
    return conn


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction: ``BEGIN IMMEDIATE`` (the write lock at once), ``COMMIT`` when the
    block ends, ``ROLLBACK`` if it raises."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


@contextlib.contextmanager
def snapshot(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One read transaction: every query in the block sees the same committed state."""
    conn.execute("BEGIN")
    try:
        yield conn
    finally:
        conn.execute("COMMIT")


def version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def _tables(conn: sqlite3.Connection) -> list[str]:
    rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
    return [name for (name,) in rows]


def check_version(conn: sqlite3.Connection, path: Path) -> int:
    """The schema version of the database at ``path``; :class:`ProjectError` if this gradnorm-al
    cannot read or upgrade it (a newer version, or tables of a database that is not ours)."""
    try:
        found = version(conn)
        tables = _tables(conn)
    except sqlite3.DatabaseError as err:
        raise ProjectError(f"{path} is not a gradnorm-al project database ({err})") from None
    if found > SCHEMA_VERSION:
        raise ProjectError(
            f"{path} has schema version {found}, written by a newer gradnorm-al; this one reads "
            f"versions up to {SCHEMA_VERSION}: upgrade gradnorm-al to use this project"
        )
    if found == 0 and tables:
        shown = ", ".join(tables[:5]) + (" ..." if len(tables) > 5 else "")
        raise ProjectError(
            f"{path} holds tables ({shown}) but no gradnorm-al schema version: it was not "
            "written by gradnorm-al, or not completely; create the project again with "
            "`gradnorm-al init`"
        )
    return found


def upgrade(conn: sqlite3.Connection, path: Path) -> int:
    """Bring the database to :data:`SCHEMA_VERSION` in one transaction; the version it had."""
    with transaction(conn):
        found = check_version(conn, path)
        for step in range(found, SCHEMA_VERSION):
            MIGRATIONS[step](conn)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION:d}")
    return found


def integrity_problems(conn: sqlite3.Connection) -> list[str]:
    """What ``PRAGMA integrity_check`` and ``foreign_key_check`` find ([] for a sound database)."""
    found = [row[0] for row in conn.execute("PRAGMA integrity_check")]
    problems = [] if found == ["ok"] else found
    for table, rowid, parent, _ in conn.execute("PRAGMA foreign_key_check"):
        problems.append(f"{table} row {rowid} refers to a missing {parent} row")
    return problems
