"""Influence-function maths (gradnorm_al.influence) against explicit Hessians and per-sample
backward passes, in float64, against the scale of the whole vector (conftest's
assert_close_to_scale): 1e-12 for exact products, the solver's accuracy for CG solves."""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_to_scale, randomise_bn
from torch import nn
from torch.func import functional_call

from gradnorm_al.data import tensor_dataset
from gradnorm_al.errors import ConfigError
from gradnorm_al.influence import (
    conjugate_gradient,
    dataset_directional_derivatives,
    directional_derivatives,
    extreme_eigenvalues,
    gauss_newton_vector_product,
    hessian_vector_product,
    influence_scores,
    inverse_hvp,
    mean_loss_gradient,
    trainable_params,
)
from gradnorm_al.models import create_model
from gradnorm_al.strategies import entropy_loss

BATCH = 5  # smaller than every set below and dividing none of them: batching must not matter
LABELED = np.array([0, 2, 3, 5, 7, 8, 11, 12, 14, 15, 17, 18, 19])
CANDIDATES = np.array([1, 4, 6, 9, 10, 13, 16])


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _bn_mlp() -> nn.Module:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))
    return randomise_bn(model.double(), seed=1)


MODELS = {"mlp": _mlp, "bn-mlp": _bn_mlp}


def _datasets():
    rng = np.random.default_rng(0)
    train = tensor_dataset(rng.normal(size=(20, 4)), rng.integers(0, 3, size=20))
    evaluation = tensor_dataset(rng.normal(size=(9, 4)), rng.integers(0, 3, size=9))
    return train, evaluation


class Flat:
    """The model as a function of one flat float64 parameter vector, in eval mode (on a copy)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = copy.deepcopy(model).eval()
        named = trainable_params(self.model)
        self.names = list(named)
        self.shapes = [p.shape for p in named.values()]
        self.theta = torch.cat([p.detach().flatten() for p in named.values()])

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = theta.split([int(np.prod(s)) for s in self.shapes])
        return {n: t.view(s) for n, t, s in zip(self.names, parts, self.shapes)}

    def losses(self, theta: torch.Tensor, x: torch.Tensor, loss_fn) -> torch.Tensor:
        return loss_fn(functional_call(self.model, self.unflatten(theta), (x.double(),)))

    def mean_ce(self, dataset, indices) -> Callable[[torch.Tensor], torch.Tensor]:
        x, y = (t[torch.as_tensor(indices)] for t in dataset.tensors)
        return lambda theta: self.losses(theta, x, lambda z: F.cross_entropy(z, y))

    def per_sample_grads(self, x: torch.Tensor, loss_fn) -> torch.Tensor:
        """[N, P]: one backward pass per sample."""
        rows = []
        for i in range(len(x)):
            theta = self.theta.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(self.losses(theta, x[i : i + 1], loss_fn)[0], theta)
            rows.append(g)
        return torch.stack(rows)


def _ce_of(targets: torch.Tensor):
    return lambda logits: F.cross_entropy(logits, targets, reduction="none")


def _flat(vec) -> torch.Tensor:
    return torch.cat([t.flatten() for t in vec])


def _explicit(model):
    """Explicit H (mean CE Hessian over LABELED), a damping making H + damping I positive
    definite, and the mean evaluation-loss gradient."""
    train, evaluation = _datasets()
    flat = Flat(model)
    hessian = torch.autograd.functional.hessian(flat.mean_ce(train, LABELED), flat.theta)
    damping = max(0.0, -float(torch.linalg.eigvalsh(hessian)[0])) + 0.1
    theta = flat.theta.clone().requires_grad_(True)
    (g_test,) = torch.autograd.grad(flat.mean_ce(evaluation, np.arange(9))(theta), theta)
    return flat, hessian, damping, g_test


@pytest.mark.parametrize("name", list(MODELS))
def test_hessian_vector_product_matches_explicit_hessian(name):
    model = MODELS[name]()
    train, _ = _datasets()
    flat, hessian, _, _ = _explicit(model)
    hvp = hessian_vector_product(model, train, LABELED, batch_size=BATCH)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        v = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in model.parameters()]
        hv = hvp(v)
        assert all(h.dtype == torch.float64 for h in hv)
        assert_close_to_scale(_flat(hv), hessian @ _flat(v), rel=1e-12)


@pytest.mark.parametrize("name", list(MODELS))
def test_mean_loss_gradient_and_inverse_hvp_match_explicit_solve(name):
    model = MODELS[name]()
    train, evaluation = _datasets()
    _, hessian, damping, g_test = _explicit(model)
    g_bar = mean_loss_gradient(model, evaluation, None, batch_size=BATCH)
    assert_close_to_scale(_flat(g_bar), g_test, rel=1e-12)
    s, report = inverse_hvp(
        model, train, LABELED, g_bar, damping=damping, tol=1e-12, max_iter=500, batch_size=BATCH
    )
    expected = torch.linalg.solve(
        hessian + damping * torch.eye(len(g_test), dtype=torch.float64), g_test
    )
    assert report.converged and not report.negative_curvature
    assert 0 < report.iterations <= 500 and report.relative_residual <= 1e-12
    assert_close_to_scale(_flat(s), expected, rel=1e-8)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("loss", ["ce", "entropy"])
def test_influence_scores_match_explicit_formula(name, loss):
    """The acceptance test: (1/n) g_test^T (H + damping I)^-1 g_x, g_x by one backward each."""
    model = MODELS[name]()
    train, evaluation = _datasets()
    flat, hessian, damping, g_test = _explicit(model)
    x, y = (t[torch.as_tensor(CANDIDATES)] for t in train.tensors)
    if loss == "ce":
        loss_fn = None
        g_x = torch.cat(
            [flat.per_sample_grads(x[i : i + 1], _ce_of(y[i : i + 1])) for i in range(len(x))]
        )
    else:

        def loss_fn(logits, targets):
            return entropy_loss(logits)

        g_x = flat.per_sample_grads(x, entropy_loss)
    expected = g_x @ torch.linalg.solve(
        hessian + damping * torch.eye(len(g_test), dtype=torch.float64), g_test
    )
    scores, s, report = influence_scores(
        model,
        evaluation,
        None,
        train,
        LABELED,
        train,
        CANDIDATES,
        loss_fn,
        damping=damping,
        tol=1e-12,
        max_iter=500,
        batch_size=BATCH,
    )
    assert report.converged
    assert scores.dtype == torch.float64 and scores.shape == (len(CANDIDATES),)
    assert_close_to_scale(scores, expected, rel=1e-8)  # the solve's accuracy
    # the scores are s . grad l(x): s is the returned inverse-HVP
    assert_close_to_scale(scores, g_x @ _flat(s), rel=1e-12)


@pytest.mark.parametrize("name", list(MODELS))
def test_directional_derivatives_match_per_sample_backward(name):
    model = MODELS[name]()
    train, _ = _datasets()
    x, y = train.tensors
    flat = Flat(model)
    g = torch.Generator().manual_seed(4)
    direction = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in model.parameters()]

    def ce(logits):
        return F.cross_entropy(logits, y, reduction="none")

    got = directional_derivatives(model, x, ce, direction)
    grads = torch.cat(
        [flat.per_sample_grads(x[i : i + 1], _ce_of(y[i : i + 1])) for i in range(len(x))]
    )
    assert got.dtype == torch.float64
    assert_close_to_scale(got, grads @ _flat(direction), rel=1e-12)
    # the batched dataset version (default loss: CE with the dataset's labels) agrees
    batched = dataset_directional_derivatives(model, train, None, direction, batch_size=BATCH)
    assert_close_to_scale(batched, got, rel=1e-12)


def test_directional_derivatives_on_smallcnn_with_inplace_relu_and_batchnorm():
    torch.manual_seed(0)
    model = randomise_bn(create_model("smallcnn", num_classes=10, in_channels=1).double())
    model.train()
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 3, 9, 3, 1, 7])
    flat = Flat(model)
    g = torch.Generator().manual_seed(5)
    direction = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in model.parameters()]
    cases = [
        # (batched loss over all rows, loss of row i alone)
        (lambda z: F.cross_entropy(z, y, reduction="none"), lambda i: _ce_of(y[i : i + 1])),
        (entropy_loss, lambda i: entropy_loss),
    ]
    for batched, single in cases:
        got = directional_derivatives(model, x, batched, direction)
        grads = torch.cat([flat.per_sample_grads(x[i : i + 1], single(i)) for i in range(len(x))])
        assert_close_to_scale(got, grads @ _flat(direction), rel=1e-12)
    assert all(m.training for m in model.modules())


def test_float32_model_stays_float32_and_agrees_with_float64():
    model64 = _mlp()
    model32 = copy.deepcopy(model64).float()
    train, evaluation = _datasets()
    results = {}
    for model in (model64, model32):
        g_bar = mean_loss_gradient(model, evaluation, None, batch_size=BATCH)
        assert all(g.dtype == next(model.parameters()).dtype for g in g_bar)
        results[model] = influence_scores(
            model,
            evaluation,
            None,
            train,
            LABELED,
            train,
            CANDIDATES,
            damping=1.0,
            tol=1e-5,
            batch_size=BATCH,
        )
    (scores64, s64, _), (scores32, s32, report32) = results[model64], results[model32]
    assert report32.converged and scores32.dtype == torch.float64
    assert all(t.dtype == torch.float32 for t in s32)
    assert_close_to_scale(scores32, scores64, rel=1e-4)
    assert_close_to_scale(_flat(s32).double(), _flat(s64), rel=1e-4)


def _spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.logspace(0, 4, n, dtype=torch.float64)) @ q.T


def test_conjugate_gradient_reports_non_convergence_with_true_residual():
    a = _spd(8, seed=0)
    b = [torch.linspace(-1, 2, 8, dtype=torch.float64)]

    def matvec(v):
        return [a @ v[0]]

    x, report = conjugate_gradient(matvec, b, damping=0.5, tol=1e-12, max_iter=2)
    residual = b[0] - (a + 0.5 * torch.eye(8, dtype=torch.float64)) @ x[0]
    assert report.iterations == 2 and not report.converged and not report.negative_curvature
    assert report.relative_residual == pytest.approx(float(residual.norm() / b[0].norm()), 1e-12)
    assert report.relative_residual > 1e-6
    x, report = conjugate_gradient(matvec, b, damping=0.5, tol=1e-12, max_iter=100)
    expected = torch.linalg.solve(a + 0.5 * torch.eye(8, dtype=torch.float64), b[0])
    assert report.converged
    assert_close_to_scale(x[0], expected, rel=1e-9)
    # b = 0: nothing to do
    x, report = conjugate_gradient(matvec, [torch.zeros(8, dtype=torch.float64)], damping=0.0)
    assert report.converged and report.iterations == 0 and not x[0].any()


def test_conjugate_gradient_stops_on_negative_curvature_and_damping_fixes_it():
    a = torch.diag(torch.tensor([1.0, -5.0, 1.0], dtype=torch.float64))
    b = [torch.ones(3, dtype=torch.float64)]

    def matvec(v):
        return [a @ v[0]]

    x, report = conjugate_gradient(matvec, b, damping=0.0)
    assert report.negative_curvature and not report.converged
    assert report.iterations == 0 and report.relative_residual == 1.0 and not x[0].any()
    x, report = conjugate_gradient(matvec, b, damping=6.0, tol=1e-12)
    assert report.converged and not report.negative_curvature
    expected = torch.linalg.solve(a + 6.0 * torch.eye(3, dtype=torch.float64), b[0])
    assert_close_to_scale(x[0], expected, rel=1e-12)


def test_model_modes_parameters_buffers_and_grads_are_left_alone():
    model = _bn_mlp()
    model.train()
    model[3].eval()  # a mixed state must come back as it was
    sentinel = torch.full_like(model[0].weight, 7.0)
    model[0].weight.grad = sentinel.clone()
    state = copy.deepcopy(model.state_dict())
    modes = [m.training for m in model.modules()]
    train, evaluation = _datasets()
    influence_scores(
        model, evaluation, None, train, LABELED, train, CANDIDATES, damping=1.0, batch_size=BATCH
    )
    direction = [torch.ones_like(p) for p in model.parameters()]
    directional_derivatives(model, train.tensors[0], entropy_loss, direction)
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(model[0].weight.grad, sentinel)
    assert all(p.grad is None for n, p in model.named_parameters() if n != "0.weight")
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)


def test_bad_input_raises_config_error():
    model = _mlp()
    train, evaluation = _datasets()
    unlabelled = torch.utils.data.TensorDataset(train.tensors[0])
    with pytest.raises(ConfigError, match="no labels"):
        mean_loss_gradient(model, unlabelled, None, batch_size=BATCH)
    with pytest.raises(ConfigError, match="non-empty"):
        mean_loss_gradient(model, evaluation, [], batch_size=BATCH)
    with pytest.raises(ConfigError, match="shaped like"):
        inverse_hvp(model, train, LABELED, [torch.zeros(3)], damping=1.0)
    with pytest.raises(ConfigError, match="damping"):
        conjugate_gradient(lambda v: v, [torch.ones(2)], damping=-1.0)
    with pytest.raises(ConfigError, match="one loss per sample"):
        directional_derivatives(
            model, train.tensors[0], lambda z: z, [torch.zeros_like(p) for p in model.parameters()]
        )
    with pytest.raises(ConfigError, match="no labels"):
        dataset_directional_derivatives(
            model, unlabelled, None, [torch.zeros_like(p) for p in model.parameters()]
        )


@pytest.mark.parametrize("name", list(MODELS))
def test_gauss_newton_product_matches_explicit_jacobian_form_and_solves(name):
    """G = (1/m) sum_i J_i^T (diag(p_i) - p_i p_i^T) J_i, J_i by torch.autograd.functional."""
    model = MODELS[name]()
    train, _ = _datasets()
    flat = Flat(model)
    x, y = (t[torch.as_tensor(LABELED)] for t in train.tensors)
    gn = torch.zeros(len(flat.theta), len(flat.theta), dtype=torch.float64)
    for i in range(len(x)):
        jac = torch.autograd.functional.jacobian(
            lambda th, i=i: flat.losses(th, x[i : i + 1], lambda z: z)[0], flat.theta
        )  # [C, P]
        p = torch.softmax(flat.losses(flat.theta, x[i : i + 1], lambda z: z)[0], 0)
        gn += jac.T @ (torch.diag(p) - torch.outer(p, p)) @ jac / len(x)
    assert float(torch.linalg.eigvalsh(gn)[0]) > -1e-12  # positive semi-definite
    gvp = gauss_newton_vector_product(model, train, LABELED, batch_size=BATCH)
    g = torch.Generator().manual_seed(4)
    v = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in model.parameters()]
    assert_close_to_scale(_flat(gvp(v)), gn @ _flat(v), rel=1e-12)
    s, report = inverse_hvp(
        model,
        train,
        LABELED,
        v,
        damping=1e-3,
        tol=1e-12,
        max_iter=500,
        curvature="gauss-newton",
        batch_size=BATCH,
    )
    expected = torch.linalg.solve(gn + 1e-3 * torch.eye(len(gn), dtype=torch.float64), _flat(v))
    assert report.converged
    assert_close_to_scale(_flat(s), expected, rel=1e-8)


def test_lanczos_extreme_eigenvalues_of_an_explicit_hessian():
    model = _bn_mlp()
    train, _ = _datasets()
    _, hessian, _, _ = _explicit(model)
    eig = torch.linalg.eigvalsh(hessian)
    assert eig[0] < 0  # an indefinite Hessian: the case the estimate is for
    hvp = hessian_vector_product(model, train, LABELED, batch_size=BATCH)
    like = list(trainable_params(model).values())
    low, high = extreme_eigenvalues(hvp, like, steps=len(eig))  # a full Krylov space: exact
    assert low == pytest.approx(float(eig[0]), rel=1e-8)
    assert high == pytest.approx(float(eig[-1]), rel=1e-8)
    low, high = extreme_eigenvalues(hvp, like, steps=8)  # Ritz values lie inside the spectrum
    assert eig[0] - 1e-12 <= low < 0 and high <= eig[-1] + 1e-12
    assert high == pytest.approx(float(eig[-1]), rel=1e-2)
