"""Appendix A.2 of the paper: the share of the samples selected at a cycle whose gradient norm
fell once the next model was trained with them. Needs the run's per-cycle models
(``run --keep-models``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Subset

from ..errors import RunDirectoryError
from ..strategies.gradnorm import gradnorm_scores
from .base import DEVICE, NORM, QUIET, Log, progress, register_analysis
from .replay import RunReader, loss_scheme, on_replayed_run
from .tables import pivot, plus_minus, summarise_trials, to_csv, write_tables


def gradnorm_decrease(
    reader: RunReader, norm: str | None = None, log: Log | None = None
) -> list[dict[str, Any]]:
    """Appendix A.2: per strategy, trial and cycle c whose next model T^{c+1} exists, the
    fraction of the samples selected at c whose gradient norm of the scheme's loss is lower at
    T^{c+1} (trained with them) than at T^c (when selected), with both mean norms. On a
    segmentation run the loss is per pixel, reduced per image with the run's ``reduction``, as
    the run scored."""
    reader.require_models()
    norm = norm or reader.config.norm
    batch = reader.config.score_batch_size
    out = []
    for strategy in reader.strategies:
        scheme = loss_scheme(reader, strategy)
        for trial in reader.trials(strategy):
            views = reader.cycles(strategy, trial)
            for view, after in zip(views, views[1:]):
                if view.selected is None:
                    continue
                progress(log, f"gradnorm-decrease {strategy} t{trial} c{view.cycle}")
                data = Subset(reader.bundle.train_eval, view.selected.tolist())
                norms = [
                    gradnorm_scores(
                        reader.model(strategy, trial, c),
                        data,
                        scheme=scheme,
                        norm=norm,
                        batch_size=batch,
                        reduction=reader.task.reduction,
                    ).numpy()
                    for c in (view.cycle, after.cycle)
                ]
                out.append(
                    {
                        "strategy": strategy,
                        "trial": trial,
                        "cycle": view.cycle,
                        "num_labeled": len(view.labeled),
                        "scheme": scheme,
                        "selected": len(view.selected),
                        "decreased": float(np.mean(norms[1] < norms[0])),
                        "norm_at_selection": float(norms[0].mean()),
                        "norm_after_training": float(norms[1].mean()),
                    }
                )
    if not out:
        raise RunDirectoryError(
            f"{reader.run_dir} has no selection followed by a trained cycle yet"
        )
    return out


def write_gradnorm_decrease(
    reader: RunReader,
    out_dir: Path | None = None,
    norm: str | None = None,
    log: Log | None = None,
) -> str:
    """Write analysis/gradnorm_decrease.{md,csv}; return the markdown."""
    records = gradnorm_decrease(reader, norm, log)
    summary = summarise_trials(
        records,
        ("decreased", "norm_at_selection", "norm_after_training"),
        ("num_labeled", "scheme"),
    )

    def cell(r: dict[str, Any]) -> str:
        return (
            f"{plus_minus(100 * r['decreased_mean'], 100 * r['decreased_std'])}% "
            f"({r['norm_at_selection_mean']:.3g} → {r['norm_after_training_mean']:.3g})"
        )

    md = (
        "# Gradient-norm decrease of the selected samples (Appendix A.2)\n\n"
        "Per cycle c: the share of the samples selected at c whose gradient norm of the "
        "scheme's loss (entropy, equal to the published expected loss, unless the strategy is a "
        f"gradnorm scheme; {norm or reader.config.norm} norm) is lower under T^(c+1), trained "
        "with them, than under T^c, which selected them; mean ± std over trials, then the mean "
        "norm before → after.\n\n" + pivot(summary, cell)
    )
    write_tables(reader.run_dir, out_dir, "gradnorm_decrease", md, to_csv(records))
    return md


run_gradnorm_decrease = register_analysis(
    "gradnorm-decrease",
    "selected samples whose gradient norm fell after training (A.2)",
    options=(DEVICE, QUIET, NORM),
)(on_replayed_run(write_gradnorm_decrease))
