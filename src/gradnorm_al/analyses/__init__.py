"""The paper's analyses over a run folder, behind the :data:`ANALYSES` registry that
``gradnorm-al analyze`` is built from. One module per analysis:

* :mod:`.generalization_gap` (Table 3) and :mod:`.timing` (Appendix A.7) read results.csv only;
* :mod:`.topk_overlap` (Table 1), :mod:`.influence` (Table 2 / Fig. 3) and
  :mod:`.gradnorm_decrease` (Appendix A.2) replay the run with its per-cycle models
  (:class:`RunReader`, ``run --keep-models``).

Shared: :mod:`.base` (the registry, :class:`Option`), :mod:`.tables` (rows, means over trials,
markdown and CSV), :mod:`.replay` (:class:`RunReader`).
"""

from . import generalization_gap, gradnorm_decrease, influence, timing, topk_overlap
from .base import ANALYSES, DEVICE, NORM, QUIET, Analysis, Log, Option, register_analysis
from .replay import CycleView, RunReader

__all__ = [
    "ANALYSES",
    "DEVICE",
    "NORM",
    "QUIET",
    "Analysis",
    "CycleView",
    "Log",
    "Option",
    "RunReader",
    "generalization_gap",
    "gradnorm_decrease",
    "influence",
    "register_analysis",
    "timing",
    "topk_overlap",
]
