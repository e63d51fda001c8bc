"""The baselines that run on segmentation, each against a slow, obviously-correct reference on
fcn-small with synthetic shapes: mc-dropout (pixel BALD, max-entropy, variation ratio), core-set
(k-center greedy on pooled features), badge (the 1x1 classifier's gradient embedding through the
bilinear upsampling), vaal (images only); the task's reductions mean / sum / max; the refusals of
the others."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_context, randomise_bn
from torch import nn
from torch.utils.data import TensorDataset

from gradnorm_al import ActiveLearner, ConfigError, SegmentationTask
from gradnorm_al._torch import seeded_torch
from gradnorm_al.data.shapes import synthetic_shapes
from gradnorm_al.models import create_model
from gradnorm_al.models.fcn import FCNSmall
from gradnorm_al.strategies import STRATEGIES, create_strategy
from gradnorm_al.strategies.mc_dropout import (
    DROPOUT_TYPES,
    bald_scores,
    max_entropy_scores,
    mc_dropout_probabilities,
    mc_dropout_scores,
    variation_ratio_scores,
)
from gradnorm_al.strategies.samplers import dense_gradient_embeddings
from gradnorm_al.tasks import REDUCTIONS, reduce_elements
from gradnorm_al.train import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: see conftest.one_thread

C = 3


def _fcn(seed: int = 0, dtype=torch.float32) -> nn.Module:
    """fcn-small (output stride 2: a real bilinear upsampling), random BN statistics, eval."""
    torch.manual_seed(seed)
    return randomise_bn(FCNSmall(num_classes=C, in_channels=3, width=4)).to(dtype).eval()


def _pool(n: int = 10, size: int = 8, seed: int = 0) -> TensorDataset:
    x, masks = synthetic_shapes(n, size, seed=seed)
    return TensorDataset(x, masks)


def _ctx(model, pool, candidates, labeled=(), *, reduction="mean", seed=0, batch_size=4):
    task = SegmentationTask(C, reduction=reduction)
    return make_context(
        model, pool, candidates, labeled, seed=seed, num_classes=C, batch_size=batch_size, task=task
    )


def _reduce_by_hand(values: np.ndarray, reduction: str) -> float:
    flat = [float(v) for v in values.reshape(-1)]
    if reduction == "mean":
        return sum(flat) / len(flat)
    return sum(flat) if reduction == "sum" else max(flat)


def _entropy_by_hand(p) -> float:
    return -sum(float(q) * math.log(float(q)) for q in p if q > 0)


# ------------------------------------------------------------------------------------------------
# mc-dropout


def _mc_model(seed: int = 0) -> nn.Module:
    strategy = create_strategy("mc-dropout", p=0.5)
    return strategy.prepare_model(_fcn(seed))


def test_dense_models_get_a_dropout_layer_that_changes_nothing_in_eval_mode():
    strategy = create_strategy("mc-dropout", p=0.3)
    x = torch.rand(2, 3, 16, 16)
    for name in ("fcn-small", "drn-d-22"):
        torch.manual_seed(0)
        model = create_model(name, num_classes=C, in_channels=3).eval()
        conv = model.classifier
        before = model(x)
        assert not any(isinstance(m, DROPOUT_TYPES) for m in model.modules())
        assert strategy.prepare_model(model) is model
        assert isinstance(model.classifier[0], nn.Dropout) and model.classifier[0].p == 0.3
        assert model.classifier[1] is conv
        model.eval()
        assert torch.allclose(model(x), before, atol=1e-6 * before.abs().max().item())
        # with the dropout on, the passes differ and every pixel still gets a distribution
        probs = mc_dropout_probabilities(model, x, 2)
        assert probs.shape == (2, C, 16, 16, 2)
        assert not torch.equal(probs[..., 0], probs[..., 1])
        assert torch.allclose(probs.sum(dim=1), torch.ones(2, 16, 16, 2, dtype=torch.float64))
        assert not model.training and not model.classifier[0].training  # modes restored


def test_acquisitions_of_dense_probabilities_are_those_of_each_pixel():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(2, C, 3, 4, 5, generator=g, dtype=torch.float64), dim=1)
    probs[0, :, 1, 2, :] = probs[0, :, 1, 2, :1]  # one pixel that no pass changes
    per_pixel = probs.permute(0, 2, 3, 1, 4).reshape(-1, C, 5)  # [n * H * W, C, T]
    for formula in (bald_scores, max_entropy_scores, variation_ratio_scores):
        dense = formula(probs)
        assert dense.shape == (2, 3, 4)
        torch.testing.assert_close(dense.reshape(-1), formula(per_pixel), rtol=0, atol=1e-15)
    assert bald_scores(probs)[0, 1, 2] == 0  # exactly: the deviations from pass 0 are all 0
    assert variation_ratio_scores(probs)[0, 1, 2] == 0


def _mc_reference(model, pool, candidates, samples, seed, batch_size, acquisition, reduction):
    """Plain loops: the same masks (same seed, same batches, passes in order), then each pixel's
    acquisition from its T softmax vectors by hand, then the reduction by hand."""
    torch_seed = int(np.random.default_rng(seed).integers(0, 2**63 - 1))
    x_all = torch.stack([pool[int(i)][0] for i in candidates])
    passes = []  # per batch: [T, B, C, H, W]
    with seeded_torch("cpu", torch_seed), torch.no_grad():
        model.eval()
        model.classifier[0].train()
        for start in range(0, len(x_all), batch_size):
            x = x_all[start : start + batch_size]
            passes.append(
                np.stack([F.softmax(model(x).double(), 1).numpy() for _ in range(samples)])
            )
        model.eval()
    probs = np.concatenate(passes, axis=1)  # [T, N, C, H, W]
    scores = []
    for n in range(probs.shape[1]):
        pixel = np.zeros(probs.shape[3:])
        for h in range(probs.shape[3]):
            for w in range(probs.shape[4]):
                p = probs[:, n, :, h, w]  # [T, C]
                mean = [sum(p[t][c] for t in range(samples)) / samples for c in range(C)]
                if acquisition == "bald":
                    expected = sum(_entropy_by_hand(p[t]) for t in range(samples)) / samples
                    value = max(0.0, _entropy_by_hand(mean) - expected)
                elif acquisition == "max-entropy":
                    value = _entropy_by_hand(mean)
                else:
                    votes = [int(np.argmax(p[t])) for t in range(samples)]
                    value = 1.0 - max(votes.count(c) for c in range(C)) / samples
                pixel[h, w] = value
        scores.append(_reduce_by_hand(pixel, reduction))
    return np.array(scores)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_mc_dropout_dense_scores_match_a_per_pixel_loop(reduction):
    # seed 3: votes flip at some pixels, so the variation ratio is not 0 everywhere
    model, pool, candidates = _mc_model(3), _pool(7), np.array([6, 0, 3, 5, 1])
    for acquisition in ("bald", "max-entropy", "variation-ratio"):
        strategy = create_strategy("mc-dropout", samples=4, acquisition=acquisition)
        got = strategy.score(
            _ctx(model, pool, candidates, reduction=reduction, seed=7, batch_size=2)
        )
        want = _mc_reference(model, pool, candidates, 4, 7, 2, acquisition, reduction)
        assert got.shape == (5,) and (got > 0).all()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * np.abs(want).max())


def test_streamed_passes_equal_the_stacked_ones():
    model, x = _mc_model(), torch.rand(3, 3, 8, 8)
    for acquisition, formula in (
        ("bald", bald_scores),
        ("variation-ratio", variation_ratio_scores),
    ):
        with seeded_torch("cpu", 5):
            streamed = mc_dropout_scores(model, x, 6, acquisition)
        with seeded_torch("cpu", 5):
            stacked = formula(mc_dropout_probabilities(model, x, 6))
        assert streamed.shape == (3, 8, 8)
        torch.testing.assert_close(streamed, stacked, rtol=0, atol=1e-15)


# ------------------------------------------------------------------------------------------------
# badge


def _autograd_embedding(model, x, reduction):
    """Per image, one float64 backward: d reduce(CE(model(x), argmax)) / d classifier.weight."""
    out = []
    for i in range(len(x)):
        logits = model(x[i : i + 1])
        ce = F.cross_entropy(logits, logits.argmax(dim=1), reduction="none")
        loss = reduce_elements(ce, reduction).sum()
        (grad,) = torch.autograd.grad(loss, model.classifier.weight)
        out.append(grad.reshape(C, -1))
    return torch.stack(out)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("hw", [(8, 8), (9, 7)])  # 9x7: features 5x4, a non-integer upsampling
def test_badge_dense_embedding_is_the_classifier_gradient_through_the_upsampling(reduction, hw):
    model = _fcn(dtype=torch.float64)
    x = torch.rand(4, 3, *hw, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = dense_gradient_embeddings(model, x, lambda v: reduce_elements(v, reduction))
    want = _autograd_embedding(model, x, reduction)
    assert got.shape == (4, C, model.feature_dim) and got.dtype == torch.float64
    scale = want.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12 * scale)
    if reduction == "mean":  # the same loss on the low-resolution logits is another gradient
        with torch.no_grad():
            feats = model.features(x)
            low = model.classifier(feats)
        u = F.softmax(low, 1) - F.one_hot(low.argmax(1), C).movedim(-1, 1)
        naive = torch.einsum("bcr,bdr->bcd", u.flatten(2) / u[0, 0].numel(), feats.flatten(2))
        assert (naive - want).abs().max() > 1e-3 * scale


def test_badge_dense_needs_the_dense_model_contract():
    class NoClassifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Conv2d(3, C, 1)

        def forward(self, x):
            return self.net(x)

    class Nearest(FCNSmall):  # upsamples with another rule than the one the gradient assumes
        def forward(self, x):
            return F.interpolate(self.classifier(self.features(x)), size=x.shape[2:])

    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(ConfigError, match="1x1 convolution `classifier`.*NoClassifier has none"):
        dense_gradient_embeddings(NoClassifier(), x, reduce_elements)
    torch.manual_seed(0)
    with pytest.raises(ConfigError, match="bilinear upsampling.*Nearest's output differs"):
        dense_gradient_embeddings(Nearest(C, 3, width=4).eval(), x, reduce_elements)


def _kmeans_pp_reference(emb: np.ndarray, k: int, rng: np.random.Generator) -> list[int]:
    """k-means++ seeding by brute force: largest norm first, then draws proportional to D^2."""
    chosen = [int(np.argmax((emb**2).sum(1)))]
    while len(chosen) < k:
        d2 = np.array([min(((e - emb[c]) ** 2).sum() for c in chosen) for e in emb])
        d2[chosen] = 0.0
        cdf = np.cumsum(d2)
        chosen.append(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")))
    return chosen


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_badge_dense_selection_is_kmeans_pp_on_the_autograd_embeddings(reduction):
    model, pool = _fcn(dtype=torch.float64), _pool(12)
    candidates = np.arange(2, 12)
    chosen = create_strategy("badge")(_ctx(model, pool, candidates, [0, 1], reduction=reduction), 5)
    x = torch.stack([pool[int(i)][0] for i in candidates]).double()
    emb = _autograd_embedding(model, x, reduction).flatten(1).numpy()
    want = _kmeans_pp_reference(emb, 5, np.random.default_rng(0))
    assert chosen.tolist() == candidates[want].tolist()


# ------------------------------------------------------------------------------------------------
# core-set


def test_core_set_dense_is_k_center_greedy_on_pooled_features():
    model, pool = _fcn(), _pool(14)
    labeled, candidates = np.array([0, 5]), np.setdiff1d(np.arange(14), [0, 5])
    for reduction in REDUCTIONS:  # no per-pixel score: the reduction cannot matter
        ctx = _ctx(model, pool, candidates, labeled, reduction=reduction)
        chosen = create_strategy("core-set")(ctx, 6)
        with torch.no_grad():
            feats = {
                int(i): model.features(pool[int(i)][0][None]).mean(dim=(2, 3))[0].double().numpy()
                for i in range(14)
            }
        centres, want = [feats[i] for i in labeled], []
        for _ in range(6):
            dist = {
                int(j): min(float(np.sqrt(((feats[int(j)] - c) ** 2).sum())) for c in centres)
                for j in candidates
                if int(j) not in want
            }
            best = max(dist, key=lambda j: (dist[j], -j))  # ties: the earlier candidate
            want.append(best)
            centres.append(feats[best])
        assert chosen.tolist() == want


# ------------------------------------------------------------------------------------------------
# vaal


def test_vaal_on_segmentation_sees_the_images_only():
    pool = _pool(12, size=16)
    params = {"iterations": 3, "batch_size": 4, "latent_dim": 4, "width": 4, "hidden": 8}
    ctx = [_ctx(_fcn(seed), pool, np.arange(4, 12), np.arange(4), seed=3) for seed in (0, 1)]
    a = create_strategy("vaal", **params).score(ctx[0])
    b = create_strategy("vaal", **params).score(ctx[1])  # another task model, same seed
    assert a.shape == (8,) and np.isfinite(a).all() and len(np.unique(a)) == 8
    np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------------
# through the learner, and the refusals

DENSE_BASELINES = {
    "mc-dropout": {"samples": 3},
    "badge": {},
    "core-set": {},
    "vaal": {"iterations": 2, "batch_size": 4, "latent_dim": 4, "width": 4, "hidden": 8},
}


@pytest.mark.parametrize("name", sorted(DENSE_BASELINES))
def test_dense_baselines_query_through_the_active_learner(name):
    x, masks = synthetic_shapes(16, 8, seed=2)
    masks[:, 0, :] = 255  # an ignored row in the labels

    def learner(reduction):
        active = ActiveLearner(
            lambda: FCNSmall(C, 3, width=4),
            TensorDataset(x, masks),
            SegmentationTask(C, reduction=reduction),
            create_strategy(name, **DENSE_BASELINES[name]),
            train=TrainConfig(epochs=1, batch_size=4),
            seed=5,
        )
        active.update(np.arange(5), masks[:5])
        return active.fit()

    picked = learner("max").query(4)
    assert len(set(picked.tolist())) == 4 and set(picked.tolist()) <= set(range(5, 16))
    assert learner("max").query(4).tolist() == picked.tolist()  # same seed, same selection


REFUSED = {
    "qbc": "per-pixel committee is not implemented",
    "egl": "a segmentation label is a whole mask",
    "ll4al": "predicting an image's reduced pixel loss is not implemented",
    "sraal": "its target learner classifies the VAE latent into one label per sample",
    "uncertain-gcn": "pooled segmentation features are untested here",
    "core-gcn": "pooled segmentation features are untested here",
    "expected-gradnorm": "C times the entropy",
}


def test_every_other_strategy_refuses_segmentation_with_its_own_reason():
    assert set(STRATEGIES.names()) - set(REFUSED) == {
        "random", "entropy", "margin", "least-confidence", "entropy-gradnorm", *DENSE_BASELINES
    }  # fmt: skip
    for name, reason in REFUSED.items():
        with pytest.raises(ConfigError) as info:
            ActiveLearner(_fcn, _pool(4), SegmentationTask(C), name)
        message = str(info.value)
        assert message.startswith(f"strategy {name} cannot run on the segmentation task: ")
        assert reason in message and "\n" not in message
        assert "mc-dropout" in message.split("strategies that can: ")[1]
