"""Adversarial baselines: VAAL and SRAAL (VAE + latent discriminator), their networks, losses,
the SRAAL uncertainty indicator, and cases whose answer is known by construction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_to_scale, make_context
from torch import nn
from torch.distributions import Normal, kl_divergence

from gradnorm_al import STRATEGIES, ConfigError, PoolError, create_strategy
from gradnorm_al.data import tensor_dataset
from gradnorm_al.models import create_model
from gradnorm_al.strategies.sraal import oui_state
from gradnorm_al.strategies.vaal import VAALStrategy
from gradnorm_al.strategies.vae import (
    AdversarialConfig,
    BatchStream,
    ConvVAE,
    LatentDiscriminator,
    discriminator_step,
    labelled_bce,
    vae_layout,
    vae_loss,
    vae_step,
)

#: Tiny networks and short training: the whole file must stay fast on 2 busy CPU cores.
TINY = dict(width=8, hidden=64, batch_size=16)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: see conftest.one_thread


def _images(kind: str, n: int, g: torch.Generator) -> torch.Tensor:
    """[n, 1, 8, 8] noise (sd 0.1) plus a bright region: 'A' top half, 'B' bottom half, 'B1'
    bottom-left quadrant, 'B2' bottom-right quadrant."""
    x = 0.1 * torch.randn(n, 1, 8, 8, generator=g)
    region = {
        "A": (slice(0, 4), slice(None)),
        "B": (slice(4, 8), slice(None)),
        "B1": (slice(4, 8), slice(0, 4)),
        "B2": (slice(4, 8), slice(4, 8)),
    }[kind]
    x[:, :, region[0], region[1]] += 1.0
    return x


class BottomLeftRule(nn.Module):
    """A task model with known outputs: class 0 with logit 20 when the bottom-left quadrant is
    bright (a near one-hot prediction), else all-zero logits (exactly uniform)."""

    num_classes = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bright = x[:, 0, 4:, :4].mean(dim=(1, 2)) > 0.5
        logits = torch.zeros(len(x), self.num_classes, device=x.device)
        logits[:, 0] = 20.0 * bright
        return logits


def _ctx(model, pool, candidates, labeled, seed=0, num_classes=4, batch_size=16):
    return make_context(
        model, pool, candidates, labeled, seed=seed, num_classes=num_classes, batch_size=batch_size
    )


# --- networks -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, stages, enc_hw, dec_hw",
    [
        ((1, 8, 8), 3, (1, 1), (2, 2)),
        ((1, 28, 28), 3, (3, 3), (7, 7)),
        ((3, 32, 32), 4, (2, 2), (4, 4)),
    ],
)
def test_vae_is_sized_to_its_input(shape, stages, enc_hw, dec_hw):
    assert vae_layout(*shape[1:]) == (stages, enc_hw, dec_hw)
    torch.manual_seed(0)
    vae = ConvVAE(shape, latent_dim=5, width=4)
    assert vae.channels == [4 * 2**i for i in range(stages)]
    recon, z, mu, logvar = vae(torch.randn(3, *shape))
    assert recon.shape == (3, *shape)
    assert z.shape == mu.shape == logvar.shape == (3, 5)
    assert vae.fc_mu.in_features == vae.channels[-1] * enc_hw[0] * enc_hw[1]
    assert LatentDiscriminator(5, hidden=7)(mu).shape == (3,)


def test_vae_at_32x32_is_the_published_network():
    vae = ConvVAE((3, 32, 32))
    convs = [m for m in vae.encoder if isinstance(m, nn.Conv2d)]
    assert [(m.in_channels, m.out_channels) for m in convs] == [
        (3, 128),
        (128, 256),
        (256, 512),
        (512, 1024),
    ]
    assert all(
        m.kernel_size == (4, 4) and m.stride == (2, 2) and m.padding == (1, 1) for m in convs
    )
    assert vae.fc_mu.in_features == vae.fc_logvar.in_features == 1024 * 2 * 2
    assert vae.fc_mu.out_features == 32
    assert vae.decoder[0].out_features == 1024 * 4 * 4
    tconvs = [m for m in vae.decoder if isinstance(m, nn.ConvTranspose2d)]
    assert [(m.in_channels, m.out_channels, m.kernel_size) for m in tconvs] == [
        (1024, 512, (4, 4)),
        (512, 256, (4, 4)),
        (256, 128, (4, 4)),
        (128, 3, (1, 1)),
    ]
    disc = LatentDiscriminator()
    assert [(m.in_features, m.out_features) for m in disc.net if isinstance(m, nn.Linear)] == [
        (32, 512),
        (512, 512),
        (512, 1),
    ]
    with pytest.raises(ConfigError, match="at least 2x2"):
        vae_layout(1, 8)


def test_vae_loss_and_bce_match_their_formulas():
    g = torch.Generator().manual_seed(0)
    x, recon = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    mu, logvar = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    kl = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum()
    expected = ((recon - x) ** 2).mean() + 0.3 * kl
    torch.testing.assert_close(vae_loss(x, recon, mu, logvar, 0.3), expected)
    logits, soft = torch.randn(5, generator=g), torch.rand(5, generator=g)
    p = torch.sigmoid(logits)
    for target, t in ((1.0, torch.ones(5)), (0.0, torch.zeros(5)), (soft, soft)):
        ref = -(t * p.log() + (1 - t) * (1 - p).log()).mean()
        torch.testing.assert_close(labelled_bce(logits, target), ref)


def test_batch_stream_cycles_through_permutations_and_never_yields_one_sample():
    pool = tensor_dataset(
        torch.arange(10.0)[:, None, None, None].expand(10, 1, 2, 2), np.arange(10)
    )
    indices = np.arange(2, 9)  # 7 rows, batches of 3: two per pass, one row left out each pass
    stream = BatchStream(pool, indices, 3, np.random.default_rng(0), torch.device("cpu"))
    seen = []
    for _ in range(2):
        x, y, pos = stream.next()
        assert x.shape == (3, 1, 2, 2) and torch.equal(y, torch.from_numpy(indices[pos]))
        assert torch.equal(x[:, 0, 0, 0], y.float())
        seen += pos.tolist()
    assert len(set(seen)) == 6  # one pass: distinct rows, the short last batch dropped
    keep = BatchStream(
        pool, indices, 3, np.random.default_rng(0), torch.device("cpu"), drop_last=False
    )
    sizes = [len(keep.next()[2]) for _ in range(3)]
    assert sorted(sizes) == [2, 3, 3]  # the short last batch (one row) is kept, repeated to 2
    single = BatchStream(pool, np.array([4]), 3, np.random.default_rng(0), torch.device("cpu"))
    assert single.next()[1].tolist() == [4, 4]
    assert AdversarialConfig(iterations=None).resolved_iterations(50_000) == 39_062


# --- SRAAL's online uncertainty indicator --------------------------------------------------


def _oui_reference(p: np.ndarray) -> np.ndarray:
    """Slow: the smallest variance with the same max is the distribution whose other entries are
    equal; the state is minV / V * max."""
    out = []
    for row in p:
        m, c = row.max(), len(row)
        flat = np.array([m] + [(1 - m) / (c - 1)] * (c - 1))
        out.append(np.var(flat) / np.var(row) * m)
    return np.array(out)


def test_oui_state_on_hand_computed_probabilities():
    three = torch.tensor([[1.0, 0, 0], [1 / 3, 1 / 3, 1 / 3], [0.5, 0.5, 0], [0.2, 0.2, 0.6]])
    # (0.5, 0.5, 0): minV = (1/2 - 1/3)^2 / 2 = 1/72, V = 1/18, ratio 1/4, state 1/2 * 1/4
    torch.testing.assert_close(
        oui_state(three), torch.tensor([1.0, 1 / 3, 0.125, 0.6], dtype=torch.float64)
    )
    # (0.7, 0.2, 0.1, 0): minV = 0.45^2 / 3 = 0.0675, V = 0.29 / 4 = 0.0725
    four = torch.tensor([[0.7, 0.2, 0.1, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(oui_state(four), torch.tensor([0.7 * 0.0675 / 0.0725]).double())
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.full(5, 0.7), size=50)
    assert_close_to_scale(oui_state(torch.from_numpy(p)), _oui_reference(p), rel=1e-12)
    with pytest.raises(ValueError, match="C >= 2"):
        oui_state(torch.ones(3, 1))


def test_oui_one_hot_is_most_certain_and_uniform_least_among_even_rests():
    c = 6
    one_hot, uniform = torch.eye(c)[:1], torch.full((1, c), 1 / c)
    p = torch.from_numpy(np.random.default_rng(1).dirichlet(np.ones(c), size=200))
    states = oui_state(torch.cat([one_hot, uniform, p.float()]))
    assert states[0] == pytest.approx(1.0) and (states > 0).all() and (states <= 1).all()
    assert states[0] >= states[2:].max()
    assert states[1] == pytest.approx(1 / c)
    # with the other classes sharing the rest equally the state is the max probability
    m = torch.linspace(1 / c, 1, 9, dtype=torch.float64)
    even = torch.cat([m[:, None], ((1 - m) / (c - 1))[:, None].expand(9, c - 1)], dim=1)
    torch.testing.assert_close(oui_state(even), m)
    # a float32 uniform row (its entries do not sum to 1 exactly), and one with a one-ulp
    # round-off difference, are uniform: no ratio of round-off-sized variances
    nudged = uniform.clone()
    nudged[0, 2] = torch.nextafter(nudged[0, 2], torch.tensor(1.0))
    assert oui_state(nudged).item() == pytest.approx(1 / c)


# --- training -------------------------------------------------------------------------------


def test_vae_and_discriminator_losses_decrease(small_digits):
    torch.manual_seed(0)
    x = small_digits.train.tensors[0][:64]
    vae, disc = ConvVAE((1, 8, 8), width=8), LatentDiscriminator(32, hidden=64)
    opt = torch.optim.Adam(vae.parameters(), lr=5e-4)
    recon = [
        vae_step(vae, disc, opt, x[:32], x[32:], beta=1.0, adversary_param=0.0)["reconstruction"]
        for _ in range(40)
    ]
    assert np.mean(recon[-5:]) < 0.5 * np.mean(recon[:5])

    g = torch.Generator().manual_seed(0)
    a, b = _images("A", 32, g), _images("B", 32, g)
    vae, disc = ConvVAE((1, 8, 8), width=8), LatentDiscriminator(32, hidden=64)
    opt = torch.optim.Adam(disc.parameters(), lr=5e-4)
    losses = [discriminator_step(vae, disc, opt, a, b) for _ in range(40)]
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])


def _two_groups(labelled_kind, candidate_kinds, per=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    parts = [_images(labelled_kind, 2 * per, g)] + [_images(k, per, g) for k in candidate_kinds]
    x = torch.cat(parts)
    y = np.r_[np.arange(2 * per) % 4, np.zeros(per * len(candidate_kinds))]
    return tensor_dataset(x, y), np.arange(2 * per), np.arange(2 * per, len(x))


@pytest.mark.parametrize("seed", [0, 1])
def test_vaal_selects_the_group_that_looks_unlabelled(seed):
    pool, labeled, cands = _two_groups("A", ["A", "B"])
    strategy = create_strategy("vaal", iterations=50, beta=1e-3, **TINY)
    chosen = strategy(_ctx(None, pool, cands, labeled, seed=seed), 16)
    assert set(chosen.tolist()) == set(cands[16:].tolist())  # every bottom-bright image
    assert len(strategy.history.vae) == 50


def test_sraal_relabels_unlabelled_states_and_selects_the_uncertain_group():
    # labelled: top-bright; candidates: bottom-left bright (task model certain, state ~1) and
    # bottom-right bright (task model uniform, state 1/4): both look unlabelled, only the
    # relabelled states tell them apart
    pool, labeled, cands = _two_groups("A", ["B1", "B2"], per=12)
    strategy = create_strategy("sraal", iterations=50, beta=1e-3, **TINY)
    chosen = strategy(_ctx(BottomLeftRule(), pool, cands, labeled), 12)
    expected_states = oui_state(F.softmax(BottomLeftRule()(pool.tensors[0][cands]).double(), 1))
    np.testing.assert_array_equal(strategy.states, expected_states.numpy())
    assert strategy.states[:12].min() > 0.99 and np.allclose(strategy.states[12:], 0.25)
    assert set(chosen.tolist()) == set(cands[12:].tolist())
    assert len(strategy.history.supervised) == 50


# --- the strategy contract ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["vaal", "sraal"])
def test_selection_is_valid_and_seeded(name, small_digits):
    torch.manual_seed(0)
    model = create_model("smallcnn", num_classes=10, in_channels=1).eval()
    pool, labeled, cands = small_digits.train_eval, np.arange(40), np.arange(40, 100)
    strategy = create_strategy(name, iterations=4, **TINY)

    def run(seed):
        return strategy(_ctx(model, pool, cands, labeled, seed=seed, num_classes=10), 7)

    a, b = run(3), run(3)
    np.testing.assert_array_equal(a, b)
    assert len(np.unique(a)) == 7 and np.isin(a, cands).all() and not np.isin(a, labeled).any()
    s3 = strategy.score(_ctx(model, pool, cands, labeled, seed=3, num_classes=10))
    s4 = strategy.score(_ctx(model, pool, cands, labeled, seed=4, num_classes=10))
    assert s3.dtype == np.float64 and s3.shape == (60,) and not np.allclose(s3, s4)


@pytest.mark.parametrize("name", ["vaal", "sraal"])
def test_runs_with_resnet18_cifar_as_task_model(name):
    g = torch.Generator().manual_seed(0)
    pool = tensor_dataset(torch.randn(10, 3, 32, 32, generator=g), np.arange(10) % 3)
    torch.manual_seed(0)
    model = create_model("resnet18-cifar", num_classes=3, in_channels=3).eval()
    strategy = create_strategy(name, iterations=2, width=4, hidden=16, batch_size=4)
    chosen = strategy(_ctx(model, pool, np.arange(4, 10), np.arange(4), num_classes=3), 2)
    assert len(np.unique(chosen)) == 2 and np.isin(chosen, np.arange(4, 10)).all()


def test_invalid_settings_are_config_errors():
    for params, match in [
        (dict(iterations=0), "iterations"),
        (dict(batch_size=2.5), "batch_size"),
        (dict(num_vae_steps=0), "num_vae_steps"),
        (dict(num_adv_steps=-1), "num_adv_steps"),
        (dict(lr=0.0), "lr"),
        (dict(beta=-1.0), "beta"),
        (dict(adversary_param=float("nan")), "adversary_param"),
    ]:
        for name in ("vaal", "sraal"):
            with pytest.raises(ConfigError, match=f"^strategy {name}: {match} must be "):
                create_strategy(name, **params)
            with pytest.raises(ConfigError, match=f"^strategy {name}: {match} must be "):
                STRATEGIES.get(name)(**params)  # built directly, not through the registry
    with pytest.raises(ConfigError, match="classifier_weight must be a number >= 0, got -1.0"):
        create_strategy("sraal", classifier_weight=-1.0)
    pool, labeled, cands = _two_groups("A", ["B"], per=4)
    with pytest.raises(PoolError, match="at least one"):
        VAALStrategy(iterations=1, **TINY)(_ctx(None, pool, cands, []), 2)
    flat = tensor_dataset(torch.randn(10, 5), np.zeros(10))
    with pytest.raises(ConfigError, match=r"needs images \[C, H, W\] or volumes"):
        VAALStrategy(iterations=1, **TINY)(_ctx(None, flat, np.arange(5, 10), np.arange(5)), 2)
