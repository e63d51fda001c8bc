"""``gradnorm-al labelstudio push|pull PROJECT``: a labelling project's pending batches to a
Label Studio server, and its annotations back (:mod:`gradnorm_al.project.labelstudio`)."""

from __future__ import annotations

import argparse

from .common import OneLineParser


def add_parser(sub: argparse._SubParsersAction) -> None:
    labelstudio = sub.add_parser(
        "labelstudio",
        help="send a labelling project's pending batches to a Label Studio server (push) and "
        "import the annotations made there (pull)",
    )
    actions = labelstudio.add_subparsers(
        dest="action", metavar="ACTION", parser_class=OneLineParser
    )
    actions.required = True
    push = actions.add_parser(
        "push",
        help="create (once) the Label Studio project and add the unanswered items of the "
        "pending batches as tasks, the model's guess pre-selected; items already there are "
        "not sent again",
    )
    pull = actions.add_parser(
        "pull",
        help="import the finished annotations (the last one of each task that was not "
        "skipped) as labels, all or none",
    )
    for parser in (push, pull):
        parser.add_argument("project", metavar="PROJECT", help="the labelling project's folder")
        parser.add_argument(
            "--url",
            default=None,
            help="the Label Studio server (default: $LABEL_STUDIO_URL, else http://localhost:8080)",
        )
        parser.add_argument(
            "--token",
            default=None,
            help="an API token from Account & Settings in Label Studio (default: "
            "$LABEL_STUDIO_API_KEY)",
        )
    push.add_argument(
        "--title", default=None, help="the new Label Studio project's title (first push only)"
    )
    push.add_argument(
        "--document-root",
        metavar="DIR",
        default=None,
        help="the server's LOCAL_FILES_DOCUMENT_ROOT, a folder above the images: images are "
        "sent as /data/local-files/?d=<path below DIR> (default: $LOCAL_FILES_DOCUMENT_ROOT, "
        "else /)",
    )
    pull.add_argument(
        "--relabel",
        action="store_true",
        help="let an annotation change a label the project already holds (refused otherwise)",
    )


def execute(args: argparse.Namespace) -> int:
    from ..project import Project, labelstudio

    project = Project.open(args.project)
    if args.action == "push":
        pushed = labelstudio.push(
            project,
            url=args.url,
            token=args.token,
            title=args.title,
            document_root=args.document_root,
        )
        batches = ", ".join(str(n) for n in pushed.batches) or "none"
        print(
            f"pushed {pushed.pushed} task(s) to Label Studio project {pushed.project_id}"
            f"{' (new)' if pushed.created else ''}; {pushed.already} already there; "
            f"pending batches: {batches}"
        )
        print(f"annotate at {pushed.url}/projects/{pushed.project_id}/data")
        return 0
    pulled = labelstudio.pull(project, url=args.url, token=args.token, relabel=args.relabel)
    print(
        f"imported {pulled.imported} label(s) from Label Studio project {pulled.project_id} "
        f"({pulled.tasks} task(s): {pulled.unchanged} already imported, {pulled.unanswered} "
        f"not answered yet{f', {pulled.foreign} not made by push' if pulled.foreign else ''})"
    )
    return 0
