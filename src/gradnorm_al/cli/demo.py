"""``gradnorm-al demo``: the embedded demos (a few minutes on a CPU): digits classification,
``--task segmentation`` on the offline brain MRI slices, or ``--task subtomogram`` on simulated
cryo-ET subtomograms."""

from __future__ import annotations

import argparse

from ..experiment.config import DEMO_TASKS, demo_config
from .run import add_output_options, run_config


def add_parser(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser(
        "demo",
        help="run an embedded demo (a few minutes on a CPU): digits classification, "
        "--task segmentation or --task subtomogram",
    )
    demo.add_argument(
        "--task",
        choices=DEMO_TASKS,
        default="classification",
        help="classification: six strategies on digits (the default); segmentation: random, "
        "entropy and entropy-gradnorm on the offline brain MRI slices; subtomogram: the same "
        "three on simulated 3-D cryo-ET subtomograms",
    )
    add_output_options(demo, "gradnorm-al-demo")


def execute(args: argparse.Namespace) -> int:
    if args.task != "classification" and not hasattr(args, "out"):
        args.out = f"gradnorm-al-demo-{args.task}"
    return run_config(demo_config(args.task), args)
