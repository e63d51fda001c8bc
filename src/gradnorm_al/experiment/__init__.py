"""Experiments: configs and presets, running every strategy x trial (and resuming), the results
store and checkpoints of a run folder, and reading run folders back for a merged report."""

from ..reports import ReportResult
from .compare import write_report
from .config import ExperimentConfig
from .presets import load_preset, preset_names
from .results import RESULT_COLUMNS, read_results
from .runner import ExperimentResult, run_experiment

__all__ = [
    "RESULT_COLUMNS",
    "ExperimentConfig",
    "ExperimentResult",
    "ReportResult",
    "load_preset",
    "preset_names",
    "read_results",
    "run_experiment",
    "write_report",
]
