"""``gradnorm-al presets``: the shipped experiment presets, one line each."""

from __future__ import annotations

import argparse

from ..experiment.presets import preset_description, preset_names


def add_parser(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("presets", help="list the shipped experiment presets")


def execute(args: argparse.Namespace) -> int:
    names = preset_names()
    width = max(len(n) for n in names)
    for name in names:
        print(f"{name:<{width}}  {preset_description(name)}")
    return 0
