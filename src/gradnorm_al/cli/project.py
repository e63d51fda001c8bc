"""The labelling-project commands: ``init``, ``train``, ``query``, ``import-labels`` and
``status`` (see :mod:`gradnorm_al.project`). Each is a :class:`Command` with ``add_parser`` and
``execute``, like the other command modules."""

from __future__ import annotations

import argparse
import json
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ProjectError
from ..options import add_arguments, from_mapping
from ..project import Project, ProjectTrainConfig
from ..project.project import DEFAULT_IMAGE_SIZE, DEFAULT_MODEL
from .common import parse_float, parse_int


@dataclass(frozen=True)
class Command:
    add_parser: Callable[[argparse._SubParsersAction], None]
    run: Callable[[argparse.Namespace], int]

    def execute(self, args: argparse.Namespace) -> int:
        try:
            return self.run(args)
        except sqlite3.Error as err:  # a full disk, a read-only folder, a damaged file
            raise ProjectError(f"project {args.project}: database error: {err}") from None


def _project_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("project", metavar="PROJECT", help="the project folder")


# ------------------------------------------------------------------ init


def _add_init(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "init", help="create a labelling project over a folder of images (PROJECT/project.db)"
    )
    _project_argument(p)
    p.add_argument(
        "--images", required=True, metavar="DIR", help="folder of images (read recursively)"
    )
    p.add_argument(
        "--labels",
        metavar="FILE",
        help="first labels: a CSV `id,label` or `path,label` (paths relative to --images), or "
        "a Label Studio JSON export",
    )
    p.add_argument(
        "--classes",
        metavar="A,B,C",
        help="class names, comma-separated, in the model's output order (default: the sorted "
        "labels of --labels)",
    )
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        metavar="NAME",
        help="a model of `gradnorm-al list`, torchvision:NAME (any torchvision classifier, its "
        f"last layer replaced), or module:factory (called with num_classes) (default: "
        f"{DEFAULT_MODEL})",
    )
    p.add_argument(
        "--weights",
        metavar="FILE",
        help="initial weights: a local state-dict file (loaded with weights_only=True; its last "
        "linear layer is replaced)",
    )
    p.add_argument(
        "--image-size",
        type=parse_int,
        default=DEFAULT_IMAGE_SIZE,
        metavar="S",
        help=f"images are resized to S x S (default: {DEFAULT_IMAGE_SIZE}; 224 for pretrained "
        "torchvision weights)",
    )
    p.add_argument(
        "--val-fraction",
        type=parse_float,
        default=0.0,
        metavar="F",
        help="hold out this fraction of the first labels (per class, seeded) for validation; "
        "`status` reports the held-out accuracy (default: 0)",
    )
    p.add_argument("--seed", type=parse_int, default=0, help="seed of every random choice")
    p.add_argument(
        "--image-url",
        metavar="PREFIX",
        help="Label Studio tasks refer to images as PREFIX + relative path (e.g. "
        "'/data/local-files/?d=photos/'; default: the absolute file path)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _execute_init(args: argparse.Namespace) -> int:
    classes = None
    if args.classes is not None:
        classes = [c.strip() for c in args.classes.split(",")]
    project = Project.create(
        args.project,
        args.images,
        classes=classes,
        labels=args.labels,
        model=args.model,
        image_size=args.image_size,
        val_fraction=args.val_fraction,
        seed=args.seed,
        weights=args.weights,
        image_url=args.image_url,
        progress=not args.quiet,
    )
    with project:
        status = project.status()
    print(
        f"created project {args.project}: {status['items']} images under {status['images']}, "
        f"{len(status['classes'])} classes ({', '.join(status['classes'])}), "
        f"{status['labelled']} labelled to train on, {status['held_out']} held out; model "
        f"{status['model']} at {status['image_size']}x{status['image_size']}"
    )
    print(f"next: gradnorm-al train {args.project}")
    return 0


# ------------------------------------------------------------------ train


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the next round's model on the labelled images")
    _project_argument(p)
    add_arguments(p, ProjectTrainConfig)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument(
        "--strategy",
        metavar="S",
        help="train the model as strategy S needs (mc-dropout, ll4al change training); "
        "needed before querying with such a strategy",
    )
    p.add_argument(
        "--fresh",
        action="store_true",
        help="start from a fresh model (default: from the last round's model)",
    )
    p.add_argument(
        "--weights", metavar="FILE", help="start from these weights (a fresh model; as for init)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _execute_train(args: argparse.Namespace) -> int:
    given = {
        k: v
        for k, v in vars(args).items()
        if k not in ("command", "project", "device", "strategy", "fresh", "weights", "quiet")
    }
    config = from_mapping(ProjectTrainConfig, given)
    with Project.open(args.project) as project:
        rnd = project.train(
            config=config,
            device=args.device,
            strategy=args.strategy,
            fresh=args.fresh,
            weights=args.weights,
            progress=not args.quiet,
        )
    held = (
        "no held-out split"
        if rnd.heldout_accuracy is None
        else f"held-out accuracy {rnd.heldout_accuracy:.3f}"
    )
    print(
        f"round {rnd.number}: trained on {rnd.num_labelled} labelled images; training accuracy "
        f"{rnd.train_accuracy:.3f}, {held}; model {rnd.model_file}"
    )
    return 0


# ------------------------------------------------------------------ query


def _add_query(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "query", help="pick the unlabelled images worth labelling next (a batch for annotators)"
    )
    _project_argument(p)
    p.add_argument(
        "--budget", type=parse_int, required=True, metavar="K", help="how many images to pick"
    )
    p.add_argument(
        "--strategy",
        default="entropy-gradnorm",
        metavar="S",
        help="any strategy of `gradnorm-al list` (SCORER@SAMPLER too) (default: entropy-gradnorm)",
    )
    p.add_argument(
        "--requery",
        action="store_true",
        help="offer images of pending (unanswered) batches again",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument(
        "--batch-size",
        type=parse_int,
        default=128,
        metavar="B",
        help="images per forward/backward pass when scoring (default: 128)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _execute_query(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    with Project.open(args.project) as project:
        batch = project.query(
            args.budget,
            args.strategy,
            args.requery,
            device=args.device,
            batch_size=args.batch_size,
            progress=not args.quiet,
        )
    print(
        f"batch {batch.number}: {len(batch.items)} images picked by {batch.strategy} with round "
        f"{batch.round}'s model: {batch.path_csv} and {batch.path_tasks} (Label Studio tasks)"
    )
    print(f"when answered: gradnorm-al import-labels {args.project} ANSWERS.csv|EXPORT.json")
    return 0


# ------------------------------------------------------------------ import-labels


def _add_import(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import-labels",
        help="import answers: a CSV id,label (or path,label) or a Label Studio JSON export; "
        "all rows or none",
    )
    _project_argument(p)
    p.add_argument("file", metavar="FILE", help="the labels file")
    p.add_argument(
        "--relabel",
        action="store_true",
        help="replace labels that differ from the file's (the old ones stay in the history)",
    )


def _execute_import(args: argparse.Namespace) -> int:
    with Project.open(args.project) as project:
        summary = project.import_file(args.file, relabel=args.relabel)
    closed = (
        f"; closed batch(es) {', '.join(map(str, summary.closed_batches))}"
        if summary.closed_batches
        else ""
    )
    print(
        f"imported {Path(args.file).name}: {summary.added} added, {summary.relabelled} "
        f"relabelled, {summary.unchanged} unchanged{closed}"
    )
    return 0


# ------------------------------------------------------------------ status


def _add_status(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="labels per class, rounds, pending batches")
    _project_argument(p)
    p.add_argument("--json", action="store_true", help="print the status as JSON")


def status_text(status: dict[str, Any]) -> str:
    """The status of :meth:`Project.status` as lines for people."""
    lines = [
        f"project {status['project']}: {status['items']} images, model {status['model']} at "
        f"{status['image_size']}x{status['image_size']}",
        f"labelled {status['labelled']}, held out {status['held_out']}, unlabelled "
        f"{status['unlabelled']}",
        "class: labelled (held out)",
    ]
    width = max(len(c) for c in status["classes"])
    for name, n in status["per_class"].items():
        lines.append(f"  {name:<{width}}  {n['labelled']} ({n['held_out']})")
    if not status["rounds"]:
        lines.append("rounds: none yet")
    for r in status["rounds"]:
        held = "-" if r["heldout_accuracy"] is None else f"{r['heldout_accuracy']:.3f}"
        lines.append(
            f"round {r['number']}: {r['num_labelled']} labelled, training accuracy "
            f"{r['train_accuracy']:.3f}, held-out accuracy {held}"
        )
    pending = status["pending_batches"]
    lines.append(
        f"batches: {len(pending)} pending, {status['closed_batches']} answered"
        + "".join(
            f"\n  batch {b['number']} ({b['strategy']}, round {b['round']}): "
            f"{b['answered']}/{b['items']} answered"
            for b in pending
        )
    )
    if status["heldout_accuracy"] is not None:
        lines.append(f"held-out accuracy of the last model: {status['heldout_accuracy']:.3f}")
    return "\n".join(lines)


def _execute_status(args: argparse.Namespace) -> int:
    with Project.open(args.project) as project:
        status = project.status()
    print(json.dumps(status, indent=1) if args.json else status_text(status))
    return 0


init = Command(_add_init, _execute_init)
train = Command(_add_train, _execute_train)
query = Command(_add_query, _execute_query)
import_labels = Command(_add_import, _execute_import)
status = Command(_add_status, _execute_status)
