"""``gradnorm-al list``: the registered datasets, models, strategies and samplers."""

from __future__ import annotations

import argparse

from ..data import DATASETS
from ..models import MODELS
from ..strategies import SAMPLERS, STRATEGIES


def add_parser(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("list", help="list the known datasets, models, strategies and samplers")


def execute(args: argparse.Namespace) -> int:
    registries = (
        ("datasets", DATASETS),
        ("models", MODELS),
        ("strategies", STRATEGIES),
        ("samplers", SAMPLERS),
    )
    for kind, registry in registries:
        print(f"{kind}: {', '.join(registry.names())}")
    print(
        "combine a scoring strategy with a sampler as SCORER@SAMPLER, e.g. entropy-gradnorm@power"
    )
    return 0
