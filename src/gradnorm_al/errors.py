"""The package's own exception types.

Every error a user can cause (bad option, missing data, impossible budget) raises a subclass of
:class:`GradnormALError` with a one-line message that names the problem and the fix; the CLI prints
that line and exits with status 2.
"""

from __future__ import annotations


class GradnormALError(Exception):
    """Base class of every user-facing error raised by gradnorm-al."""


class ConfigError(GradnormALError, ValueError):
    """An option or configuration value is invalid."""


class UnknownNameError(ConfigError, KeyError):
    """A dataset, model or strategy name is not in its registry."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DataError(GradnormALError):
    """Data is missing, malformed, or inconsistent (for example labels out of range)."""


class PoolError(GradnormALError, ValueError):
    """Misuse of the labelled / unlabelled pool (budget too large, index already labelled, ...)."""


class RunDirectoryError(GradnormALError):
    """The output folder cannot be used (for example it already holds another run)."""


class RunLockedError(RunDirectoryError):
    """Another process holds the run folder's lock."""


class ChecksumError(RunDirectoryError):
    """A checkpoint's content does not match the checksum written with it."""


class ProjectError(GradnormALError):
    """A labelling project cannot be used as asked (not a project, a schema this version does not
    read, no model trained yet, ...)."""


class ProjectLockedError(ProjectError):
    """Another process holds the labelling project's lock."""


class LabelImportError(DataError, ValueError):
    """Labels refused as a whole: nothing was imported. ``problems`` holds one line per offending
    row (``<where>: <what>: <why>``); the message lists them all."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = list(problems or [])


class OracleTimeoutError(GradnormALError, TimeoutError):
    """An oracle waited for answers longer than its timeout."""


class WriteError(GradnormALError, OSError):
    """The operating system refused a write (read-only folder, disk full, permission denied)."""


class NonFiniteError(GradnormALError, FloatingPointError):
    """A training loss, a score or a feature is NaN or infinite."""


class SelectionError(GradnormALError):
    """A strategy or sampler returned an invalid selection (wrong count, duplicates, an index
    that was not a candidate)."""


class FileFormatError(DataError, ValueError):
    """A file a user gave or edited (a run folder's results.csv, selections.jsonl or config.yaml,
    a --config file) cannot be used as it is. The message is ``<file>:<line>: <what is wrong>;
    <fix>``, the line counted from 1."""

    def __init__(self, path: object, line: int, problem: str, fix: str) -> None:
        super().__init__(f"{path}:{line}: {problem}; {fix}")
        self.path, self.line, self.problem, self.fix = path, line, problem, fix


class ConfigFileError(FileFormatError, ConfigError):
    """A configuration file holds invalid YAML or an invalid option (the line is named)."""


def read_text(path: object, fix: str, error: type[FileFormatError] = FileFormatError) -> str:
    """The text of the UTF-8 file ``path``; ``error`` naming the line of the first byte that is
    not UTF-8 or is a NUL (a binary file), with ``fix``."""
    with open(path, "rb") as fh:  # type: ignore[call-overload]
        data = fh.read()
    bad = data.find(b"\0")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        bad = err.start if bad < 0 else min(bad, err.start)
    if bad >= 0:
        line = data.count(b"\n", 0, bad) + 1
        raise error(path, line, f"byte {data[bad]:#04x} is not UTF-8 text (a binary file?)", fix)
    return text.removeprefix("\ufeff")
