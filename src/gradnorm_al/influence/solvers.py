"""Solving ``(A + damping I) x = b`` for a symmetric A given only as a map ``v -> A v``:
conjugate gradients with an honest report of how the solve ended, and the damped inverse
curvature-vector product ``(H + damping I)^-1 b`` of a model built on it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset

from ..errors import ConfigError
from .common import Indices, Vector, as_vector, dot, trainable_params
from .curvature import curvature_vector_product


@dataclass(frozen=True)
class CGReport:
    """How a conjugate-gradient solve of ``(A + damping I) x = b`` ended.

    Attributes
    ----------
    iterations : CG steps taken (matrix-vector products, not counting the final residual check).
    relative_residual : ``||b - (A + damping I) x|| / ||b||`` recomputed from the returned x (not
        CG's recursively updated residual, which drifts from the true one in floating point).
    converged : ``relative_residual <= tol``.
    negative_curvature : a search direction p with ``p^T (A + damping I) p <= 0`` was met and the
        solve stopped there: the damped matrix is not positive definite (raise the damping).
    """

    iterations: int
    relative_residual: float
    converged: bool
    negative_curvature: bool


def conjugate_gradient(
    matvec: Callable[[Sequence[torch.Tensor]], Sequence[torch.Tensor]],
    b: Sequence[torch.Tensor],
    *,
    damping: float,
    tol: float = 1e-6,
    max_iter: int = 100,
) -> tuple[Vector, CGReport]:
    """Solve ``(A + damping I) x = b`` by conjugate gradients, A given by ``matvec`` (symmetric).

    Parameters
    ----------
    matvec : ``v -> A v`` on vectors given as lists of tensors shaped like ``b``.
    b : the right-hand side, a list of tensors; x comes back in the same layout and dtype.
    damping : lambda >= 0 added to A's diagonal. A network's Hessian is in general indefinite; CG
        needs ``A + lambda I`` positive definite, i.e. lambda > -lambda_min(A). CG does not fix an
        indefinite matrix: it stops at the first direction of non-positive curvature and reports
        ``negative_curvature``; choosing a larger damping is the caller's fix.
    tol : target relative residual. CG stops when its recursive residual ``||r|| <= tol * ||b||``;
        then the true residual is recomputed (one extra ``matvec``) and, where floating-point drift
        left it above ``tol``, CG restarts from x on it (while each restart halves it at least).
        ``converged`` is judged on the true residual.
    max_iter : at most this many CG steps in all.

    Returns
    -------
    x, CGReport. Inner products and step sizes are computed in float64; the vectors stay in b's
    dtype. ``b = 0`` gives ``x = 0`` in 0 iterations.
    """
    if not (math.isfinite(damping) and damping >= 0):
        raise ConfigError(f"damping must be a finite number >= 0, got {damping}")
    if not tol > 0:
        raise ConfigError(f"tol must be > 0, got {tol}")
    if max_iter < 1:
        raise ConfigError(f"max_iter must be at least 1, got {max_iter}")
    rhs = [t.detach() for t in b]
    if not rhs:
        raise ConfigError("the right-hand side b is an empty list; pass one tensor or more")

    def damped(v: Vector) -> Vector:
        av = list(matvec(v))
        if len(av) != len(v):
            raise ConfigError(
                f"matvec returned {len(av)} tensors for a vector of {len(v)}; return one per input"
            )
        return [a.detach().add(vi, alpha=damping) for a, vi in zip(av, v)]

    x = [torch.zeros_like(t) for t in rhs]
    b_norm = math.sqrt(dot(rhs, rhs))
    if b_norm == 0.0:
        return x, CGReport(0, 0.0, True, False)
    r = [t.clone() for t in rhs]
    iterations, negative, relative = 0, False, 1.0
    while True:
        # one CG run from x on the residual r; it stops when its recursive residual meets tol
        p = [t.clone() for t in r]
        rr = dot(r, r)
        for _ in range(max_iter - iterations):
            ap = damped(p)
            curvature = dot(p, ap)
            if not curvature > 0:  # also stops on NaN, which then shows in the residual
                negative = curvature <= 0
                break
            alpha = rr / curvature
            for xi, pi in zip(x, p):
                xi.add_(pi, alpha=alpha)
            for ri, api in zip(r, ap):
                ri.sub_(api, alpha=alpha)
            iterations += 1
            rr_next = dot(r, r)
            if math.sqrt(rr_next) <= tol * b_norm:
                break
            beta = rr_next / rr
            p = [ri.add(pi, alpha=beta) for ri, pi in zip(r, p)]
            rr = rr_next
        # the recursive residual drifts from the true one in floating point: recompute it, and
        # restart from x on the true residual while that still helps
        r = rhs if iterations == 0 else [bi - ai for bi, ai in zip(rhs, damped(x))]
        previous, relative = relative, math.sqrt(dot(r, r)) / b_norm
        if relative <= tol or negative or iterations >= max_iter or relative >= 0.5 * previous:
            break
        r = [t.clone() for t in r]
    return x, CGReport(iterations, relative, relative <= tol, negative)


def inverse_hvp(
    model: nn.Module,
    dataset: Dataset,
    labeled_indices: Indices,
    b: Sequence[torch.Tensor],
    *,
    damping: float,
    tol: float = 1e-6,
    max_iter: int = 100,
    curvature: str = "hessian",
    batch_size: int = 128,
    device: torch.device | str | None = None,
) -> tuple[Vector, CGReport]:
    """``s = (H + damping I)^-1 b`` by :func:`conjugate_gradient` on exact Hessian-vector
    products, H the Hessian of the mean CE over the samples ``labeled_indices`` of ``dataset``
    (or its Gauss-Newton matrix, ``curvature="gauss-newton"``).

    b is a parameter vector (cast to the parameters' dtype and device). Each CG iteration costs one
    pass over the labelled samples. See :func:`conjugate_gradient` for damping.
    """
    params = list(trainable_params(model).values())
    rhs = as_vector(b, params, "b")
    product = curvature_vector_product(
        model, dataset, labeled_indices, curvature=curvature, batch_size=batch_size, device=device
    )
    return conjugate_gradient(product, rhs, damping=damping, tol=tol, max_iter=max_iter)
