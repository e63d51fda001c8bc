"""The influence term of every candidate, Eq. 3 of Wang et al. (AAAI 2022), and its factors:
the mean evaluation-loss gradient ``g_bar``, and directional derivatives ``s . grad l(x)`` of
per-sample losses along a parameter vector ``s`` by one forward-mode JVP per batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call, jvp
from torch.utils.data import Dataset

from .._torch import eval_mode, first_output
from ..data.batching import iter_batches
from ..errors import ConfigError
from ..pergrad.common import LossFn
from .common import (
    Indices,
    Vector,
    accumulate,
    as_vector,
    check_batch_size,
    check_device,
    labelled_batches,
    per_sample_ce,
    quiet_jvp,
    sample_count,
    to_model,
    trainable_params,
    zeros,
)
from .solvers import CGReport, inverse_hvp

#: maps (logits [b, C, ...], targets [b, ...] or None) of a batch of candidates to losses [b]
CandidateLoss = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


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
    n = sample_count(dataset, indices)
    total = zeros(params)
    with eval_mode(model), torch.enable_grad():
        for x, y in labelled_batches(model, dataset, indices, batch_size, device):
            loss = per_sample_ce(first_output(model(x)), y).sum() / n
            accumulate(total, torch.autograd.grad(loss, params, allow_unused=True))
    return total


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
    tangents = dict(zip(named, as_vector(direction, params, "direction")))
    primals = {n: p.detach() for n, p in named.items()}
    x = to_model(inputs, params[0])
    if x.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float64, device=params[0].device)

    def losses(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return loss_fn(first_output(functional_call(model, p, (x,))))

    with eval_mode(model), quiet_jvp():
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
    vec = as_vector(direction, params, "direction")
    check_batch_size(batch_size)
    check_device(params, device)
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


def _default_candidate_loss(logits: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
    if targets is None:
        raise ConfigError(
            "the candidates have no labels, so the default cross-entropy loss cannot be used; "
            "pass a loss_fn(logits, targets) that does not need them"
        )
    return per_sample_ce(logits, targets)
