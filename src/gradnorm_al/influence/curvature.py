"""Curvature of the mean training cross-entropy at the current model, as matrix-free products:
exact Hessian-vector products (double backward), generalised Gauss-Newton-vector products
(forward-mode JVP + backward), and Lanczos estimates of the extreme eigenvalues of either.

The products are maps ``v -> A v`` on parameter vectors (see :mod:`.common`); each call makes one
pass over the labelled samples, in eval mode, and reads the parameters at call time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp
from torch.utils.data import Dataset

from .._torch import eval_mode, first_output
from ..errors import ConfigError
from .common import (
    Indices,
    Vector,
    accumulate,
    as_vector,
    check_batch_size,
    check_device,
    dot,
    labelled_batches,
    per_sample_ce,
    quiet_jvp,
    sample_count,
    trainable_params,
    zeros,
)

CURVATURES = ("hessian", "gauss-newton")


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
    m = sample_count(dataset, indices)
    check_batch_size(batch_size)
    check_device(params, device)

    def hvp(v: Sequence[torch.Tensor]) -> Vector:
        vec = as_vector(v, params, "the vector")
        out = zeros(params)
        with eval_mode(model), torch.enable_grad():
            for x, y in labelled_batches(model, dataset, indices, batch_size, device):
                loss = per_sample_ce(first_output(model(x)), y).sum() / m
                grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
                terms = [
                    (g * vi).sum()
                    for g, vi in zip(grads, vec)
                    if g is not None and g.requires_grad  # else its Hessian block is zero
                ]
                if not terms:
                    continue
                accumulate(out, torch.autograd.grad(sum(terms), params, allow_unused=True))
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
    m = sample_count(dataset, indices)
    check_batch_size(batch_size)
    check_device(params, device)

    def gvp(v: Sequence[torch.Tensor]) -> Vector:
        tangents = dict(zip(named, as_vector(v, params, "the vector")))
        out = zeros(params)
        with eval_mode(model), torch.enable_grad():
            for x, _y in labelled_batches(model, dataset, indices, batch_size, device):
                primals = {n: p.detach() for n, p in named.items()}

                def logits_of(p: dict[str, torch.Tensor], x: torch.Tensor = x) -> torch.Tensor:
                    return first_output(functional_call(model, p, (x,)))

                with quiet_jvp():
                    _, jv = jvp(logits_of, (primals,), (tangents,))
                logits = first_output(model(x))
                prob = F.softmax(logits.detach(), dim=1)
                u = prob * (jv - (prob * jv).sum(dim=1, keepdim=True))
                positions = logits[0, 0].numel()  # dense outputs: mean over positions
                grads = torch.autograd.grad(
                    logits, params, grad_outputs=u / (m * positions), allow_unused=True
                )
                accumulate(out, grads)
        return out

    return gvp


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
    norm = math.sqrt(dot(q, q))
    q = [t / norm for t in q]
    basis, alphas, betas = [q], [], []
    for _ in range(steps):
        w = [t.detach().clone() for t in matvec(q)]
        alphas.append(dot(w, q))
        for qi in basis:  # full re-orthogonalisation keeps the Ritz values honest
            c = dot(w, qi)
            w = [wi.sub(qii, alpha=c) for wi, qii in zip(w, qi)]
        beta = math.sqrt(dot(w, w))
        if beta <= 1e-12 * max(1.0, abs(alphas[-1])):  # an invariant subspace: exact
            break
        betas.append(beta)
        q = [wi / beta for wi in w]
        basis.append(q)
    k = len(alphas)
    tri = np.diag(alphas) + np.diag(betas[: k - 1], 1) + np.diag(betas[: k - 1], -1)
    eig = np.linalg.eigvalsh(tri)
    return float(eig[0]), float(eig[-1])
