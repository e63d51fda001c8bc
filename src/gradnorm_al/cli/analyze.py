"""``gradnorm-al analyze ANALYSIS DIR``: the paper's analyses over a run folder, one subcommand
per entry of the analyses registry with the options the analysis declares."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..analyses import ANALYSES, QUIET, Option
from .common import OneLineParser, argument_type, make_log


def add_parser(sub: argparse._SubParsersAction) -> None:
    analyze = sub.add_parser("analyze", help="the paper's analyses over a run folder")
    kinds = analyze.add_subparsers(dest="analysis", metavar="ANALYSIS", parser_class=OneLineParser)
    kinds.required = True
    for name in ANALYSES:
        analysis = ANALYSES.get(name)
        kind = kinds.add_parser(name, help=analysis.help)
        kind.add_argument("run", metavar="DIR", help="a run folder")
        kind.add_argument(
            "--out", metavar="DIR", default=None, help="where to write (default DIR/analysis)"
        )
        for option in analysis.options:
            _add_option(kind, option)


def _add_option(parser: argparse.ArgumentParser, option: Option) -> None:
    if option.switch:
        parser.add_argument(option.flag, dest=option.dest, action="store_true", help=option.help)
        return
    extra = {}
    if option.parse is not None:
        extra["type"] = argument_type(option.parse)
    if option.choices is not None:
        extra["choices"] = list(option.choices)
    parser.add_argument(
        option.flag, dest=option.dest, default=option.default, help=option.help, **extra
    )


def execute(args: argparse.Namespace) -> int:
    analysis = ANALYSES.get(args.analysis)
    values = {option.dest: getattr(args, option.dest) for option in analysis.options}
    log = make_log(values.pop(QUIET.dest, False))  # printing is the command line's business
    out = Path(args.out) if args.out is not None else None
    print(analysis.run(Path(args.run), out, log, **values), end="")
    return 0
