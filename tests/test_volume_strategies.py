"""Every registered strategy on 3-D classification (volumes [N, 1, D, H, W], the cryo-ET task):
the baselines that need no redesign run unchanged, vaal / sraal build their 3-D VAE, and
gradnorm's scores are the per-sample gradient norms of the 3-D model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from gradnorm_al import ActiveLearner
from gradnorm_al.errors import ConfigError
from gradnorm_al.models import create_model
from gradnorm_al.pergrad import per_sample_grad_norms_loop
from gradnorm_al.strategies import STRATEGIES, create_strategy, entropy_loss
from gradnorm_al.strategies.vae import ConvVAE, input_shape
from gradnorm_al.tasks import ClassificationTask
from gradnorm_al.train import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: see conftest.one_thread

# tiny settings for the strategies that train or sample something (others run as they are)
TINY = {
    "qbc": {"members": 2},
    "mc-dropout": {"samples": 3},
    "vaal": {"iterations": 2, "batch_size": 8, "latent_dim": 4, "width": 4, "hidden": 8},
    "sraal": {"iterations": 2, "batch_size": 8, "latent_dim": 4, "width": 4, "hidden": 8},
    "uncertain-gcn": {"hidden": 8, "steps": 5},
    "core-gcn": {"hidden": 8, "steps": 5},
    "ll4al": {"hidden": 4},
}
SIDE, CLASSES, POOL, LABELED, K = 12, 3, 36, 12, 4


def _volumes() -> TensorDataset:
    """Random volumes [1, 12, 12, 12]; class c is brighter in its own octant (learnable)."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(POOL) % CLASSES
    x = torch.randn(POOL, 1, SIDE, SIDE, SIDE, generator=g)
    half = SIDE // 2
    for c in range(CLASSES):
        d, h = half * (c % 2), half * (c // 2)
        x[y == c, :, d : d + half, h : h + half, :half] += 1.5
    return TensorDataset(x, y)


def _cnn3d() -> nn.Module:
    return create_model("cnn3d", num_classes=CLASSES, in_channels=1, width=4, hidden=16)


def _query(name: str, seed: int = 0) -> tuple[np.ndarray, ActiveLearner]:
    pool = _volumes()
    learner = ActiveLearner(
        _cnn3d,
        pool,
        ClassificationTask(CLASSES),
        create_strategy(name, **TINY.get(name, {})),
        train=TrainConfig(epochs=1, batch_size=8),
        seed=seed,
        batch_size=16,
    )
    learner.update(np.arange(LABELED), pool.tensors[1][:LABELED])
    learner.fit()
    return learner.query(K), learner


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_every_strategy_selects_on_volumes(name):
    picked, learner = _query(name)
    assert len(picked) == K and len(set(picked.tolist())) == K
    assert set(picked.tolist()) <= set(range(LABELED, POOL))
    scores = learner.last_scores
    if scores is not None:
        assert np.isfinite(scores).all()
    again, _ = _query(name)
    np.testing.assert_array_equal(picked, again)  # same seed, same selection


@pytest.mark.parametrize("name", ["entropy-gradnorm", "expected-gradnorm"])
def test_gradnorm_scores_on_volumes_are_the_per_sample_gradient_norms(name):
    # the picks are the K largest per-sample gradient norms of one backward per candidate, and
    # their scores those norms (float32: close, not bit-equal)
    picked, learner = _query(name)
    candidates = np.arange(LABELED, POOL)
    x = _volumes().tensors[0][candidates]
    reference = per_sample_grad_norms_loop(learner.model, x, entropy_loss).numpy()
    assert set(picked.tolist()) == set(candidates[np.argsort(-reference)[:K]].tolist())
    np.testing.assert_allclose(learner.last_scores, reference[picked - LABELED], rtol=1e-4)


@pytest.mark.parametrize(
    "shape, stages, enc, dec",
    [((1, 12, 12, 12), 3, (1, 1, 1), (3, 3, 3)), ((2, 8, 16, 8), 3, (1, 2, 1), (2, 4, 2))],
)
def test_the_vae_of_vaal_and_sraal_is_3d_for_volumes(shape, stages, enc, dec):
    torch.manual_seed(0)
    vae = ConvVAE(shape, latent_dim=5, width=4)
    assert sum(isinstance(m, nn.Conv3d) for m in vae.encoder) == stages
    assert sum(isinstance(m, nn.ConvTranspose3d) for m in vae.decoder) == stages
    assert not any(isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) for m in vae.modules())
    assert vae.fc_mu.in_features == 4 * 2 ** (stages - 1) * math.prod(enc)
    assert vae.decoder[1].unflattened_size == (4 * 2 ** (stages - 1), *dec)
    recon, z, mu, logvar = vae(torch.randn(3, *shape))
    assert recon.shape == (3, *shape) and mu.shape == (3, 5)


def test_the_3d_vae_at_32_cubed_has_the_hand_counted_size():
    # the published layout in 3-D: encoder 4^3 kernels 1 -> 128 -> 256 -> 512 -> 1024 (32^3 ->
    # 2^3) + BN, mu / logvar heads on 1024 x 2^3, decoder Linear(32, 1024 x 4^3), transposed
    # 4^3 kernels 1024 -> 512 -> 256 -> 128 + BN, and a 1x1x1 transposed one to 1 channel
    encoder = 64 * (1 * 128 + 128 * 256 + 256 * 512 + 512 * 1024) + 2 * (128 + 256 + 512 + 1024)
    heads = 2 * (1024 * 8 * 32 + 32)
    decoder = 32 * 1024 * 64 + 1024 * 64 + 64 * (1024 * 512 + 512 * 256 + 256 * 128)
    decoder += 2 * (512 + 256 + 128) + 128 + 1
    assert encoder + heads + decoder == 90_781_377
    with torch.device("meta"):
        vae = ConvVAE((1, 32, 32, 32))
        image_vae = ConvVAE((1, 32, 32))
    assert sum(p.numel() for p in vae.parameters()) == 90_781_377
    # the 2-D network on 1x32x32: the same channels with 4x4 kernels (16 taps, not 64)
    encoder = 16 * (1 * 128 + 128 * 256 + 256 * 512 + 512 * 1024) + 2 * (128 + 256 + 512 + 1024)
    heads = 2 * (1024 * 4 * 32 + 32)
    decoder = 32 * 1024 * 16 + 1024 * 16 + 16 * (1024 * 512 + 512 * 256 + 256 * 128)
    decoder += 2 * (512 + 256 + 128) + 128 + 1
    assert sum(p.numel() for p in image_vae.parameters()) == encoder + heads + decoder


def test_the_vae_refuses_inputs_that_are_neither_images_nor_volumes():
    with pytest.raises(ConfigError, match=r"images \[C, H, W\] or volumes \[C, D, H, W\]"):
        input_shape(TensorDataset(torch.randn(4, 6), torch.zeros(4)), 0)
    with pytest.raises(ConfigError, match="at least 2x2x2"):
        ConvVAE((1, 1, 8, 8))
