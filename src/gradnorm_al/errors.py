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


class WriteError(GradnormALError, OSError):
    """The operating system refused a write (read-only folder, disk full, permission denied)."""


class NonFiniteError(GradnormALError, FloatingPointError):
    """A training loss, a score or a feature is NaN or infinite."""


class SelectionError(GradnormALError):
    """A strategy or sampler returned an invalid selection (wrong count, duplicates, an index
    that was not a candidate)."""
