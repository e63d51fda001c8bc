"""``gradnorm-al run``: Algorithm 1 for one or more strategies, from a preset, a YAML file and
the options on the command line; ``--resume DIR`` continues an interrupted run."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import distributed
from ..errors import ConfigError
from ..experiment import run_experiment
from ..experiment.config import ExperimentConfig
from ..experiment.presets import load_preset
from ..experiment.runner import RESUMABLE_OPTIONS, read_run_config
from ..options import add_arguments
from .common import make_log

DEFAULT_OUT = "gradnorm-al-run"
_DEFAULT_OUTS: dict[str, str] = {}  # per command: --out when not given


def _add_run_options(p: argparse.ArgumentParser) -> None:
    s = argparse.SUPPRESS  # only options given on the command line override the config file
    p.add_argument(
        "--preset",
        metavar="NAME",
        default=s,
        help="start from a shipped preset (see `gradnorm-al presets`); --config and the options "
        "below override it",
    )
    p.add_argument("--config", metavar="FILE", default=s, help="YAML file holding any option below")
    add_arguments(p, ExperimentConfig)  # one flag per option, derived from its declaration


def add_output_options(p: argparse.ArgumentParser, default_out: str) -> None:
    p.add_argument(
        "--out",
        default=argparse.SUPPRESS,  # so that --resume can tell whether it was given
        metavar="DIR",
        help=f"run folder to write (default {default_out})",
    )
    _DEFAULT_OUTS[p.prog.split()[-1]] = default_out
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars or log lines")


def add_parser(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser("run", help="run Algorithm 1 for one or more strategies")
    _add_run_options(run)
    add_output_options(run, DEFAULT_OUT)
    run.add_argument(
        "--resume",
        metavar="DIR",
        default=argparse.SUPPRESS,
        help="continue the interrupted run in DIR with its own config.yaml (only --device, "
        "--data-root, --download and --quiet may be given with it)",
    )


def execute(args: argparse.Namespace) -> int:
    options = {
        k: v
        for k, v in vars(args).items()
        if k not in ("command", "config", "preset", "resume", "out", "overwrite", "quiet")
    }
    if hasattr(args, "resume"):
        extra = sorted(set(options) - set(RESUMABLE_OPTIONS)) + [
            name for name in ("config", "preset", "out") if hasattr(args, name)
        ]
        if extra or args.overwrite:
            given = ", ".join("--" + n.replace("_", "-") for n in extra or ["overwrite"])
            raise ConfigError(
                f"--resume DIR continues the run in DIR with the options in its config.yaml; "
                f"drop {given}"
            )
        args.out = args.resume
        return run_config(
            ExperimentConfig.from_dict(options, read_run_config(args.resume)), args, True
        )
    base = None
    if hasattr(args, "preset"):
        base = load_preset(args.preset)
    if hasattr(args, "config"):
        base = ExperimentConfig.from_yaml(args.config, base)
    return run_config(ExperimentConfig.from_dict(options, base), args)


def run_config(config: ExperimentConfig, args: argparse.Namespace, resume: bool = False) -> int:
    """Run ``config`` into ``args.out`` and print the summary table and what was written."""
    args.out = getattr(args, "out", None) or _DEFAULT_OUTS[args.command]
    result = run_experiment(
        config,
        Path(args.out),
        overwrite=args.overwrite,
        resume=resume,
        progress=not args.quiet,
        log=make_log(args.quiet),
    )
    if not distributed.is_main():  # under torchrun, rank 0 reports for every process
        return 0
    print(result.table, end="")
    print(
        f"wrote {result.out_dir}/ (results.csv, selections.jsonl, summary.md, curves.png, "
        f"config.yaml) in {result.seconds:.1f}s"
    )
    return 0
