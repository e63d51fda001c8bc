"""Atomic file writes: write a temporary file in the same folder, fsync, then rename over.

A crash at any point leaves either the old file or the new one, never a torn file. The file gets
the permissions a plain ``open`` would give (``0o666`` less the umask), not ``mkstemp``'s
``0o600``. A temporary file left behind by a kill is named ``.<name>.<random>.tmp``;
:func:`remove_temporaries` clears them. An operating-system error (read-only folder, disk full,
permission denied) becomes one :class:`~gradnorm_al.errors.WriteError` naming the file; the old
file, if any, is left as it was.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from .errors import WriteError

_TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp$")


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it; set back at once
    os.umask(mask)
    return mask


def _reason(err: OSError) -> str:
    return err.strerror or str(err)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs) -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; on success it replaces ``path`` at once.

    An ``OSError`` while creating, writing or renaming raises :class:`WriteError`
    (``cannot write PATH: reason``) after removing the temporary file.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode, **kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        _discard(tmp)
        raise WriteError(f"cannot write {path}: {_reason(err)}") from None
    except BaseException:
        _discard(tmp)
        raise


def _discard(tmp: str | None) -> None:
    if tmp is not None:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8", newline="") as fh:
        fh.write(text)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def is_temporary(name: str) -> bool:
    """Whether ``name`` is a temporary file :func:`atomic_open` makes."""
    return bool(_TEMPORARY.match(name))


def remove_temporaries(folder: str | Path, recursive: bool = True) -> list[Path]:
    """Delete the temporary files a killed writer left in ``folder`` (and its subfolders); the
    paths removed. Only call it while holding the folder's lock: a live writer's temporary file
    looks the same."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = folder.rglob(".*.tmp") if recursive else folder.glob(".*.tmp")
    removed = []
    for path in found:
        if path.is_file() and is_temporary(path.name):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed
