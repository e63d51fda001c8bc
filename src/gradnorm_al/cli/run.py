"""``gradnorm-al run``: Algorithm 1 for one or more strategies, from a preset, a YAML file and
the options on the command line; ``--resume DIR`` continues an interrupted run."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ConfigError
from ..experiment import run_experiment
from ..experiment.config import ExperimentConfig
from ..experiment.presets import load_preset
from ..experiment.runner import read_run_config
from .common import make_log, parse_int

_int = parse_int  # the name _add_run_options uses

RESUME_OPTIONS = {"device", "data_root"}


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
    p.add_argument("--dataset", default=s, help="dataset name (see `gradnorm-al list`)")
    p.add_argument("--model", default=s, help="model name (default: the dataset's default)")
    p.add_argument(
        "--strategy",
        dest="strategies",
        action="append",
        default=s,
        metavar="S",
        help="strategy name; repeat to compare several on the same seeds",
    )
    p.add_argument("--trials", type=_int, default=s, help="number of trials (default 3)")
    p.add_argument(
        "--cycles",
        type=_int,
        default=s,
        help="training cycles, the last without selection (default 7)",
    )
    p.add_argument(
        "--initial-fraction",
        type=float,
        default=s,
        help="initially labelled fraction of the pool (default 0.10)",
    )
    p.add_argument(
        "--budget-fraction",
        type=float,
        default=s,
        help="fraction of the pool labelled per cycle (default 0.05)",
    )
    p.add_argument(
        "--subset-size",
        type=_int,
        default=s,
        help="random unlabelled candidates scored per cycle (default: all)",
    )
    p.add_argument(
        "--pool-size",
        type=_int,
        default=s,
        help="use a fixed seeded random pool of this many training samples (default: all)",
    )
    p.add_argument("--epochs", type=_int, default=s, help="epochs per cycle (default 200)")
    p.add_argument("--lr", type=float, default=s, help="SGD learning rate (default 0.1)")
    p.add_argument("--momentum", type=float, default=s, help="SGD momentum (default 0.9)")
    p.add_argument("--weight-decay", type=float, default=s, help="weight decay (default 5e-4)")
    p.add_argument(
        "--milestones",
        type=_int,
        nargs="+",
        default=s,
        metavar="EPOCH",
        help="epochs at which the lr is multiplied by --gamma (default: 80%% of epochs)",
    )
    p.add_argument("--gamma", type=float, default=s, help="lr decay factor (default 0.1)")
    p.add_argument("--batch-size", type=_int, default=s, help="training batch (default 128)")
    p.add_argument(
        "--num-workers",
        type=_int,
        default=s,
        help="training data loader worker processes for file-backed datasets (default 0)",
    )
    p.add_argument(
        "--score-batch-size",
        type=_int,
        default=s,
        help="batch size for scoring candidates (default 128)",
    )
    p.add_argument(
        "--norm",
        choices=["tensor-sum", "l2"],
        default=s,
        help="gradnorm aggregation: tensor-sum (published code, default) or l2 (Eq. 5)",
    )
    p.add_argument(
        "--reinit-each-cycle",
        action="store_true",
        default=s,
        help="train a fresh model every cycle (default: keep it, as published)",
    )
    p.add_argument(
        "--keep-models",
        action="store_true",
        default=s,
        help="save every cycle's trained model under DIR/models (needed by `analyze "
        "topk-overlap`, `influence` and `gradnorm-decrease`)",
    )
    p.add_argument("--seed", type=_int, default=s, help="trial t uses seed + t (default 0)")
    p.add_argument("--device", default=s, help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--data-root", default=s, metavar="DIR", help="where the dataset files are")
    p.add_argument(
        "--download",
        action="store_true",
        default=s,
        help="download the dataset into --data-root if missing (needs network)",
    )


def add_output_options(p: argparse.ArgumentParser, default_out: str) -> None:
    p.add_argument(
        "--out",
        default=default_out,
        metavar="DIR",
        help=f"run folder to write (default {default_out})",
    )
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars or log lines")


def add_parser(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser("run", help="run Algorithm 1 for one or more strategies")
    _add_run_options(run)
    add_output_options(run, "gradnorm-al-run")
    run.add_argument(
        "--resume",
        metavar="DIR",
        default=argparse.SUPPRESS,
        help="continue the interrupted run in DIR with its own config.yaml (only --device, "
        "--data-root and --quiet may be given with it)",
    )


def execute(args: argparse.Namespace) -> int:
    options = {
        k: v
        for k, v in vars(args).items()
        if k not in ("command", "config", "preset", "resume", "out", "overwrite", "quiet")
    }
    if hasattr(args, "resume"):
        extra = sorted(set(options) - RESUME_OPTIONS) + [
            name for name in ("config", "preset") if hasattr(args, name)
        ]
        if extra or args.overwrite:
            given = ", ".join("--" + n.replace("_", "-") for n in extra or ["overwrite"])
            raise ConfigError(
                f"--resume continues a run with the options in its config.yaml; drop {given}"
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
    result = run_experiment(
        config,
        Path(args.out),
        overwrite=args.overwrite,
        resume=resume,
        progress=not args.quiet,
        log=make_log(args.quiet),
    )
    print(result.table, end="")
    print(
        f"wrote {result.out_dir}/ (results.csv, selections.jsonl, summary.md, curves.png, "
        f"config.yaml) in {result.seconds:.1f}s"
    )
    return 0
