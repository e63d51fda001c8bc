"""``gradnorm-al list``: the registered datasets, models and strategies."""

from __future__ import annotations

import argparse

from ..data import DATASETS
from ..models import MODELS
from ..strategies import STRATEGIES


def add_parser(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("list", help="list the known datasets, models and strategies")


def execute(args: argparse.Namespace) -> int:
    for kind, registry in (("datasets", DATASETS), ("models", MODELS), ("strategies", STRATEGIES)):
        print(f"{kind}: {', '.join(registry.names())}")
    return 0
