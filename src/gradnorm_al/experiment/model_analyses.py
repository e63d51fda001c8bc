"""The paper's analyses that need the run's per-cycle models (``run --keep-models``): the top-K
overlap with the true-label gradient norm (Table 1), the influence terms (Table 2 / Fig. 3) and
the gradient-norm decrease of selected samples (Appendix A.2)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset

from ..data.batching import iter_batches
from ..errors import RunDirectoryError
from ..pergrad import per_sample_grad_norms
from ..strategies.base import top_k
from ..strategies.gradnorm import gradnorm_scores
from .analyses import _csv, _mean_std, _pivot, _write
from .replay import RunReader


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def true_label_grad_norms(
    model: nn.Module,
    dataset: Dataset,
    indices: np.ndarray,
    *,
    norm: str,
    batch_size: int,
) -> np.ndarray:
    """||grad_theta CE(model(x_i), y_i)|| for every pool index in ``indices`` (in that order),
    float64 [M], with the batched engine; the labels are the dataset's own targets."""
    device, dtype = next(model.parameters()).device, _model_dtype(model)
    out = []
    for x, y in iter_batches(dataset, batch_size, indices):
        if y is None:
            raise RunDirectoryError("the analysis needs labelled data; this dataset has no targets")
        x, y = x.to(device, dtype=dtype if x.is_floating_point() else None), y.to(device)

        def loss(logits: torch.Tensor, y: torch.Tensor = y) -> torch.Tensor:
            return F.cross_entropy(logits, y, reduction="none")

        # one chunk per batch, so the loss's labels line up with the engine's chunk
        out.append(per_sample_grad_norms(model, x, loss, norm=norm, chunk_size=len(x)).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)


def overlap_count(selected: np.ndarray, candidates: np.ndarray, scores: np.ndarray) -> int:
    """How many of ``selected`` lie among the top-len(selected) ``candidates`` by ``scores``
    (ties go to the earlier candidate, as in selection)."""
    best = top_k(scores, candidates, len(selected))
    return int(np.isin(selected, best).sum())


def _scheme(reader: RunReader, strategy: str) -> str:
    """The unsupervised loss whose gradient norm a strategy is judged by: a gradnorm strategy's
    own; for the others the entropy (equal, value and gradient, to the published expected loss)."""
    return getattr(reader.strategy(strategy), "scheme", "entropy")


def _progress(log: Callable[[str], None] | None, message: str) -> None:
    if log is not None:
        log(message)


# ------------------------------------------------------------------------- Table 1
def topk_overlap(
    reader: RunReader, norm: str | None = None, log: Callable[[str], None] | None = None
) -> list[dict[str, Any]]:
    """Table 1: per strategy, trial and selecting cycle c, the number of the K selected samples
    that lie in the top-K of the candidates by the true-label gradient norm
    ||grad_theta CE(T^c(x), y)|| (``norm``: the run's unless given)."""
    reader.require_models()
    norm = norm or reader.config.norm
    batch = reader.config.score_batch_size
    out = []
    for strategy in reader.strategies:
        for trial in reader.trials(strategy):
            for view in reader.cycles(strategy, trial):
                if view.selected is None:
                    continue
                _progress(log, f"topk-overlap {strategy} t{trial} c{view.cycle}")
                model = reader.model(strategy, trial, view.cycle)
                norms = true_label_grad_norms(
                    model, reader.bundle.train_eval, view.candidates, norm=norm, batch_size=batch
                )
                out.append(
                    {
                        "strategy": strategy,
                        "trial": trial,
                        "cycle": view.cycle,
                        "num_labeled": len(view.labeled),
                        "budget": len(view.selected),
                        "candidates": len(view.candidates),
                        "overlap": overlap_count(view.selected, view.candidates, norms),
                    }
                )
    if not out:
        raise RunDirectoryError(f"{reader.run_dir} has no finished selection to analyse yet")
    return out


def _summarise(
    records: list[dict[str, Any]], fields: tuple[str, ...], keep: tuple[str, ...]
) -> list[dict[str, Any]]:
    """Mean and std over trials of ``fields`` per (strategy, cycle); ``keep`` copied from the
    first trial."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r["strategy"], r["cycle"])].append(r)
    out = []
    for (strategy, cycle), group in groups.items():
        row: dict[str, Any] = {"strategy": strategy, "cycle": cycle}
        row.update({k: group[0][k] for k in keep})
        for f in fields:
            row[f"{f}_mean"], row[f"{f}_std"] = _mean_std([r[f] for r in group])
        row["trials"] = len(group)
        out.append(row)
    return out


def _pm(mean: float, std: float, digits: int = 1) -> str:
    return f"{mean:.{digits}f}" if np.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def write_topk_overlap(
    reader: RunReader,
    out_dir: Path | None = None,
    norm: str | None = None,
    log: Callable[[str], None] | None = None,
) -> str:
    """Write analysis/topk_overlap.{md,csv} (per trial rows in the CSV); return the markdown."""
    records = topk_overlap(reader, norm, log)
    summary = _summarise(records, ("overlap",), ("num_labeled", "budget", "candidates"))
    md = (
        "# Top-K overlap with the true-label gradient norm (Table 1)\n\n"
        "Of the K samples each strategy selected at a cycle, how many are among the top-K "
        "candidates by the gradient norm of the cross-entropy with the true label, "
        f"||∇θ CE(T^c(x), y)|| ({norm or reader.config.norm} norm), at the model that selected "
        "them; mean ± std over trials, out of K. Columns: cycle (labelled samples before the "
        "selection).\n\n"
        + _pivot(summary, lambda r: f"{_pm(r['overlap_mean'], r['overlap_std'])} / {r['budget']}")
    )
    _write(reader.run_dir, out_dir, "topk_overlap", md, _csv(records))
    return md


# ------------------------------------------------------------------------- Appendix A.2
def gradnorm_decrease(
    reader: RunReader, norm: str | None = None, log: Callable[[str], None] | None = None
) -> list[dict[str, Any]]:
    """Appendix A.2: per strategy, trial and cycle c whose next model T^{c+1} exists, the
    fraction of the samples selected at c whose gradient norm of the scheme's loss is lower at
    T^{c+1} (trained with them) than at T^c (when selected), with both mean norms."""
    reader.require_models()
    norm = norm or reader.config.norm
    batch = reader.config.score_batch_size
    out = []
    for strategy in reader.strategies:
        scheme = _scheme(reader, strategy)
        for trial in reader.trials(strategy):
            views = reader.cycles(strategy, trial)
            for view, after in zip(views, views[1:]):
                if view.selected is None:
                    continue
                _progress(log, f"gradnorm-decrease {strategy} t{trial} c{view.cycle}")
                data = Subset(reader.bundle.train_eval, view.selected.tolist())
                norms = [
                    gradnorm_scores(
                        reader.model(strategy, trial, c),
                        data,
                        scheme=scheme,
                        norm=norm,
                        batch_size=batch,
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
    log: Callable[[str], None] | None = None,
) -> str:
    """Write analysis/gradnorm_decrease.{md,csv}; return the markdown."""
    records = gradnorm_decrease(reader, norm, log)
    summary = _summarise(
        records,
        ("decreased", "norm_at_selection", "norm_after_training"),
        ("num_labeled", "scheme"),
    )

    def cell(r: dict[str, Any]) -> str:
        return (
            f"{_pm(100 * r['decreased_mean'], 100 * r['decreased_std'])}% "
            f"({r['norm_at_selection_mean']:.3g} → {r['norm_after_training_mean']:.3g})"
        )

    md = (
        "# Gradient-norm decrease of the selected samples (Appendix A.2)\n\n"
        "Per cycle c: the share of the samples selected at c whose gradient norm of the "
        "scheme's loss (entropy, equal to the published expected loss, unless the strategy is a "
        f"gradnorm scheme; {norm or reader.config.norm} norm) is lower under T^(c+1), trained "
        "with them, than under T^c, which selected them; mean ± std over trials, then the mean "
        "norm before → after.\n\n" + _pivot(summary, cell)
    )
    _write(reader.run_dir, out_dir, "gradnorm_decrease", md, _csv(records))
    return md
