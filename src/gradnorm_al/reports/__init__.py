"""Reports over results rows: the summary of a run (summary.md, curves.png), paired statistics,
merging run folders and the HTML report. Computation on rows already read: the run-folder files
are read by :mod:`gradnorm_al.experiment`, which writes them.
"""

from .html import ReportResult, write_merged_report
from .merge import IncompleteCurve, MergedRuns, RunFolder, merge_runs
from .stats import PairComparison, compare_all_pairs, compare_pair
from .summary import StrategySummary, area_under_curve, summarise, write_summary

__all__ = [
    "IncompleteCurve",
    "MergedRuns",
    "PairComparison",
    "ReportResult",
    "RunFolder",
    "StrategySummary",
    "area_under_curve",
    "compare_all_pairs",
    "compare_pair",
    "merge_runs",
    "summarise",
    "write_merged_report",
    "write_summary",
]
