"""The analyses registry: every analysis registers its name, one-line help, command-line options
and the function that runs it over a run folder, so ``gradnorm-al analyze`` needs no code per
analysis.

    @register_analysis("my-table", "what it shows (Table 9)", options=(DEVICE, QUIET))
    def run_my_table(run_dir: Path, out_dir: Path | None, log: Log, *, device: str | None) -> str:
        ...  # write the tables under out_dir (None: run_dir/analysis), return the markdown
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..registry import Registry

#: receives one progress line
Log = Callable[[str], None]


@dataclass(frozen=True)
class Option:
    """One command-line option of an analysis: ``--flag VALUE``, or ``--flag`` alone (``switch``).

    ``parse`` turns the text into the value: ``int``, ``float``, or a function that raises
    ValueError with a one-line message; None keeps the text. ``choices`` limits the text. The
    value reaches the analysis's run function as the keyword :attr:`dest`.
    """

    flag: str
    help: str
    default: Any = None
    parse: Callable[[str], Any] | None = None
    choices: tuple[str, ...] | None = None
    switch: bool = False

    @property
    def dest(self) -> str:
        """The keyword of the value: ``--cg-tol`` -> ``cg_tol``."""
        return self.flag.lstrip("-").replace("-", "_")


@dataclass(frozen=True)
class Analysis:
    """A registered analysis.

    ``run(run_dir, out_dir, log, **options)`` writes its tables under ``out_dir`` (None:
    ``run_dir/analysis``) and returns them as markdown; ``options`` holds the value of every
    :class:`Option` in ``options`` but :data:`QUIET`, which the caller honours through ``log``.
    """

    name: str
    help: str
    run: Callable[..., str]
    options: tuple[Option, ...] = ()


ANALYSES: Registry[Analysis] = Registry("analysis")


def register_analysis(
    name: str, help: str, options: Sequence[Option] = ()
) -> Callable[[Callable[..., str]], Callable[..., str]]:
    """Decorator: register the run function of the analysis ``name`` in :data:`ANALYSES`."""

    def decorator(run: Callable[..., str]) -> Callable[..., str]:
        ANALYSES.register(name)(Analysis(name, help, run, tuple(options)))
        return run

    return decorator


def progress(log: Log | None, message: str) -> None:
    """Send a progress line to ``log``, if any."""
    if log is not None:
        log(message)


# options that several analyses declare
DEVICE = Option("--device", "cpu, cuda or cuda:N (default: the run's device)")
QUIET = Option("--quiet", "no progress lines", switch=True)
NORM = Option(
    "--norm",
    "gradient-norm aggregation (default: the run's --norm)",
    choices=("tensor-sum", "l2"),
)
