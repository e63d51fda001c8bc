"""The paper's analyses that need the run's per-cycle models (``run --keep-models``): the top-K
overlap with the true-label gradient norm (Table 1), the influence terms (Table 2 / Fig. 3) and
the gradient-norm decrease of selected samples (Appendix A.2)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn
from torch.utils.data import Dataset, Subset

from .._torch import model_dtype
from ..atomic import atomic_open
from ..data.batching import iter_batches
from ..errors import ConfigError, RunDirectoryError
from ..influence import (
    CURVATURES,
    conjugate_gradient,
    curvature_vector_product,
    dataset_directional_derivatives,
    extreme_eigenvalues,
    mean_loss_gradient,
)
from ..pergrad import per_sample_grad_norms
from ..seeding import ANALYSIS, rng
from ..strategies.base import top_k
from ..strategies.gradnorm import SCHEME_LOSSES, gradnorm_scores
from .analyses import ANALYSIS_DIR, _csv, _mean_std, _pivot, _write
from .replay import RunReader


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
    device, dtype = next(model.parameters()).device, model_dtype(model)
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


# ------------------------------------------------------------------------- Table 2 / Fig. 3
TERMS = ("target", "approx1", "approx2", "approx3")
TERM_NAMES = {
    "target": "Target",
    "approx1": "Approx-1",
    "approx2": "Approx-2",
    "approx3": "Approx-3",
}
LANCZOS_STEPS = 20
INFLUENCE_AT = ("next", "selection")


@dataclass(frozen=True)
class InfluenceSettings:
    """How ``analyze influence`` evaluates Eq. 3 (see :func:`influence_terms`).

    ``damping``: λ >= 0 or "auto" (:func:`auto_damping`); ``curvature``: "hessian" or
    "gauss-newton"; ``tol`` / ``max_iter``: the CG stopping rule; ``eval_samples`` /
    ``hessian_samples``: seeded subsets of the test set / labelled set (None: all); ``at``: the
    model, "next" (T^(c+1)) or "selection" (T^c).
    """

    damping: float | str = "auto"
    curvature: str = "hessian"
    tol: float = 1e-4
    max_iter: int = 200
    eval_samples: int | None = None
    hessian_samples: int | None = None
    at: str = "next"

    def check(self) -> None:
        """Raise ConfigError naming the first bad value."""
        d = self.damping
        if d != "auto" and not (isinstance(d, (int, float)) and d >= 0):
            raise ConfigError(f"damping must be 'auto' or a number >= 0, got {d!r}")
        if self.curvature not in CURVATURES:
            raise ConfigError(
                f"unknown curvature {self.curvature!r}; use one of {', '.join(CURVATURES)}"
            )
        if self.at not in INFLUENCE_AT:
            raise ConfigError(
                f"unknown model {self.at!r} for Eq. 3; use one of {', '.join(INFLUENCE_AT)}"
            )
        if self.tol <= 0 or self.max_iter < 1:
            raise ConfigError("cg-tol must be > 0 and cg-max-iter >= 1")
        for name, value in (
            ("eval-samples", self.eval_samples),
            ("hessian-samples", self.hessian_samples),
        ):
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}")

    @property
    def model(self) -> str:
        return "T^(c+1)" if self.at == "next" else "T^c"


def auto_damping(lambda_min: float, lambda_max: float) -> float:
    """A damping that makes H + damping I positive definite with a margin: twice the magnitude of
    H's (Lanczos-estimated, hence under-estimated) most negative eigenvalue, and at least 1e-3 of
    its largest, so a positive semi-definite H is regularised too."""
    return max(2.0 * max(0.0, -lambda_min), 1e-3 * max(lambda_max, 0.0), 1e-8)


def _sample(indices: np.ndarray, size: int | None, generator: np.random.Generator) -> np.ndarray:
    """A seeded random ``size`` of ``indices`` (sorted), or all of them."""
    if size is None or size >= len(indices):
        return np.asarray(indices)
    return np.sort(generator.choice(indices, size, replace=False))


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def influence_terms(
    reader: RunReader,
    strategy: str,
    trial: int,
    cycle: int,
    settings: InfluenceSettings = InfluenceSettings(),
) -> dict[str, Any]:
    """Eq. 3 and its approximations for every candidate that ``strategy`` (a gradnorm scheme)
    scored at ``cycle`` c, with s = (H + damping I)^-1 g_bar at T^(c+1) (``at="next"``: the model
    trained after the selection, as the issue specifies) or at T^c (``at="selection"``: the
    textbook influence of adding x to the set T^c was trained on; T^(c+1) below reads T^c):

    * ``target``  (1/n) sum_j grad CE(x_j)^T (H + λI)^-1 grad CE(x, y): Eq. 3, true label, T^(c+1);
    * ``approx1`` the same with the scheme's loss in place of the unknown label's CE;
    * ``approx2`` ||s|| ||grad loss(x)|| at T^(c+1): the Cauchy-Schwarz bound, >= |approx1|;
    * ``approx3`` ||s|| ||grad loss(x)|| at T^c: the bound with the norm the scheme ranked by.

    j runs over the (``settings.eval_samples`` of the) test set, H is the mean CE Hessian over the
    (``settings.hessian_samples`` of the) samples T^(c+1) was trained on; norms are global L2
    (Eq. 5). ``eq5`` is the scheme's score at T^c with the run's norm: what the selection ranked.
    ``curvature="gauss-newton"`` uses the (positive semi-definite) Gauss-Newton matrix for H.
    ``damping="auto"``: :func:`auto_damping` from Lanczos estimates of H's extreme eigenvalues.
    Returns those float64 arrays [M] plus ``candidates``, ``selected``, ``s``, ``s_norm``, the
    damping used, the eigenvalue estimates (NaN for a given damping) and the CG ``report``.
    """
    bundle, config = reader.bundle, reader.config
    scheme = _scheme(reader, strategy)
    loss = SCHEME_LOSSES[scheme]
    views = reader.cycles(strategy, trial)
    settings.check()
    at = settings.at
    if cycle + (at == "next") >= len(views) or views[cycle].selected is None:
        raise RunDirectoryError(
            f"{strategy} trial {trial} has no selection at cycle {cycle}"
            + (" followed by a trained cycle" if at == "next" else "")
            + "; pick an earlier cycle"
        )
    view = views[cycle]
    base = views[cycle + 1] if at == "next" else view
    generator = rng(reader.seed(trial), ANALYSIS, cycle)
    eval_idx = _sample(np.arange(len(bundle.test)), settings.eval_samples, generator)
    hessian_idx = _sample(base.labeled, settings.hessian_samples, generator)
    batch = config.score_batch_size
    model = reader.model(strategy, trial, base.cycle)
    g_bar = mean_loss_gradient(model, bundle.test, eval_idx, batch_size=batch)
    product = curvature_vector_product(
        model, bundle.train_eval, hessian_idx, curvature=settings.curvature, batch_size=batch
    )
    low = high = float("nan")
    damping = settings.damping
    if damping == "auto":
        low, high = extreme_eigenvalues(
            product, g_bar, steps=LANCZOS_STEPS, seed=reader.seed(trial)
        )
        damping = auto_damping(low, high)
    s, report = conjugate_gradient(
        product, g_bar, damping=float(damping), tol=settings.tol, max_iter=settings.max_iter
    )
    s_norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in s))
    candidates = view.candidates
    data = Subset(bundle.train_eval, candidates.tolist())

    def along_s(loss_fn: Any) -> np.ndarray:
        return (
            dataset_directional_derivatives(
                model, bundle.train_eval, candidates, s, loss_fn, batch_size=batch
            )
            .cpu()
            .numpy()
        )

    def norms(net: nn.Module, norm: str) -> np.ndarray:
        return gradnorm_scores(net, data, scheme=scheme, norm=norm, batch_size=batch).numpy()

    selecting = model if base is view else reader.model(strategy, trial, view.cycle)
    at_selection = norms(selecting, "l2")
    at_model = at_selection if base is view else norms(model, "l2")
    return {
        "candidates": candidates,
        "selected": view.selected,
        "target": along_s(None),  # CE with the candidates' true labels
        "approx1": along_s(lambda logits, _targets: loss(logits)),
        "approx2": s_norm * at_model,
        "approx3": s_norm * at_selection,
        "eq5": at_selection if config.norm == "l2" else norms(selecting, config.norm),
        "s": s,
        "s_norm": s_norm,
        "damping": float(damping),
        "lambda_min": low,
        "lambda_max": high,
        "report": report,
        "eval_samples": len(eval_idx),
        "hessian_samples": len(hessian_idx),
    }


def influence(
    reader: RunReader,
    settings: InfluenceSettings = InfluenceSettings(),
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Table 2 and Fig. 3 per gradnorm strategy, trial and selecting cycle c (whose T^(c+1)
    exists, for ``at="next"``): the overlap of the top-K candidates by Eq. 3 (true labels, at the
    model ``settings.at`` names, see :func:`influence_terms`) with the top-K by Eq. 5 (the
    scheme's score at T^c, i.e. its selection), chance level K^2/M, the Spearman correlation of
    Eq. 3 with Eq. 5, the four terms of :func:`influence_terms` averaged over the candidates, and
    how the conjugate-gradient solve ended."""
    reader.require_models()
    settings.check()
    schemes = [s for s in reader.strategies if hasattr(reader.strategy(s), "scheme")]
    if not schemes:
        raise RunDirectoryError(
            f"{reader.run_dir} has no gradnorm strategy; the influence analysis compares Eq. 3 "
            "with the ranking of entropy-gradnorm / expected-gradnorm: run one of them"
        )
    out = []
    for strategy in schemes:
        for trial in reader.trials(strategy):
            views = reader.cycles(strategy, trial)
            for view in views[: len(views) - 1] if settings.at == "next" else views:
                if view.selected is None:
                    continue
                _progress(log, f"influence {strategy} t{trial} c{view.cycle}")
                t = influence_terms(reader, strategy, trial, view.cycle, settings)
                k, m = len(view.selected), len(view.candidates)
                best = top_k(t["target"], view.candidates, k)
                report = t["report"]
                out.append(
                    {
                        "strategy": strategy,
                        "trial": trial,
                        "cycle": view.cycle,
                        "num_labeled": len(view.labeled),
                        "budget": k,
                        "candidates": m,
                        "overlap": int(np.isin(top_k(t["eq5"], view.candidates, k), best).sum()),
                        "chance": k * k / m,
                        "spearman": _spearman(t["target"], t["eq5"]),
                        **{term: float(np.mean(t[term])) for term in TERMS},
                        "s_norm": t["s_norm"],
                        "eval_samples": t["eval_samples"],
                        "hessian_samples": t["hessian_samples"],
                        "model": settings.model,
                        "curvature": settings.curvature,
                        "damping": t["damping"],
                        "lambda_min": t["lambda_min"],
                        "lambda_max": t["lambda_max"],
                        "cg_iterations": report.iterations,
                        "cg_relative_residual": report.relative_residual,
                        "cg_converged": report.converged,
                        "cg_negative_curvature": report.negative_curvature,
                    }
                )
    if not out:
        raise RunDirectoryError(
            f"{reader.run_dir} has no gradnorm selection followed by a trained cycle yet"
        )
    return out


def plot_influence_terms(summary: list[dict[str, Any]], path: Path) -> None:
    """Fig. 3: the four averaged terms per cycle, one panel per scheme, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strategies = list(dict.fromkeys(r["strategy"] for r in summary))
    fig, axes = plt.subplots(
        1, len(strategies), figsize=(4.8 * len(strategies), 3.8), dpi=120, squeeze=False
    )
    for ax, strategy in zip(axes[0], strategies):
        rows = sorted((r for r in summary if r["strategy"] == strategy), key=lambda r: r["cycle"])
        x = [r["num_labeled"] for r in rows]
        for term, style in zip(TERMS, ("-o", "--s", ":^", "-.v")):
            ax.plot(
                x, [r[f"{term}_mean"] for r in rows], style, markersize=4, label=TERM_NAMES[term]
            )
        values = [abs(r[f"{term}_mean"]) for r in rows for term in TERMS]
        tiny = min((v for v in values if v > 0), default=1.0)
        ax.set_yscale("symlog", linthresh=tiny)  # the terms span orders of magnitude; may be < 0
        ax.set_title(strategy)
        ax.set_xlabel("labelled samples at selection")
        ax.set_ylabel("mean over candidates (symlog)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png")
    plt.close(fig)


def write_influence(
    reader: RunReader,
    out_dir: Path | None = None,
    settings: InfluenceSettings = InfluenceSettings(),
    log: Callable[[str], None] | None = None,
) -> str:
    """Write analysis/influence.{md,csv} and influence_terms.png; return the markdown."""
    records = influence(reader, settings, log)
    curvature, tol, max_iter = settings.curvature, settings.tol, settings.max_iter
    summary = _summarise(
        records,
        ("overlap", "spearman", *TERMS),
        ("num_labeled", "budget", "candidates", "chance"),
    )
    unconverged = [r for r in records if not r["cg_converged"]]
    worst = max(r["cg_relative_residual"] for r in records)
    iterations = [r["cg_iterations"] for r in records]
    used = [r["damping"] for r in records]
    how = f"{min(used):.3g}" if min(used) == max(used) else f"{min(used):.3g}–{max(used):.3g}"
    if settings.damping == "auto":
        lows = [r["lambda_min"] for r in records]
        how += (
            f" (auto: Lanczos estimates of λ_min from {min(lows):.3g} to {max(lows):.3g}, "
            f"λ_max up to {max(r['lambda_max'] for r in records):.3g})"
        )
    convergence = (
        f"Conjugate gradient on the {curvature} with damping {how}: "
        f"{len(records) - len(unconverged)} of "
        f"{len(records)} solves reached relative residual {tol:g} in {min(iterations)}–"
        f"{max(iterations)} iterations (worst residual {worst:.2g})."
    )
    if unconverged:
        negatives = sum(r["cg_negative_curvature"] for r in unconverged)
        capped = sum(
            r["cg_iterations"] >= max_iter and not r["cg_negative_curvature"] for r in unconverged
        )
        convergence += (
            f" **{len(unconverged)} did not converge**: {negatives} met negative curvature "
            f"(raise --damping), {capped} used all {max_iter} iterations (raise --cg-max-iter), "
            f"{len(unconverged) - negatives - capped} stalled at the precision of the model's "
            "dtype (raise --cg-tol); their rows are in the CSV."
        )
    m = settings.model
    md = (
        "# Eq. 3's influence against the gradient norm (Table 2, Fig. 3)\n\n"
        "Per cycle c, over the candidates x that each scheme scored: Eq. 3's influence term "
        f"(1/n) Σ_j ∇L(x_j)ᵀ (H + λI)⁻¹ ∇L(x) with the true label at {m} (j over the test "
        f"set, H the mean cross-entropy {curvature} over {m}'s labelled set).\n\n"
        "## Table 2: top-K overlap of Eq. 3 with Eq. 5\n\n"
        "Candidates among both the top-K by Eq. 3 and the top-K by the scheme's gradient norm "
        "at T^c (its selection), mean ± std over trials / K (chance K²/M in brackets).\n\n"
        + _pivot(
            summary,
            lambda r: (
                f"{_pm(r['overlap_mean'], r['overlap_std'])} / {r['budget']} ({r['chance']:.1f})"
            ),
        )
        + "\nSpearman rank correlation of Eq. 3 with Eq. 5 over the candidates:\n\n"
        + _pivot(summary, lambda r: _pm(r["spearman_mean"], r["spearman_std"], 2))
        + "\n## Fig. 3: the four terms, mean over candidates\n\n"
        f"Target: Eq. 3 (true label, {m}). Approx-1: the scheme's loss in place of the "
        f"label. Approx-2: ||s|| ||∇loss(x)|| at {m}, s = (H + λI)⁻¹ ḡ (Cauchy–Schwarz, ≥ "
        "|Approx-1|). Approx-3: ||s|| ||∇loss(x)|| at T^c, the norm the scheme ranked by.\n\n"
        + _pivot(
            summary,
            lambda r: " / ".join(f"{r[f'{term}_mean']:.3g}" for term in TERMS),
        )
        + f"\n{convergence}\n"
    )
    _write(reader.run_dir, out_dir, "influence", md, _csv(records))
    folder = Path(out_dir) if out_dir is not None else reader.run_dir / ANALYSIS_DIR
    plot_influence_terms(summary, folder / "influence_terms.png")
    return md
