"""Table 1 of the paper: of the K samples each strategy selected at a cycle, how many lie among
the top-K candidates by the gradient norm of the cross-entropy with the true label, at the model
that selected them. The loss is the run's task's per-sample training loss: for segmentation the
cross-entropy with the true mask, averaged over the image's valid pixels (the ignore index left
out). Needs the run's per-cycle models (``run --keep-models``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from .._torch import model_dtype
from ..data.batching import iter_batches
from ..errors import RunDirectoryError
from ..pergrad import per_sample_grad_norms
from ..strategies.base import top_k
from ..tasks import Task
from .base import DEVICE, NORM, QUIET, Log, progress, register_analysis
from .replay import RunReader, on_replayed_run
from .tables import pivot, plus_minus, summarise_trials, to_csv, write_tables


def true_label_grad_norms(
    model: nn.Module,
    dataset: Dataset,
    indices: np.ndarray,
    *,
    norm: str,
    batch_size: int,
    task: Task | None = None,
    labels: torch.Tensor | None = None,
) -> np.ndarray:
    """||grad_theta L(model(x_i), y_i)|| for every pool index in ``indices`` (in that order),
    float64 [M], with the batched engine.

    ``L``: ``task.per_sample_loss`` (classification: the cross-entropy; segmentation: the pixel
    cross-entropy averaged over the image's valid pixels, the ignore index left out); without a
    task, the cross-entropy. ``labels``: the true labels [M, ...] in the order of ``indices``
    (class indices or masks); default the dataset's own targets.
    """
    device, dtype = next(model.parameters()).device, model_dtype(model)
    per_sample = task.per_sample_loss if task is not None else _cross_entropy
    out = []
    for x, y in iter_batches(dataset, batch_size, indices, targets=labels):
        if y is None:
            raise RunDirectoryError("the analysis needs labelled data; this dataset has no targets")
        x, y = x.to(device, dtype=dtype if x.is_floating_point() else None), y.to(device)

        def loss(logits: torch.Tensor, y: torch.Tensor = y) -> torch.Tensor:
            return per_sample(logits, y)

        # one chunk per batch, so the loss's labels line up with the engine's chunk
        out.append(per_sample_grad_norms(model, x, loss, norm=norm, chunk_size=len(x)).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)


def _cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def overlap_count(selected: np.ndarray, candidates: np.ndarray, scores: np.ndarray) -> int:
    """How many of ``selected`` lie among the top-len(selected) ``candidates`` by ``scores``
    (ties go to the earlier candidate, as in selection)."""
    best = top_k(scores, candidates, len(selected))
    return int(np.isin(selected, best).sum())


def topk_overlap(
    reader: RunReader, norm: str | None = None, log: Log | None = None
) -> list[dict[str, Any]]:
    """Table 1: per strategy, trial and selecting cycle c, the number of the K selected samples
    that lie in the top-K of the candidates by the true-label gradient norm
    ||grad_theta CE(T^c(x), y)|| (``norm``: the run's unless given), the loss the run's task's
    per-sample training loss with the pool's true labels (segmentation: true masks)."""
    reader.require_models()
    norm = norm or reader.config.norm
    batch = reader.config.score_batch_size
    out = []
    for strategy in reader.strategies:
        for trial in reader.trials(strategy):
            for view in reader.cycles(strategy, trial):
                if view.selected is None:
                    continue
                progress(log, f"topk-overlap {strategy} t{trial} c{view.cycle}")
                model = reader.model(strategy, trial, view.cycle)
                norms = true_label_grad_norms(
                    model,
                    reader.bundle.train_eval,
                    view.candidates,
                    norm=norm,
                    batch_size=batch,
                    task=reader.task,
                    labels=reader.true_labels(view.candidates),
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


def write_topk_overlap(
    reader: RunReader,
    out_dir: Path | None = None,
    norm: str | None = None,
    log: Log | None = None,
) -> str:
    """Write analysis/topk_overlap.{md,csv} (per trial rows in the CSV); return the markdown."""
    records = topk_overlap(reader, norm, log)
    summary = summarise_trials(records, ("overlap",), ("num_labeled", "budget", "candidates"))
    label = (
        "the true mask (mean over the image's labelled pixels)"
        if reader.task.dense
        else "the true label"
    )
    md = (
        "# Top-K overlap with the true-label gradient norm (Table 1)\n\n"
        "Of the K samples each strategy selected at a cycle, how many are among the top-K "
        f"candidates by the gradient norm of the cross-entropy with {label}, "
        f"||∇θ CE(T^c(x), y)|| ({norm or reader.config.norm} norm), at the model that selected "
        "them; mean ± std over trials, out of K. Columns: cycle (labelled samples before the "
        "selection).\n\n"
        + pivot(
            summary, lambda r: f"{plus_minus(r['overlap_mean'], r['overlap_std'])} / {r['budget']}"
        )
    )
    write_tables(reader.run_dir, out_dir, "topk_overlap", md, to_csv(records))
    return md


run_topk_overlap = register_analysis(
    "topk-overlap",
    "selected samples among the top-K by true-label gradient norm (Table 1)",
    options=(DEVICE, QUIET, NORM),
)(on_replayed_run(write_topk_overlap))
