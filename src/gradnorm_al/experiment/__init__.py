"""Experiments: configs, running every strategy x trial, the results store and reports."""

from .config import ExperimentConfig
from .html_report import ReportResult, write_report
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
