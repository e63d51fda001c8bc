"""``gradnorm-al report``: read run folders back and merge them into one report.

Reading the run-folder format (results.csv, config.yaml) lives here, next to the code that writes
it; merging and rendering are :mod:`gradnorm_al.reports`'s, which read no file.
"""

from __future__ import annotations

import csv
from pathlib import Path

import yaml

from ..errors import ConfigError, RunDirectoryError
from ..reports.html import ReportResult, write_merged_report
from ..reports.merge import RunFolder, merge_runs
from .config import ExperimentConfig
from .results import RESULT_COLUMNS, RESULTS_FILE, read_results
from .runner import CONFIG_FILE

_DEFAULTS = ExperimentConfig().to_dict()  # for keys a config.yaml lacks


def load_run_folder(path: str | Path) -> RunFolder:
    """Read results.csv and config.yaml of a run folder; one-line errors for anything unusable."""
    path = Path(path)
    if not path.is_dir():
        what = "is not a folder" if path.exists() else "does not exist"
        raise RunDirectoryError(f"run folder {path} {what}; give folders made by `gradnorm-al run`")
    for name in (RESULTS_FILE, CONFIG_FILE):
        if not (path / name).is_file():
            raise RunDirectoryError(f"{path} has no {name}; give folders made by `gradnorm-al run`")
    text = (path / CONFIG_FILE).read_text(encoding="utf-8")
    try:
        config = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "parse error"
        raise ConfigError(f"{path / CONFIG_FILE} is not valid YAML: {first}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path / CONFIG_FILE} must hold a mapping of options")
    with open(path / RESULTS_FILE, newline="", encoding="utf-8") as fh:
        header = next(csv.reader(fh), [])
    missing = [c for c in RESULT_COLUMNS if c not in header]
    if missing:
        raise RunDirectoryError(
            f"{path / RESULTS_FILE} lacks column(s) {', '.join(missing)}; is it a gradnorm-al "
            "results file?"
        )
    try:
        rows = read_results(path / RESULTS_FILE)
    except ValueError as err:
        raise RunDirectoryError(f"{path / RESULTS_FILE} is malformed: {err}") from None
    for i, row in enumerate(rows, start=2):
        if any(row[c] is None for c in RESULT_COLUMNS if c != "select_seconds"):
            raise RunDirectoryError(f"{path / RESULTS_FILE} line {i} has an empty value")
    return RunFolder(path, config, text, rows, _DEFAULTS)


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
