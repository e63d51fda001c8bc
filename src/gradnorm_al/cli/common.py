"""What every command shares: the parser whose usage errors are one line, the exit codes, the
parsing of option values and the log helper."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

EXIT_USAGE = 2  # a usage error or a GradnormALError: one line on stderr
EXIT_FAILURE = 1  # under torchrun: a process failed unexpectedly (traceback, then one line)
EXIT_INTERRUPTED = 130  # Ctrl-C


PROG = "gradnorm-al"


def print_error(message: str) -> None:
    """The one error format of every command: ``gradnorm-al: error: ...`` on stderr."""
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line in the common format (no usage dump), exit code
    2, pointing at the help of the (sub)command that refused it."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print_error(f"{message} (see {self.prog} --help)")
        sys.exit(EXIT_USAGE)


def parse_int(text: str) -> int:
    # ranges are checked in one place, ExperimentConfig.check_types, for the CLI and YAML alike
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def parse_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def argument_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """The argparse ``type`` for an option declared with ``parse`` (text -> value): integers
    get :func:`parse_int`'s message, other types (``float``) argparse's own, and a function's
    ValueError becomes the one-line error."""
    if parse is int:
        return parse_int
    if isinstance(parse, type):
        return parse

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return convert


def make_log(quiet: bool) -> Callable[[str], None]:
    """A log that prints each line to stderr at once, or nothing when ``quiet``."""

    def log(message: str) -> None:
        if not quiet:
            print(message, file=sys.stderr, flush=True)

    return log
