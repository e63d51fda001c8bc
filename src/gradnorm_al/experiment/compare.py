"""``gradnorm-al report``: read run folders back and merge them into one report.

Reading the run-folder format (results.csv, config.yaml) lives here, next to the code that writes
it; merging and rendering are :mod:`gradnorm_al.reports`'s, which read no file.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import RunDirectoryError
from ..reports.html import ReportResult, write_merged_report
from ..reports.merge import RunFolder, merge_runs
from .config import ExperimentConfig
from .results import RESULTS_FILE, SELECTIONS_FILE, read_results, read_selections
from .runner import CONFIG_FILE

_DEFAULTS = ExperimentConfig().to_dict()  # for keys a config.yaml lacks


def load_run_folder(path: str | Path) -> RunFolder:
    """Read config.yaml and results.csv of a run folder (and check its selections.jsonl); one-line
    errors for anything unusable."""
    path = Path(path)
    if not path.is_dir():
        what = "is not a folder" if path.exists() else "does not exist"
        raise RunDirectoryError(f"run folder {path} {what}; give folders made by `gradnorm-al run`")
    for name in (RESULTS_FILE, CONFIG_FILE):
        if not (path / name).is_file():
            raise RunDirectoryError(f"{path} has no {name}; give folders made by `gradnorm-al run`")
    # the readers check every value and name the file and line of the first bad one
    config = ExperimentConfig.from_yaml(path / CONFIG_FILE)
    text = (path / CONFIG_FILE).read_text(encoding="utf-8")
    rows = read_results(path / RESULTS_FILE, config)
    if (path / SELECTIONS_FILE).is_file():  # not reported on, but part of the run: checked too
        read_selections(path / SELECTIONS_FILE)
    return RunFolder(path, config.to_dict(), text, rows, _DEFAULTS)


def write_report(run_dirs: list[Path], out_dir: Path) -> ReportResult:
    """Merge the run folders ``run_dirs`` and write report.html, summary.md and curves.png.

    report.html is self-contained (inline CSS, the plot embedded as base64). Raises
    RunDirectoryError / ConfigError (one line) for unusable folders or runs that cannot be
    compared (see :func:`merge_runs`).
    """
    paths = [Path(p) for p in run_dirs]
    resolved = [p.resolve() for p in paths]
    for i, p in enumerate(resolved):
        if p in resolved[:i]:
            raise RunDirectoryError(f"run folder {paths[i]} is given twice")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise RunDirectoryError(f"output path {out_dir} exists and is not a folder")
    if len(paths) > 1 and out_dir.resolve() in resolved:
        raise RunDirectoryError(
            f"{out_dir} is one of the merged run folders; its summary.md and curves.png would be "
            "replaced by the merged ones; choose another output folder"
        )
    runs = [load_run_folder(p) for p in paths]
    return write_merged_report(merge_runs(runs), out_dir)
