"""``gradnorm-al demo``: the embedded digits demo (a few minutes on a CPU)."""

from __future__ import annotations

import argparse

from ..experiment.config import demo_config
from .run import add_output_options, run_config


def add_parser(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="run the embedded digits demo (a few minutes on a CPU)")
    add_output_options(demo, "gradnorm-al-demo")


def execute(args: argparse.Namespace) -> int:
    return run_config(demo_config(), args)
