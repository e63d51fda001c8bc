"""Influence of a candidate sample on the mean evaluation loss (Wang et al., AAAI 2022, Eq. 3).

For a model with trainable parameters theta, labelled (training) samples i = 1..m, held-out
evaluation samples j = 1..n and a candidate x with loss l(x), this module computes

    I(x) = (1/n) sum_j grad L(x_j)^T (H + damping * I)^-1 grad l(x),
    H    = (1/m) sum_i Hess_theta CE(f(x_i), y_i),

the Hessian of the mean training cross-entropy at the current model. Up-weighting x by eps in the
training loss changes the mean evaluation loss by about ``-eps * I(x)`` (Koh & Liang's sign), so a
large positive I(x) means training on x should lower the evaluation loss most.

How. ``g_bar = (1/n) sum_j grad L(x_j)`` is one batched backward pass over the evaluation set;
``s = (H + damping I)^-1 g_bar`` is ONE conjugate-gradient solve whose matrix-vector products are
exact Hessian-vector products (double backward, one pass over the labelled set each); then
``I(x) = s . grad l(x)`` for every candidate at once is the tangent of the per-sample loss vector
under a forward-mode JVP in direction ``s`` -- no per-sample backward pass anywhere.

Everything runs with the model in eval mode (BatchNorm uses its running statistics, dropout is off)
on the device and in the dtype of the model's parameters (float64 models give exact-to-rounding
results); every submodule's mode, the parameters, buffers and ``.grad`` are left as they were.
Memory is bounded by ``batch_size``, never by the size of a dataset.

A "parameter vector" is a list of tensors shaped like the values of :func:`trainable_params`, in
that order. This module knows nothing of active learning.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp
from torch.utils.data import Dataset

from ._torch import eval_mode, first_output
from .data.batching import iter_batches
from .errors import ConfigError
from .pergrad.common import LossFn

Vector = list[torch.Tensor]
Indices = Sequence[int] | np.ndarray | None
#: maps (logits [b, C, ...], targets [b, ...] or None) of a batch of candidates to losses [b]
CandidateLoss = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


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


def trainable_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's trainable parameters (``requires_grad``) by name, in ``named_parameters()``
    order: the layout of every parameter vector in this module. Raises ConfigError if none."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ConfigError(
            f"{type(model).__name__} has no trainable parameters; influence needs at least one "
            "parameter with requires_grad=True"
        )
    return params


def mean_loss_gradient(
    model: nn.Module,
    dataset: Dataset,
    indices: Indices = None,
    *,
    batch_size: int = 128,
    device: torch.device | str | None = None,
) -> Vector:
    """``(1/n) sum_j grad_theta CE(f(x_j), y_j)`` over the n samples ``indices`` of ``dataset``
    (all if None), model in eval mode.

    CE is per sample (averaged over positions for dense outputs [N, C, ...]). Returns a parameter
    vector in the parameters' dtype and device; gradients are accumulated batch by batch in that
    dtype. ``device`` (default: the parameters') must be where the parameters are.
    """
    params = list(trainable_params(model).values())
    n = _count(dataset, indices)
    total = _zeros(params)
    with eval_mode(model), torch.enable_grad():
        for x, y in _labelled_batches(model, dataset, indices, batch_size, device):
            loss = _per_sample_ce(first_output(model(x)), y).sum() / n
            _accumulate(total, torch.autograd.grad(loss, params, allow_unused=True))
    return total


def hessian_vector_product(
    model: nn.Module,
    dataset: Dataset,
    indices: Indices = None,
    *,
    batch_size: int = 128,
    device: torch.device | str | None = None,
) -> Callable[[Sequence[torch.Tensor]], Vector]:
    """The map ``v -> H v``, H the Hessian w.r.t. the trainable parameters of the mean CE over the
    m samples ``indices`` of ``dataset`` (all if None), at the current parameters, eval mode.

    Each call makes one pass over those samples: per batch B, the exact double-backward product
    ``grad_theta (grad_theta L_B . v)`` of ``L_B = (1/m) sum_{i in B} CE_i``, summed over batches.
    v and the result are parameter vectors (result in the parameters' dtype). The parameters are
    read at call time, so the map follows later changes of the model.
    """
    params = list(trainable_params(model).values())
    m = _count(dataset, indices)
    _check_batch_size(batch_size)
    _compute_device(params, device)

    def hvp(v: Sequence[torch.Tensor]) -> Vector:
        vec = _as_vector(v, params, "the vector")
        out = _zeros(params)
        with eval_mode(model), torch.enable_grad():
            for x, y in _labelled_batches(model, dataset, indices, batch_size, device):
                loss = _per_sample_ce(first_output(model(x)), y).sum() / m
                grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
                terms = [
                    (g * vi).sum()
                    for g, vi in zip(grads, vec)
                    if g is not None and g.requires_grad  # else its Hessian block is zero
                ]
                if not terms:
                    continue
                _accumulate(out, torch.autograd.grad(sum(terms), params, allow_unused=True))
        return out

    return hvp


def gauss_newton_vector_product(
    model: nn.Module,
    dataset: Dataset,
    indices: Indices = None,
    *,
    batch_size: int = 128,
    device: torch.device | str | None = None,
) -> Callable[[Sequence[torch.Tensor]], Vector]:
    """The map ``v -> G v``, G the generalised Gauss-Newton matrix of the mean CE over the m
    samples ``indices`` of ``dataset``: ``G = (1/m) sum_i J_i^T (diag(p_i) - p_i p_i^T) J_i``, J_i
    the Jacobian of sample i's logits w.r.t. the parameters, p_i its softmax (per position, then
    averaged over positions, for dense outputs).

    G is the Hessian without the term that carries the logits' own curvature; it is positive
    semi-definite, so ``G + damping I`` is positive definite for any damping > 0, which a network's
    Hessian is not. Per batch: one forward-mode JVP (J v) and one backward (J^T u). The parameters
    are read at call time.
    """
    named = trainable_params(model)
    params = list(named.values())
    m = _count(dataset, indices)
    _check_batch_size(batch_size)
    _compute_device(params, device)

    def gvp(v: Sequence[torch.Tensor]) -> Vector:
        tangents = dict(zip(named, _as_vector(v, params, "the vector")))
        out = _zeros(params)
        with eval_mode(model), torch.enable_grad():
            for x, _y in _labelled_batches(model, dataset, indices, batch_size, device):
                primals = {n: p.detach() for n, p in named.items()}

                def logits_of(p: dict[str, torch.Tensor], x: torch.Tensor = x) -> torch.Tensor:
                    return first_output(functional_call(model, p, (x,)))

                with _quiet_jvp():
                    _, jv = jvp(logits_of, (primals,), (tangents,))
                logits = first_output(model(x))
                prob = F.softmax(logits.detach(), dim=1)
                u = prob * (jv - (prob * jv).sum(dim=1, keepdim=True))
                positions = logits[0, 0].numel()  # dense outputs: mean over positions
                grads = torch.autograd.grad(
                    logits, params, grad_outputs=u / (m * positions), allow_unused=True
                )
                _accumulate(out, grads)
        return out

    return gvp


def extreme_eigenvalues(
    matvec: Callable[[Sequence[torch.Tensor]], Sequence[torch.Tensor]],
    like: Sequence[torch.Tensor],
    *,
    steps: int = 20,
    seed: int = 0,
) -> tuple[float, float]:
    """Estimates of the smallest and largest eigenvalue of the symmetric matrix behind ``matvec``
    by ``steps`` Lanczos iterations (full re-orthogonalisation) from a seeded random start.

    The Ritz values lie inside the spectrum, so the smallest estimate is >= the true lambda_min:
    a margin is needed when it is used to make ``A + damping I`` positive definite.
    """
    if steps < 1:
        raise ConfigError(f"steps must be at least 1, got {steps}")
    generator = torch.Generator().manual_seed(seed)
    q = [torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t) for t in like]
    norm = math.sqrt(_dot(q, q))
    q = [t / norm for t in q]
    basis, alphas, betas = [q], [], []
    for _ in range(steps):
        w = [t.detach().clone() for t in matvec(q)]
        alphas.append(_dot(w, q))
        for qi in basis:  # full re-orthogonalisation keeps the Ritz values honest
            c = _dot(w, qi)
            w = [wi.sub(qii, alpha=c) for wi, qii in zip(w, qi)]
        beta = math.sqrt(_dot(w, w))
        if beta <= 1e-12 * max(1.0, abs(alphas[-1])):  # an invariant subspace: exact
            break
        betas.append(beta)
        q = [wi / beta for wi in w]
        basis.append(q)
    k = len(alphas)
    tri = np.diag(alphas) + np.diag(betas[: k - 1], 1) + np.diag(betas[: k - 1], -1)
    eig = np.linalg.eigvalsh(tri)
    return float(eig[0]), float(eig[-1])


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
    b_norm = math.sqrt(_dot(rhs, rhs))
    if b_norm == 0.0:
        return x, CGReport(0, 0.0, True, False)
    r = [t.clone() for t in rhs]
    iterations, negative, relative = 0, False, 1.0
    while True:
        # one CG run from x on the residual r; it stops when its recursive residual meets tol
        p = [t.clone() for t in r]
        rr = _dot(r, r)
        for _ in range(max_iter - iterations):
            ap = damped(p)
            curvature = _dot(p, ap)
            if not curvature > 0:  # also stops on NaN, which then shows in the residual
                negative = curvature <= 0
                break
            alpha = rr / curvature
            for xi, pi in zip(x, p):
                xi.add_(pi, alpha=alpha)
            for ri, api in zip(r, ap):
                ri.sub_(api, alpha=alpha)
            iterations += 1
            rr_next = _dot(r, r)
            if math.sqrt(rr_next) <= tol * b_norm:
                break
            beta = rr_next / rr
            p = [ri.add(pi, alpha=beta) for ri, pi in zip(r, p)]
            rr = rr_next
        # the recursive residual drifts from the true one in floating point: recompute it, and
        # restart from x on the true residual while that still helps
        r = rhs if iterations == 0 else [bi - ai for bi, ai in zip(rhs, damped(x))]
        previous, relative = relative, math.sqrt(_dot(r, r)) / b_norm
        if relative <= tol or negative or iterations >= max_iter or relative >= 0.5 * previous:
            break
        r = [t.clone() for t in r]
    return x, CGReport(iterations, relative, relative <= tol, negative)


CURVATURES = ("hessian", "gauss-newton")


def curvature_vector_product(
    model: nn.Module,
    dataset: Dataset,
    indices: Indices = None,
    *,
    curvature: str = "hessian",
    batch_size: int = 128,
    device: torch.device | str | None = None,
) -> Callable[[Sequence[torch.Tensor]], Vector]:
    """:func:`hessian_vector_product` (``curvature="hessian"``) or
    :func:`gauss_newton_vector_product` (``"gauss-newton"``)."""
    if curvature not in CURVATURES:
        raise ConfigError(f"unknown curvature {curvature!r}; use one of {', '.join(CURVATURES)}")
    product = hessian_vector_product if curvature == "hessian" else gauss_newton_vector_product
    return product(model, dataset, indices, batch_size=batch_size, device=device)


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
    rhs = _as_vector(b, params, "b")
    product = curvature_vector_product(
        model, dataset, labeled_indices, curvature=curvature, batch_size=batch_size, device=device
    )
    return conjugate_gradient(product, rhs, damping=damping, tol=tol, max_iter=max_iter)


def directional_derivatives(
    model: nn.Module,
    inputs: torch.Tensor,
    loss_fn: LossFn,
    direction: Sequence[torch.Tensor],
) -> torch.Tensor:
    """``d/d eps loss_fn(f_{theta + eps * direction}(inputs))`` at eps = 0, i.e.
    ``direction . grad_theta l_n`` for every sample n, from one forward-mode JVP (eval mode).

    Parameters
    ----------
    inputs : [N, ...]; moved to the parameters' device (and dtype, if floating point). All N go
        through one forward pass: chunk large inputs yourself, or use
        :func:`dataset_directional_derivatives`.
    loss_fn : logits [N, C, ...] (of ``first_output`` of the model output) -> per-sample losses [N].
    direction : a parameter vector (cast to the parameters' dtype and device).

    Returns float64 [N] on the parameters' device.
    """
    named = trainable_params(model)
    params = list(named.values())
    tangents = dict(zip(named, _as_vector(direction, params, "direction")))
    primals = {n: p.detach() for n, p in named.items()}
    x = _to_model(inputs, params[0])
    if x.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float64, device=params[0].device)

    def losses(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return loss_fn(first_output(functional_call(model, p, (x,))))

    with eval_mode(model), _quiet_jvp():
        _, tangent = jvp(losses, (primals,), (tangents,))
    if tangent.shape != (x.shape[0],):
        raise ConfigError(
            f"loss_fn returned shape {tuple(tangent.shape)} for {x.shape[0]} samples; it must "
            "return one loss per sample, shape [N]"
        )
    return tangent.to(torch.float64)


def dataset_directional_derivatives(
    model: nn.Module,
    dataset: Dataset,
    indices: Indices,
    direction: Sequence[torch.Tensor],
    loss_fn: CandidateLoss | None = None,
    *,
    batch_size: int = 128,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """:func:`directional_derivatives` of the samples ``indices`` of ``dataset`` (all if None),
    ``batch_size`` at a time -> float64 [M] in the order of ``indices``.

    ``loss_fn(logits, targets) -> [b]`` gets each batch's logits and targets (None for an unlabelled
    dataset); the default is the per-sample cross-entropy with the dataset's labels.
    """
    params = list(trainable_params(model).values())
    vec = _as_vector(direction, params, "direction")
    _check_batch_size(batch_size)
    _compute_device(params, device)
    loss = _default_candidate_loss if loss_fn is None else loss_fn
    out = [torch.zeros(0, dtype=torch.float64, device=params[0].device)]
    for x, y in iter_batches(dataset, batch_size, indices):
        y = None if y is None else y.to(params[0].device)
        out.append(directional_derivatives(model, x, lambda z, y=y: loss(z, y), vec))
    return torch.cat(out)


def influence_scores(
    model: nn.Module,
    eval_dataset: Dataset,
    eval_indices: Indices,
    train_dataset: Dataset,
    labeled_indices: Indices,
    candidate_dataset: Dataset,
    candidate_indices: Indices,
    loss_fn: CandidateLoss | None = None,
    *,
    damping: float,
    tol: float = 1e-6,
    max_iter: int = 100,
    batch_size: int = 128,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, Vector, CGReport]:
    """``I(x) = (1/n) sum_j grad CE(x_j)^T (H + damping I)^-1 grad loss_fn(x)`` for every candidate.

    j runs over ``eval_indices`` of ``eval_dataset`` (with their labels), H is the Hessian of the
    mean CE over ``labeled_indices`` of ``train_dataset``, x over ``candidate_indices`` of
    ``candidate_dataset`` with ``loss_fn(logits, targets) -> [b]`` (default: CE with the
    candidates' labels; an unsupervised loss may ignore ``targets``). Cost: one backward pass over
    the evaluation samples, one double-backward pass over the labelled samples per CG iteration
    (plus one), one forward-mode pass over the candidates.

    Returns (scores float64 [M], s = (H + damping I)^-1 g_bar, the CG report). Check
    ``report.converged``: the scores are only as accurate as the solve.
    """
    g_bar = mean_loss_gradient(
        model, eval_dataset, eval_indices, batch_size=batch_size, device=device
    )
    s, report = inverse_hvp(
        model,
        train_dataset,
        labeled_indices,
        g_bar,
        damping=damping,
        tol=tol,
        max_iter=max_iter,
        batch_size=batch_size,
        device=device,
    )
    scores = dataset_directional_derivatives(
        model,
        candidate_dataset,
        candidate_indices,
        s,
        loss_fn,
        batch_size=batch_size,
        device=device,
    )
    return scores, s, report


# ---------------------------------------------------------------------- helpers
def _zeros(params: list[torch.Tensor]) -> Vector:
    return [torch.zeros_like(p, memory_format=torch.contiguous_format) for p in params]


def _accumulate(total: Vector, grads: Sequence[torch.Tensor | None]) -> None:
    """total += grads in place; None is a parameter the loss does not reach (adds nothing)."""
    for acc, g in zip(total, grads):
        if g is not None:
            acc.add_(g)


@contextlib.contextmanager
def _quiet_jvp() -> Iterator[None]:
    """torch's first forward-AD call scripts its JVP decompositions and warns that
    torch.jit.script is deprecated: torch's own business, nothing a caller can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
        yield


def _per_sample_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per sample [N]; dense outputs [N, C, ...] average over their positions."""
    loss = F.cross_entropy(logits, targets, reduction="none")
    return loss.flatten(1).mean(dim=1) if loss.dim() > 1 else loss


def _default_candidate_loss(logits: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
    if targets is None:
        raise ConfigError(
            "the candidates have no labels, so the default cross-entropy loss cannot be used; "
            "pass a loss_fn(logits, targets) that does not need them"
        )
    return _per_sample_ce(logits, targets)


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """Inner product of two vectors in float64 (one host synchronisation)."""
    device = a[0].device
    parts = [
        torch.dot(x.flatten().to(torch.float64), y.flatten().to(torch.float64)).to(device)
        for x, y in zip(a, b)
    ]
    return float(torch.stack(parts).sum())


def _as_vector(v: Sequence[torch.Tensor], params: list[torch.Tensor], what: str) -> Vector:
    """``v`` as a detached parameter vector in the parameters' dtypes and devices."""
    if isinstance(v, torch.Tensor) or len(v) != len(params):
        given = "a single tensor" if isinstance(v, torch.Tensor) else f"{len(v)} tensors"
        raise ConfigError(
            f"{what} must be a list of {len(params)} tensors shaped like trainable_params(model), "
            f"got {given}"
        )
    out = []
    for i, (t, p) in enumerate(zip(v, params)):
        if t.shape != p.shape:
            raise ConfigError(
                f"{what}[{i}] has shape {tuple(t.shape)} but parameter {i} has "
                f"{tuple(p.shape)}; pass tensors shaped like trainable_params(model)"
            )
        out.append(t.detach().to(device=p.device, dtype=p.dtype))
    return out


def _count(dataset: Dataset, indices: Indices) -> int:
    n = len(dataset) if indices is None else len(indices)  # type: ignore[arg-type]
    if n == 0:
        raise ConfigError("no samples to average the loss over; pass a non-empty set of indices")
    return n


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")


def _compute_device(params: list[torch.Tensor], device: torch.device | str | None) -> None:
    """Check that a requested device is the one the parameters are on."""
    if device is None:
        return
    want, have = torch.device(device), params[0].device
    if want.type != have.type or (want.index is not None and want.index != have.index):
        raise ConfigError(
            f"device {want} differs from the model's device {have}; move the model there first "
            "or leave device unset"
        )


def _to_model(x: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    return x.to(param.device, dtype=param.dtype if x.is_floating_point() else None)


def _labelled_batches(
    model: nn.Module,
    dataset: Dataset,
    indices: Indices,
    batch_size: int,
    device: torch.device | str | None,
):
    """(inputs, labels) batches on the parameters' device and dtype; labels are required."""
    _check_batch_size(batch_size)
    param = next(p for p in model.parameters() if p.requires_grad)
    _compute_device([param], device)
    for x, y in iter_batches(dataset, batch_size, indices):
        if y is None:
            raise ConfigError(
                "the dataset has no labels, but the cross-entropy needs them; pass a dataset of "
                "(input, label) pairs"
            )
        yield _to_model(x, param), y.to(param.device)
