"""Exactness of the gradnorm score against one backward pass per sample, and its semantics."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TwoHeads, assert_close_to_scale, randomise_bn
from torch.utils.data import DataLoader, TensorDataset

from gradnorm_al import ConfigError, create_model, gradnorm_scores
from gradnorm_al.pergrad import per_sample_grad_norms, per_sample_grad_norms_loop
from gradnorm_al.strategies import entropy_loss, expected_ce_loss

LOSSES = {"entropy": entropy_loss, "expected": expected_ce_loss}


def _model(name: str, in_channels: int, dtype=torch.float64, seed: int = 0):
    torch.manual_seed(seed)
    model = create_model(name, num_classes=10, in_channels=in_channels)
    return randomise_bn(model, seed).to(dtype)


# float64 agreement with the loop, against the scale of the whole score vector
EXACT = 1e-12


@pytest.mark.parametrize("scheme", ["entropy", "expected"])
@pytest.mark.parametrize("norm", ["tensor-sum", "l2"])
def test_smallcnn_matches_per_sample_loop_float64(scheme, norm):
    model = _model("smallcnn", 1)
    x = torch.randn(12, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ours = gradnorm_scores(model, x, scheme=scheme, norm=norm, batch_size=5)
    ref = per_sample_grad_norms_loop(model, x, LOSSES[scheme], norm=norm)
    assert ours.shape == (12,) and ours.dtype == torch.float64
    assert_close_to_scale(ours, ref, rel=EXACT)
    assert (ref > 0).all()  # a real, non-trivial score


@pytest.mark.parametrize("norm", ["tensor-sum", "l2", "per-tensor"])
def test_resnet18_cifar_matches_per_sample_loop_float64(norm):
    model = _model("resnet18-cifar", 3)
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ours = per_sample_grad_norms(model, x, entropy_loss, norm=norm)
    ref = per_sample_grad_norms_loop(model, x, entropy_loss, norm=norm)
    n_tensors = sum(1 for p in model.parameters() if p.requires_grad)
    assert ours.shape == ((3, n_tensors) if norm == "per-tensor" else (3,))
    assert_close_to_scale(ours, ref, rel=EXACT)


def test_tensor_sum_and_l2_are_the_documented_reductions():
    model = _model("smallcnn", 1)
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    per = per_sample_grad_norms(model, x, entropy_loss, norm="per-tensor")
    assert_close_to_scale(gradnorm_scores(model, x, norm="tensor-sum"), per.sum(1), rel=EXACT)
    assert_close_to_scale(gradnorm_scores(model, x, norm="l2"), per.pow(2).sum(1).sqrt(), rel=EXACT)
    # and they really differ, so a mix-up would be caught
    assert (per.sum(1) > per.pow(2).sum(1).sqrt() * 1.5).all()


def test_unused_head_and_tuple_output():
    torch.manual_seed(0)
    model = randomise_bn(TwoHeads()).double()
    x = torch.randn(9, 12, dtype=torch.float64)
    for norm in ("tensor-sum", "l2"):
        ours = gradnorm_scores(model, x, norm=norm)
        ref = per_sample_grad_norms_loop(model, x, entropy_loss, norm=norm)
        assert_close_to_scale(ours, ref, rel=EXACT)
    per = per_sample_grad_norms(model, x, entropy_loss, norm="per-tensor")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    unused = [i for i, n in enumerate(names) if n.startswith("unused_head")]
    assert unused and (per[:, unused] == 0).all()


def test_float32_same_ranking_and_small_median_error():
    model = _model("smallcnn", 1, dtype=torch.float32)
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    ours = gradnorm_scores(model, x, batch_size=32)
    ref = per_sample_grad_norms_loop(model, x, entropy_loss)
    rel = ((ours - ref).abs() / ref).numpy()
    assert np.median(rel) < 1e-5
    assert np.array_equal(np.argsort(-ours.numpy()), np.argsort(-ref.numpy()))


def test_expected_loss_equals_entropy_and_detached_p_gives_zero_gradient():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(20, 7, dtype=torch.float64, generator=g) * 3
    assert_close_to_scale(expected_ce_loss(logits), entropy_loss(logits), rel=1e-12)
    # the literal Eq. 6, one cross-entropy per class, matches too
    p = logits.softmax(1)
    literal = sum(
        p[:, i] * F.cross_entropy(logits, torch.full((20,), i), reduction="none") for i in range(7)
    )
    assert_close_to_scale(expected_ce_loss(logits), literal, rel=1e-12)

    # logit gradients: identical with p attached, zero (up to rounding) with p detached
    z = logits.clone().requires_grad_(True)
    (g_exp,) = torch.autograd.grad(expected_ce_loss(z).sum(), z)
    (g_ent,) = torch.autograd.grad(entropy_loss(z).sum(), z)
    (g_det,) = torch.autograd.grad(expected_ce_loss(z, detach_p=True).sum(), z)
    assert_close_to_scale(g_exp, g_ent, rel=1e-12)
    assert g_ent.abs().max() > 1e-2
    assert_close_to_scale(g_det, torch.zeros_like(g_det), rel=1e-12, scale=g_ent.abs().max())

    # so the two schemes give the same scores, and detached p gives scores of zero
    model = _model("smallcnn", 1)
    x = torch.randn(10, 1, 8, 8, dtype=torch.float64, generator=g)
    s_ent = gradnorm_scores(model, x, scheme="entropy")
    s_exp = gradnorm_scores(model, x, scheme="expected")
    assert_close_to_scale(s_exp, s_ent, rel=EXACT)
    s_det = per_sample_grad_norms(model, x, lambda z: expected_ce_loss(z, detach_p=True))
    assert_close_to_scale(s_det, torch.zeros_like(s_det), rel=1e-12, scale=s_ent.abs().max())


def test_a_tie_between_classes_scores_zero():
    # dH/dz_j = -p_j (log p_j + H) vanishes when p is uniform over the classes it gives mass to
    # (docs/fidelity.md, "Which samples gradnorm passes over"); a near-tie scores far below
    # a sample the model leans one way on
    head = torch.nn.Linear(3, 4).double()
    with torch.no_grad():
        head.weight.zero_()
        head.weight[0, 0], head.weight[1, 0] = 1.0, -1.0
        head.bias.copy_(torch.tensor([0.0, 0.0, -80.0, -80.0], dtype=torch.float64))
    # x[0] = 0: classes 0 and 1 tie (the others ~e-35); 0.01: a near-tie; 1.5: leaning to 0
    x = torch.tensor([[0.0, 1.0, 2.0], [0.01, 1.0, 2.0], [1.5, 1.0, 2.0]], dtype=torch.float64)
    scores = gradnorm_scores(head, x, scheme="entropy", norm="l2")
    grads = [torch.autograd.grad(entropy_loss(head(xi[None]))[0], [*head.parameters()]) for xi in x]
    reference = torch.stack([torch.cat([g.flatten() for g in gs]).norm() for gs in grads])
    assert_close_to_scale(scores, reference, rel=EXACT)
    assert scores[0] < 1e-12 * scores[2]
    assert scores[1] < 0.05 * scores[2]  # 3% here, linear in the logit gap


def test_entropy_is_finite_for_confident_outputs():
    logits = torch.tensor([[1000.0, 0.0, -1000.0], [0.0, 0.0, 0.0]])
    h = entropy_loss(logits)
    assert torch.isfinite(h).all()
    assert h[0] == 0 and torch.isclose(h[1], torch.log(torch.tensor(3.0)))
    naive = -(logits.softmax(1) * logits.softmax(1).log()).sum(1)
    assert torch.isnan(naive[0])  # the pitfall the log_softmax form avoids


def test_model_left_untouched():
    model = _model("smallcnn", 1, dtype=torch.float32)
    model.train()
    model.blocks[1].eval()  # a mixed mode must come back exactly
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    before = copy.deepcopy(model.state_dict())
    grads = [p.grad.clone() for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    x = torch.randn(10, 1, 8, 8)
    gradnorm_scores(model, x, batch_size=4)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # parameters and BN buffers (num_batches_tracked too)
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert [p.requires_grad for p in model.parameters()] == flags


def test_input_forms_and_order():
    model = _model("smallcnn", 1)
    x = torch.randn(11, 1, 8, 8, dtype=torch.float64)
    y = torch.arange(11)
    expected = per_sample_grad_norms_loop(model, x, entropy_loss)
    forms = [
        x,
        TensorDataset(x, y),  # (input, target) items; targets ignored
        TensorDataset(x),  # tensor-only items
        DataLoader(TensorDataset(x, y), batch_size=4),
        [xi for xi in x],  # a plain sequence of tensors is a Dataset too
    ]
    for data in forms:
        assert_close_to_scale(gradnorm_scores(model, data, batch_size=3), expected, rel=EXACT)
    # float32 inputs are cast to the model's dtype
    assert_close_to_scale(gradnorm_scores(model, x.float()), gradnorm_scores(model, x), rel=1e-6)


def test_frozen_parameters_are_excluded():
    model = _model("smallcnn", 1)
    for p in model.blocks[0].parameters():
        p.requires_grad_(False)
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    ours = gradnorm_scores(model, x)
    ref = per_sample_grad_norms_loop(model, x, entropy_loss)
    assert_close_to_scale(ours, ref, rel=EXACT)


def test_bad_arguments():
    model = _model("smallcnn", 1)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    with pytest.raises(ConfigError, match="scheme"):
        gradnorm_scores(model, x, scheme="margin")
    with pytest.raises(ConfigError, match="norm"):
        gradnorm_scores(model, x, norm="l1")
    with pytest.raises(ConfigError, match="batch_size"):
        gradnorm_scores(model, x, batch_size=0)
