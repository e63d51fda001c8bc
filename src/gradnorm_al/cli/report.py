"""``gradnorm-al report``: one report (report.html, curves.png, summary.md) over one or more run
folders."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ConfigError
from ..experiment import write_report


def add_parser(sub: argparse._SubParsersAction) -> None:
    report = sub.add_parser(
        "report",
        help="one report (report.html, curves.png, summary.md) over one or more run folders",
    )
    report.add_argument(
        "runs", nargs="+", metavar="DIR", help="run folders (different strategies, same seeds)"
    )
    report.add_argument(
        "--out", metavar="DIR", default=None, help="where to write (default: the single DIR)"
    )


def execute(args: argparse.Namespace) -> int:
    if args.out is None and len(args.runs) > 1:
        raise ConfigError("several run folders are merged into a new one: give --out DIR")
    out = Path(args.out if args.out is not None else args.runs[0])
    result = write_report([Path(r) for r in args.runs], out)
    print(result.table, end="" if result.table.endswith("\n") else "\n")
    print(f"wrote {out}/ (report.html, curves.png, summary.md)")
    return 0
