"""The ``gradnorm-al`` command: argument parsing, printing and exit codes only."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .analyses import ANALYSES, QUIET, Option
from .errors import ConfigError, GradnormALError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(EXIT_USAGE)


def _int(text: str) -> int:
    # ranges are checked in one place, ExperimentConfig.check_types, for the CLI and YAML alike
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


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


def _add_output_options(p: argparse.ArgumentParser, default_out: str) -> None:
    p.add_argument(
        "--out",
        default=default_out,
        metavar="DIR",
        help=f"run folder to write (default {default_out})",
    )
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars or log lines")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="gradnorm-al",
        description="Deep active learning by per-sample gradient norms (Wang et al., AAAI 2022).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    demo = sub.add_parser("demo", help="run the embedded digits demo (a few minutes on a CPU)")
    _add_output_options(demo, "gradnorm-al-demo")
    run = sub.add_parser("run", help="run Algorithm 1 for one or more strategies")
    _add_run_options(run)
    _add_output_options(run, "gradnorm-al-run")
    run.add_argument(
        "--resume",
        metavar="DIR",
        default=argparse.SUPPRESS,
        help="continue the interrupted run in DIR with its own config.yaml (only --device, "
        "--data-root and --quiet may be given with it)",
    )
    sub.add_parser("list", help="list the known datasets, models and strategies")
    sub.add_parser("presets", help="list the shipped experiment presets")
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
    analyze = sub.add_parser("analyze", help="the paper's analyses over a run folder")
    kinds = analyze.add_subparsers(dest="analysis", metavar="ANALYSIS", parser_class=_Parser)
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
    return parser


def _argument_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """The argparse ``type`` for an option declared with ``parse`` (text -> value): integers
    get :func:`_int`'s message, other types (``float``) argparse's own, and a function's
    ValueError becomes the one-line error."""
    if parse is int:
        return _int
    if isinstance(parse, type):
        return parse

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return convert


def _add_option(parser: argparse.ArgumentParser, option: Option) -> None:
    if option.switch:
        parser.add_argument(option.flag, dest=option.dest, action="store_true", help=option.help)
        return
    extra = {}
    if option.parse is not None:
        extra["type"] = _argument_type(option.parse)
    if option.choices is not None:
        extra["choices"] = list(option.choices)
    parser.add_argument(
        option.flag, dest=option.dest, default=option.default, help=option.help, **extra
    )


def _analyze(args: argparse.Namespace) -> int:
    analysis = ANALYSES.get(args.analysis)
    values = {option.dest: getattr(args, option.dest) for option in analysis.options}
    quiet = values.pop(QUIET.dest, False)  # printing is the command line's business

    def log(message: str) -> None:
        if not quiet:
            print(message, file=sys.stderr, flush=True)

    out = Path(args.out) if args.out is not None else None
    print(analysis.run(Path(args.run), out, log, **values), end="")
    return 0


def _run(config, args: argparse.Namespace, resume: bool = False) -> int:
    from .experiment import run_experiment

    def log(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr, flush=True)

    result = run_experiment(
        config,
        Path(args.out),
        overwrite=args.overwrite,
        resume=resume,
        progress=not args.quiet,
        log=log,
    )
    print(result.table, end="")
    print(
        f"wrote {result.out_dir}/ (results.csv, selections.jsonl, summary.md, curves.png, "
        f"config.yaml) in {result.seconds:.1f}s"
    )
    return 0


def _list() -> int:
    from . import DATASETS, MODELS, STRATEGIES

    for kind, registry in (("datasets", DATASETS), ("models", MODELS), ("strategies", STRATEGIES)):
        print(f"{kind}: {', '.join(registry.names())}")
    return 0


def _presets() -> int:
    from .experiment.presets import preset_description, preset_names

    names = preset_names()
    width = max(len(n) for n in names)
    for name in names:
        print(f"{name:<{width}}  {preset_description(name)}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .experiment import write_report

    if args.out is None and len(args.runs) > 1:
        raise ConfigError("several run folders are merged into a new one: give --out DIR")
    out = Path(args.out if args.out is not None else args.runs[0])
    result = write_report([Path(r) for r in args.runs], out)
    print(result.table, end="" if result.table.endswith("\n") else "\n")
    print(f"wrote {out}/ (report.html, curves.png, summary.md)")
    return 0


RESUME_OPTIONS = {"device", "data_root"}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "list":
            return _list()
        if args.command == "presets":
            return _presets()
        if args.command == "report":
            return _report(args)
        if args.command == "analyze":
            return _analyze(args)
        from .experiment.config import ExperimentConfig, demo_config

        if args.command == "demo":
            return _run(demo_config(), args)
        options = {
            k: v
            for k, v in vars(args).items()
            if k not in ("command", "config", "preset", "resume", "out", "overwrite", "quiet")
        }
        if hasattr(args, "resume"):
            from .experiment.runner import read_run_config

            extra = sorted(set(options) - RESUME_OPTIONS) + [
                name for name in ("config", "preset") if hasattr(args, name)
            ]
            if extra or args.overwrite:
                given = ", ".join("--" + n.replace("_", "-") for n in extra or ["overwrite"])
                raise ConfigError(
                    f"--resume continues a run with the options in its config.yaml; drop {given}"
                )
            args.out = args.resume
            return _run(
                ExperimentConfig.from_dict(options, read_run_config(args.resume)), args, True
            )
        base = None
        if hasattr(args, "preset"):
            from .experiment.presets import load_preset

            base = load_preset(args.preset)
        if hasattr(args, "config"):
            base = ExperimentConfig.from_yaml(args.config, base)
        return _run(ExperimentConfig.from_dict(options, base), args)
    except GradnormALError as exc:
        print(f"gradnorm-al: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("gradnorm-al: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
