"""Table 2 and Fig. 3 of the paper: Eq. 3's influence term of every candidate a gradnorm scheme
scored, against the scheme's gradient norm (Eq. 5), and the approximations that lead from one to
the other. Needs the run's per-cycle models (``run --keep-models``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn
from torch.utils.data import Subset

from ..atomic import atomic_open
from ..errors import ConfigError, RunDirectoryError
from ..influence import (
    CURVATURES,
    conjugate_gradient,
    curvature_vector_product,
    dataset_directional_derivatives,
    extreme_eigenvalues,
    mean_loss_gradient,
)
from ..seeding import ANALYSIS, rng
from ..strategies.base import top_k
from ..strategies.gradnorm import SCHEME_LOSSES, gradnorm_scores
from .base import DEVICE, QUIET, Log, Option, progress, register_analysis
from .replay import RunReader, loss_scheme
from .tables import ANALYSIS_DIR, pivot, plus_minus, summarise_trials, to_csv, write_tables

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
    from scipy.stats import spearmanr  # not at import: scipy.stats takes ~0.8 s to load

    return float(spearmanr(a, b).statistic)


def check_classification(reader: RunReader) -> None:
    """Refuse a segmentation run: Eq. 3's terms are built on one cross-entropy per sample of
    [N, C] logits (its Hessian and Gauss-Newton products, its directional derivatives)."""
    if reader.task.dense:
        raise ConfigError(
            f"{reader.run_dir} is a {reader.task.name} run; the influence analysis (Eq. 3) is "
            "implemented for classification runs only (one cross-entropy per sample, its Hessian "
            "over [N, C] logits), not per-pixel losses; use topk-overlap or gradnorm-decrease"
        )


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
    check_classification(reader)
    bundle, config = reader.bundle, reader.config
    scheme = loss_scheme(reader, strategy)
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
    log: Log | None = None,
) -> list[dict[str, Any]]:
    """Table 2 and Fig. 3 per gradnorm strategy, trial and selecting cycle c (whose T^(c+1)
    exists, for ``at="next"``): the overlap of the top-K candidates by Eq. 3 (true labels, at the
    model ``settings.at`` names, see :func:`influence_terms`) with the top-K by Eq. 5 (the
    scheme's score at T^c, i.e. its selection), chance level K^2/M, the Spearman correlation of
    Eq. 3 with Eq. 5, the four terms of :func:`influence_terms` averaged over the candidates, and
    how the conjugate-gradient solve ended."""
    reader.require_models()
    settings.check()
    check_classification(reader)
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
                progress(log, f"influence {strategy} t{trial} c{view.cycle}")
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
    log: Log | None = None,
) -> str:
    """Write analysis/influence.{md,csv} and influence_terms.png; return the markdown."""
    records = influence(reader, settings, log)
    curvature, tol, max_iter = settings.curvature, settings.tol, settings.max_iter
    summary = summarise_trials(
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
        + pivot(
            summary,
            lambda r: (
                f"{plus_minus(r['overlap_mean'], r['overlap_std'])} / {r['budget']} "
                f"({r['chance']:.1f})"
            ),
        )
        + "\nSpearman rank correlation of Eq. 3 with Eq. 5 over the candidates:\n\n"
        + pivot(summary, lambda r: plus_minus(r["spearman_mean"], r["spearman_std"], 2))
        + "\n## Fig. 3: the four terms, mean over candidates\n\n"
        f"Target: Eq. 3 (true label, {m}). Approx-1: the scheme's loss in place of the "
        f"label. Approx-2: ||s|| ||∇loss(x)|| at {m}, s = (H + λI)⁻¹ ḡ (Cauchy–Schwarz, ≥ "
        "|Approx-1|). Approx-3: ||s|| ||∇loss(x)|| at T^c, the norm the scheme ranked by.\n\n"
        + pivot(
            summary,
            lambda r: " / ".join(f"{r[f'{term}_mean']:.3g}" for term in TERMS),
        )
        + f"\n{convergence}\n"
    )
    write_tables(reader.run_dir, out_dir, "influence", md, to_csv(records))
    folder = Path(out_dir) if out_dir is not None else reader.run_dir / ANALYSIS_DIR
    plot_influence_terms(summary, folder / "influence_terms.png")
    return md


def parse_damping(text: str) -> float | str:
    """``--damping``: a number, or ``auto``."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"expected a number or auto, got {text!r}") from None


_DEFAULT = InfluenceSettings()


@register_analysis(
    "influence",
    "Eq. 3's influence term vs the gradient norm (Table 2, Fig. 3)",
    options=(
        DEVICE,
        QUIET,
        Option(
            "--damping",
            "lambda of (H + lambda I)^-1: a number >= 0, or auto (twice the magnitude of H's "
            "most negative eigenvalue, estimated by Lanczos; default)",
            default=_DEFAULT.damping,
            parse=parse_damping,
        ),
        Option(
            "--at",
            "the model Eq. 3 is evaluated at: next = T^(c+1), trained after the selection "
            "(default); selection = T^c, which selected",
            default=_DEFAULT.at,
            choices=INFLUENCE_AT,
        ),
        Option(
            "--curvature",
            "H: the Hessian of the mean training loss (default) or its positive semi-definite "
            "Gauss-Newton part",
            default=_DEFAULT.curvature,
            choices=CURVATURES,
        ),
        Option(
            "--cg-tol",
            "conjugate gradient stops at this relative residual (default 1e-4)",
            default=_DEFAULT.tol,
            parse=float,
        ),
        Option(
            "--cg-max-iter",
            "CG iteration cap (default 200)",
            default=_DEFAULT.max_iter,
            parse=int,
        ),
        Option(
            "--eval-samples",
            "held-out test samples j averaged in Eq. 3 (default: the whole test set)",
            default=_DEFAULT.eval_samples,
            parse=int,
        ),
        Option(
            "--hessian-samples",
            "labelled samples the Hessian is averaged over (default: all of them)",
            default=_DEFAULT.hessian_samples,
            parse=int,
        ),
    ),
)
def run_influence(
    run_dir: Path,
    out_dir: Path | None,
    log: Log,
    *,
    device: str | None,
    cg_tol: float,
    cg_max_iter: int,
    **settings: Any,
) -> str:
    """``--cg-tol`` and ``--cg-max-iter`` are the settings' tol and max_iter; the other options
    are :class:`InfluenceSettings` fields by name."""
    reader = RunReader(run_dir, device=device)
    full = InfluenceSettings(tol=cg_tol, max_iter=cg_max_iter, **settings)
    return write_influence(reader, out_dir, full, log)
