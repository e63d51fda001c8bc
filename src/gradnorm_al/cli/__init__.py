"""The ``gradnorm-al`` command: argument parsing, printing and exit codes only, one module per
command (:mod:`.demo`, :mod:`.run`, :mod:`.list`, :mod:`.presets`, :mod:`.report`,
:mod:`.analyze`, :mod:`.simulate_subtomograms`), each with ``add_parser(subparsers)`` and
``execute(args) -> exit code``; :mod:`.project` holds the labelling-project commands (``init``,
``train``, ``query``, ``import-labels``, ``status``) as objects with the same two functions."""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence

from .. import distributed
from ..errors import GradnormALError
from . import analyze, demo, labelstudio, presets, project, report, run, simulate_subtomograms
from . import list as list_command
from .common import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE, OneLineParser, print_error

COMMANDS = {
    "demo": demo,
    "run": run,
    "list": list_command,
    "presets": presets,
    "report": report,
    "analyze": analyze,
    "simulate-subtomograms": simulate_subtomograms,
    "init": project.init,
    "train": project.train,
    "query": project.query,
    "import-labels": project.import_labels,
    "status": project.status,
    "labelstudio": labelstudio,
}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="gradnorm-al",
        description="Deep active learning by per-sample gradient norms (Wang et al., AAAI 2022).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    sub.required = True
    for command in COMMANDS.values():
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its exit status. A process in torchrun's group ends here (see
    :func:`gradnorm_al.distributed.exit_process`)."""
    args = build_parser().parse_args(argv)
    try:
        code = COMMANDS[args.command].execute(args)
    except GradnormALError as exc:
        if distributed.reports(exc):  # under torchrun: an error all processes share, once
            print_error(distributed.label(str(exc)))
        code = EXIT_USAGE
    except OSError as exc:  # not one of ours: the operating system refused (disk full, ...)
        where = f" {exc.filename}" if exc.filename else ""
        print_error(distributed.label(f"cannot access{where}: {exc.strerror or exc}"))
        code = EXIT_USAGE
    except KeyboardInterrupt:
        print("gradnorm-al: interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    except Exception as exc:
        if not distributed.launched():
            raise
        if not distributed.lost_peer(exc):  # the cause's traceback; then what it means
            traceback.print_exc()
        print_error(distributed.failure_message(exc))
        code = EXIT_FAILURE
    else:
        distributed.shutdown()  # every process got here: meet, then leave
        return distributed.exit_process(code)
    # an error: leave the process group without waiting for the others (one may be gone); a
    # process that exits still in the group can abort in its native teardown
    distributed.shutdown(wait=False)
    return distributed.exit_process(code)


__all__ = ["build_parser", "main"]
