"""Experiments: configs, running every strategy x trial, the results store and reports."""

from .config import ExperimentConfig
from .results import RESULT_COLUMNS, read_results
from .runner import ExperimentResult, run_experiment

__all__ = [
    "RESULT_COLUMNS",
    "ExperimentConfig",
    "ExperimentResult",
    "read_results",
    "run_experiment",
]
