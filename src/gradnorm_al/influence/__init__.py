"""Influence of a candidate sample on the mean evaluation loss (Wang et al., AAAI 2022, Eq. 3).

For a model with trainable parameters theta, labelled (training) samples i = 1..m, held-out
evaluation samples j = 1..n and a candidate x with loss l(x), this package computes

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
that order. This package knows nothing of active learning.

* :mod:`.curvature`: Hessian- and Gauss-Newton-vector products, Lanczos eigenvalue estimates;
* :mod:`.solvers`: conjugate gradient and the damped inverse curvature-vector product;
* :mod:`.terms`: the mean loss gradient, directional derivatives and the influence scores;
* :mod:`.common`: the parameter-vector layout, arithmetic and checks they share.
"""

from .common import Indices, Vector, trainable_params
from .curvature import (
    CURVATURES,
    curvature_vector_product,
    extreme_eigenvalues,
    gauss_newton_vector_product,
    hessian_vector_product,
)
from .solvers import CGReport, conjugate_gradient, inverse_hvp
from .terms import (
    CandidateLoss,
    dataset_directional_derivatives,
    directional_derivatives,
    influence_scores,
    mean_loss_gradient,
)

__all__ = [
    "CURVATURES",
    "CGReport",
    "CandidateLoss",
    "Indices",
    "Vector",
    "conjugate_gradient",
    "curvature_vector_product",
    "dataset_directional_derivatives",
    "directional_derivatives",
    "extreme_eigenvalues",
    "gauss_newton_vector_product",
    "hessian_vector_product",
    "influence_scores",
    "inverse_hvp",
    "mean_loss_gradient",
    "trainable_params",
]
