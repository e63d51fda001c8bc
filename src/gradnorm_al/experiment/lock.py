"""The lock of a run folder: one writer at a time, for the life of the process.

``fcntl.flock`` on ``DIR/.gradnorm-al.lock``: the operating system drops it when the process ends,
however it ends (``kill -9`` included), so a lock never outlives its holder and never needs
clearing by hand. The holder writes who it is (pid, host, command, start time) into the file, and a
refused writer names it. :func:`run_lock` guards a run folder, :func:`folder_lock` any folder
(a labelling project's).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import RunDirectoryError, RunLockedError, WriteError

LOCK_FILE = ".gradnorm-al.lock"


def _holder() -> str:
    command = " ".join(["gradnorm-al", *sys.argv[1:]]) if sys.argv else "python"
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return f"pid {os.getpid()} on {socket.gethostname()} ({command}), since {started}"


@contextlib.contextmanager
def folder_lock(folder: str | Path, refused: Callable[[str], Exception]) -> Iterator[Path]:
    """Hold the lock of ``folder`` (created if missing) for the ``with`` block.

    Raises ``refused(holder)`` (an error naming the holder) when another process has it.
    """
    folder = Path(folder)
    path = folder / LOCK_FILE
    if folder.exists() and not folder.is_dir():
        raise RunDirectoryError(f"output path {folder} exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise WriteError(f"cannot use output folder {folder}: {err.strerror or err}") from None
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise WriteError(f"cannot write {path}: {err.strerror or err}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
            raise refused(holder) from None
        with contextlib.suppress(OSError):  # who holds it is informative only (a full disk)
            os.ftruncate(fd, 0)
            os.pwrite(fd, (_holder() + "\n").encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock


def run_lock(folder: str | Path) -> contextlib.AbstractContextManager[Path]:
    """Hold the lock of the run folder ``folder`` (created if missing) for the ``with`` block.

    Raises :class:`RunLockedError` naming the holder when another process has it.
    """

    def refused(holder: str) -> RunLockedError:
        return RunLockedError(
            f"run folder {folder} is in use by {holder}; wait for it to finish or stop it, "
            "or choose another --out"
        )

    return folder_lock(folder, refused)
