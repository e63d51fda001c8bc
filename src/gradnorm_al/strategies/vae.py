"""The networks and training steps shared by the adversarial baselines (``vaal``, ``sraal``).

Facts from the published VAAL code (Sinha, Ebrahimi & Darrell, ICCV 2019; sinhasam/vaal,
``model.py``, ``solver.py``, ``arguments.py``, ``main.py`` at the last commit):

* VAE (:class:`ConvVAE`), for 32x32 inputs: encoder ``Conv2d(4, stride 2, pad 1, no bias)`` with
  128, 256, 512, 1024 channels, each followed by BatchNorm + ReLU (32 -> 2x2), flattened, then two
  linear heads to ``mu`` and ``logvar`` (latent 32); decoder ``Linear(z, 1024 * 4 * 4)``, three
  ``ConvTranspose2d(4, stride 2, pad 1, no bias)`` + BatchNorm + ReLU (1024 -> 512 -> 256 -> 128
  channels, 4 -> 32), then ``ConvTranspose2d(128, C, 1)`` with no output activation.
  Initialisation: Kaiming-normal weights and zero biases for the Conv2d / Linear layers inside the
  encoder and decoder (the published ``weight_init`` misses ``fc_mu`` / ``fc_logvar``, which keep
  PyTorch's default; so do ours). Transposed convolutions keep PyTorch's default too.
* Discriminator (:class:`LatentDiscriminator`) on the latent mean ``mu``:
  ``Linear(z, 512)-ReLU-Linear(512, 512)-ReLU-Linear(512, 1)-Sigmoid``, Kaiming-normal weights.
* Loss of a VAE pass (:func:`vae_loss`): ``MSE(recon, x)`` (mean over all elements) ``+ beta *
  KL``, the KL *summed* over the batch and the latent dimensions, as published.
* One training iteration (:func:`train_adversarial`): ``num_vae_steps`` (2) VAE steps, each on a
  fresh labelled and unlabelled batch, minimising ``vae_loss(lab) + vae_loss(unlab) +
  adversary_param * [BCE(D(mu_lab), 1) + BCE(D(mu_unlab), 1)]`` (the VAE tries to make every
  sample look labelled), then ``num_adv_steps`` (1) discriminator steps on the batch of the last
  VAE step, VAE frozen, minimising ``BCE(D(mu_lab), 1) + BCE(D(mu_unlab), 0)``. Adam, lr 5e-4, for
  both networks; batch size 128; ``(num_images * 100 epochs) // 128`` iterations (``num_images`` =
  the whole training set, 50000 on CIFAR-10: 39062 iterations).

Our choices where the published network is 32x32-only (:func:`vae_layout`): the decoder has
``up`` = the largest of 0..3 with both image sides divisible by ``2**up`` and at least 2 after the
division (the published 32x32 network has 3), it starts at ``(H, W) / 2**up``; the encoder has
``up + 1`` stride-2 stages (as published: one more than the decoder) with ``width * 2**i``
channels. So 32x32 is exactly the published network, 28x28 gets 3 encoder stages (28 -> 14 -> 7 ->
3) and a decoder from 7x7 with 2 transposed stages, 8x8 gets 3 encoder stages (8 -> 4 -> 2 -> 1)
and a decoder from 2x2 with 2 stages; the deepest published stage(s) are the ones dropped.
``width`` (128 published) scales every channel count, for CPU-sized runs.

Volumes [C, D, H, W] (3-D classification, e.g. cryo-ET subtomograms) get the same network in 3-D:
``Conv3d`` / ``BatchNorm3d`` / ``ConvTranspose3d`` with 4x4x4 kernels (1x1x1 for the last
transposed one), the stage count chosen over all three sides by the same rule (32^3 gets four
encoder stages, 32^3 -> 2^3, and a decoder from 4^3). The published VAAL network is 2-D; this is
our 3-D port, not a published design. Its kernels have four times the taps of the 2-D ones: at
the published width and 32^3 the VAE has 90.8M parameters (22.8M at 1x32x32), which is the
cost of the 3-D redesign the paper argues gradnorm does without.

The discriminator returns logits and the losses use ``binary_cross_entropy_with_logits``: the same
loss as ``BCE(sigmoid(.))``, without its saturation at probabilities of exactly 0 or 1.

One deliberate deviation, BatchNorm batches: the published solver encodes the labelled and the
unlabelled batch in two separate train-mode passes, and its sampler scores unlabelled batches in
train mode too. The BatchNorm layers then normalise each group by its own batch statistics, which
removes exactly the group-level differences the discriminator is meant to find (at the 1x1 / 2x2
last encoder stage, every channel of an all-labelled batch is centred on the labelled mean), and
makes a score depend on the other samples of its batch. Here both batches go through the VAE as
one concatenated batch (VAE and discriminator steps), so labelled and unlabelled codes are
normalised alike, and candidates are scored in eval mode with the running statistics of those
mixed batches. On a toy problem (labelled images bright on top; candidates half the same, half
bright at the bottom; 8x8, beta 1e-3, 50-150 iterations, 3 seeds) this ranks every bottom-bright
candidate first (AUC 1.0), where the published arrangement, scored in train or in eval mode,
ranked them erratically (AUC 0.0-0.9).

The published loss sums the KL over the batch and latent but averages the squared error over the
batch and pixels: per sample the KL enters with weight ``beta`` and the squared error with
``1 / (batch_size * pixels)``, so encoding an image in ``mu`` rarely pays and the posterior
collapses to the prior (``mu`` ~ 0 for every image) and the discriminator has nothing to
separate. ``beta`` is kept at the published 1; lower it (the tests use 1e-3) when the latent must
carry information within a short training.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..data.batching import iter_batches
from ..errors import ConfigError, PoolError
from ..options import NonNegativeFloat, PositiveFloat, PositiveInt, Range
from .base import SelectionContext
from .common import map_batches

#: Most stride-2 encoder stages (the published 32x32 network has 4).
MAX_ENCODER_STAGES = 4


#: (convolution, BatchNorm, transposed convolution) by the number of spatial dimensions
LAYERS = {
    2: (nn.Conv2d, nn.BatchNorm2d, nn.ConvTranspose2d),
    3: (nn.Conv3d, nn.BatchNorm3d, nn.ConvTranspose3d),
}


def _down(n: int) -> int:
    """Output side of ``Conv2d(kernel 4, stride 2, padding 1)`` on a side of ``n >= 2``."""
    return (n + 2 - 4) // 2 + 1


def vae_layout(*sides: int) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """How :class:`ConvVAE` sizes itself to images ``height, width`` or volumes ``depth,
    height, width`` (see the module docs).

    Returns ``(encoder_stages, encoder_output_sides, decoder_start_sides)``; the decoder has
    ``encoder_stages - 1`` transposed stride-2 stages. Raises ConfigError for sides below 2.
    """
    if any(n < 2 for n in sides):
        kind = "images" if len(sides) == 2 else "volumes"
        least, got = "x".join(["2"] * len(sides)), "x".join(str(n) for n in sides)
        raise ConfigError(f"the VAE needs {kind} of at least {least} pixels, got {got}")
    up = 0
    while up < MAX_ENCODER_STAGES - 1:
        f = 2 ** (up + 1)
        if any(n % f or n // f < 2 for n in sides):
            break
        up += 1
    stages = up + 1
    out = list(sides)
    for _ in range(stages):
        out = [_down(n) for n in out]
    return stages, tuple(out), tuple(n // 2**up for n in sides)


def _kaiming(module: nn.Module) -> None:
    """The published initialisation of the Conv2d (Conv3d) / Linear layers in a Sequential."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class ConvVAE(nn.Module):
    """The VAAL beta-VAE, sized to ``in_shape = (C, H, W)``, or ``(C, D, H, W)`` for the 3-D
    network (see :func:`vae_layout` and the module docs).

    ``forward(x)`` returns ``(recon, z, mu, logvar)``: reconstruction shaped like ``x``, a latent
    sample ``z = mu + exp(logvar / 2) * eps`` [N, latent_dim] (torch's global generator), and the
    posterior's mean and log-variance [N, latent_dim].
    """

    def __init__(self, in_shape: tuple[int, ...], latent_dim: int = 32, width: int = 128) -> None:
        super().__init__()
        channels_in, *sides = (int(s) for s in in_shape)
        if len(sides) not in LAYERS:
            raise ConfigError(
                f"the VAE takes images (C, H, W) or volumes (C, D, H, W), got {tuple(in_shape)}"
            )
        conv, norm, transposed = LAYERS[len(sides)]
        stages, enc_sides, dec_sides = vae_layout(*sides)
        channels = [width * 2**i for i in range(stages)]
        self.in_shape = (channels_in, *sides)
        self.latent_dim = latent_dim
        self.channels = channels
        enc: list[nn.Module] = []
        previous = channels_in
        for c in channels:
            enc += [conv(previous, c, 4, 2, 1, bias=False), norm(c), nn.ReLU(True)]
            previous = c
        enc.append(nn.Flatten())
        self.encoder = nn.Sequential(*enc)
        flat = channels[-1] * math.prod(enc_sides)
        self.fc_mu = nn.Linear(flat, latent_dim)
        self.fc_logvar = nn.Linear(flat, latent_dim)
        dec: list[nn.Module] = [
            nn.Linear(latent_dim, channels[-1] * math.prod(dec_sides)),
            nn.Unflatten(1, (channels[-1], *dec_sides)),
        ]
        for c_in, c_out in zip(channels[:0:-1], channels[-2::-1], strict=True):
            dec += [transposed(c_in, c_out, 4, 2, 1, bias=False), norm(c_out), nn.ReLU(True)]
        dec.append(transposed(channels[0], channels_in, 1))
        self.decoder = nn.Sequential(*dec)
        _kaiming(self.encoder)
        _kaiming(self.decoder)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu, logvar)`` [N, latent_dim] of images ``x`` [N, C, H, W] (or volumes)."""
        h = self.encoder(x)
        return self.fc_mu(h), self.fc_logvar(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(x)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        return self.decode(z), z, mu, logvar


def latent_mlp(latent_dim: int, hidden: int, out: int) -> nn.Sequential:
    """``Linear(z, hidden)-ReLU-Linear(hidden, hidden)-ReLU-Linear(hidden, out)``."""
    return nn.Sequential(
        nn.Linear(latent_dim, hidden),
        nn.ReLU(True),
        nn.Linear(hidden, hidden),
        nn.ReLU(True),
        nn.Linear(hidden, out),
    )


class LatentDiscriminator(nn.Module):
    """The VAAL discriminator on latent codes: ``Linear(z, hidden)-ReLU-Linear(hidden, hidden)-
    ReLU-Linear(hidden, 1)``; ``forward`` returns logits [N] (the published network ends in a
    Sigmoid: ``sigmoid(logit)`` is its probability of "labelled")."""

    def __init__(self, latent_dim: int = 32, hidden: int = 512) -> None:
        super().__init__()
        self.net = latent_mlp(latent_dim, hidden, 1)
        _kaiming(self.net)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).squeeze(1)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``KL(N(mu, exp(logvar)) || N(0, I))`` summed over the batch and the latent dimensions:
    ``-1/2 * sum(1 + logvar - mu^2 - exp(logvar))`` (the published, un-averaged sum)."""
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())


def vae_loss(
    x: torch.Tensor, recon: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, beta: float
) -> torch.Tensor:
    """The published VAE loss of one batch: ``mean((recon - x)^2) + beta * KL`` (KL summed, see
    :func:`kl_divergence`)."""
    return F.mse_loss(recon, x) + beta * kl_divergence(mu, logvar)


def labelled_bce(logits: torch.Tensor, target: float | torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of the discriminator's logits [N] against the "labelled"
    probability ``target`` (a number, or one soft target per sample [N])."""
    if not isinstance(target, torch.Tensor):
        target = torch.full_like(logits, float(target))
    return F.binary_cross_entropy_with_logits(logits, target.to(logits))


@dataclass
class AdversarialConfig:
    """Hyper-parameters of the VAE / discriminator training, published VAAL values as defaults
    except ``iterations`` (see :meth:`resolved_iterations`) and ``width``.

    iterations : training iterations; None = the published ``(pool size * epochs) //
        batch_size`` (39062 on CIFAR-10). The default 100 is a CPU-sized run: at the
        published width one iteration (two VAE steps, batch 128) took ~4 s on 8x8 images and
        ~30 s on 32x32 on a busy 2-core CPU; ``width=32`` is ~16x cheaper.
    epochs : the published 100; used only when ``iterations`` is None.
    batch_size : labelled and unlabelled batch size (128).
    latent_dim : VAE latent size (32).
    width : channels of the first encoder stage, doubled at each further stage (128).
    num_vae_steps, num_adv_steps : VAE / discriminator steps per iteration (2, 1).
    lr : Adam learning rate of both networks (5e-4).
    beta : weight of the KL term (1).
    adversary_param : weight of the adversarial term in the VAE loss (1; lambda2 in the paper).
    hidden : discriminator hidden width (512).

    The constraints are declared in the annotations; :func:`gradnorm_al.options.validate` checks
    them.
    """

    iterations: PositiveInt | None = 100
    epochs: PositiveInt = 100
    batch_size: PositiveInt = 128
    latent_dim: PositiveInt = 32
    width: PositiveInt = 128
    num_vae_steps: PositiveInt = 2
    num_adv_steps: Annotated[int, Range(ge=0)] = 1
    lr: PositiveFloat = 5e-4
    beta: NonNegativeFloat = 1.0
    adversary_param: NonNegativeFloat = 1.0
    hidden: PositiveInt = 512

    def resolved_iterations(self, pool_size: int) -> int:
        """``iterations``, or the published ``(pool_size * epochs) // batch_size`` (at least 1)."""
        if self.iterations is not None:
            return int(self.iterations)
        return max(1, (pool_size * self.epochs) // self.batch_size)


class BatchStream:
    """Endless random batches of the pool rows ``indices``: each pass over them is a fresh
    permutation cut into batches of ``batch_size``, the short last batch dropped with
    ``drop_last`` (the published labelled loader) and kept otherwise (the unlabelled one); with
    fewer rows than one batch every batch holds all of them. A batch of one row is repeated to
    two: BatchNorm cannot train on a single sample.

    :meth:`next` returns ``(x, y, positions)``: inputs and targets (None if the pool has none) of
    the batch on ``device``, and the batch's positions into ``indices`` (int64 numpy array).
    """

    def __init__(
        self,
        pool: Dataset,
        indices: np.ndarray,
        batch_size: int,
        rng: np.random.Generator,
        device: torch.device,
        *,
        drop_last: bool = True,
    ) -> None:
        self.pool = pool
        self.drop_last = drop_last
        self.indices = np.asarray(indices, dtype=np.int64)
        if len(self.indices) == 0:
            raise PoolError("cannot train on an empty set of samples")
        self.batch_size = min(batch_size, len(self.indices))
        self.rng = rng
        self.device = device
        self._queue: list[np.ndarray] = []

    def next_positions(self) -> np.ndarray:
        if not self._queue:
            order = self.rng.permutation(len(self.indices))
            count = len(order) // self.batch_size
            if not self.drop_last:
                count = -(-len(order) // self.batch_size)
            self._queue = [
                order[i * self.batch_size : (i + 1) * self.batch_size] for i in range(count)
            ][::-1]
        positions = self._queue.pop()
        if len(positions) == 1:
            positions = np.repeat(positions, 2)
        return positions

    def next(self) -> tuple[torch.Tensor, torch.Tensor | None, np.ndarray]:
        positions = self.next_positions()
        x, y = next(iter_batches(self.pool, len(positions), self.indices[positions]))
        x = x.to(self.device, dtype=torch.float32)
        return x, (None if y is None else y.to(self.device)), positions


@dataclass
class StepLosses:
    """Per-iteration losses of :func:`train_adversarial` (the last step of each kind)."""

    vae: list[float] = field(default_factory=list)
    reconstruction: list[float] = field(default_factory=list)
    adversarial: list[float] = field(default_factory=list)
    supervised: list[float] = field(default_factory=list)
    discriminator: list[float] = field(default_factory=list)


#: ``supervised(z_lab, y_lab) -> loss`` of SRAAL's classifier head (None for VAAL).
SupervisedLoss = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
#: ``unlabelled_target(positions) -> target`` for the discriminator's unlabelled batch: a number
#: (VAAL: 0) or one soft "labelled" target per sample (SRAAL: the relabelled states).
UnlabelledTarget = Callable[[np.ndarray], float | torch.Tensor]


def vae_step(
    vae: ConvVAE,
    discriminator: LatentDiscriminator,
    optimizer: torch.optim.Optimizer,
    x_lab: torch.Tensor,
    x_unlab: torch.Tensor,
    *,
    beta: float,
    adversary_param: float,
    recon_weight: float = 1.0,
    supervised: SupervisedLoss | None = None,
    y_lab: torch.Tensor | None = None,
) -> dict[str, float]:
    """One VAE update (``optimizer`` holds the VAE's parameters, and a head's if ``supervised``):

    ``recon_weight * (vae_loss(lab) + vae_loss(unlab)) + adversary_param * (BCE(D(mu_lab), 1) +
    BCE(D(mu_unlab), 1)) [+ supervised(z_lab, y_lab)]``, the two batches encoded as one (see the
    module docs); the discriminator is not updated (its gradients are discarded). Returns the loss
    terms as floats.
    """
    vae.train()
    n = len(x_lab)
    recon, z, mu, logvar = vae(torch.cat([x_lab, x_unlab]))
    recon_l, z_l, mu_l, logvar_l = recon[:n], z[:n], mu[:n], logvar[:n]
    recon_u, mu_u, logvar_u = recon[n:], mu[n:], logvar[n:]
    reconstruction = vae_loss(x_lab, recon_l, mu_l, logvar_l, beta) + vae_loss(
        x_unlab, recon_u, mu_u, logvar_u, beta
    )
    adversarial = labelled_bce(discriminator(mu_l), 1.0) + labelled_bce(discriminator(mu_u), 1.0)
    total = recon_weight * reconstruction + adversary_param * adversarial
    sup = None
    if supervised is not None:
        sup = supervised(z_l, y_lab)
        total = total + sup
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    discriminator.zero_grad(set_to_none=True)
    out = {
        "vae": total.item(),
        "reconstruction": reconstruction.item(),
        "adversarial": adversarial.item(),
    }
    if sup is not None:
        out["supervised"] = sup.item()
    return out


def discriminator_step(
    vae: ConvVAE,
    discriminator: LatentDiscriminator,
    optimizer: torch.optim.Optimizer,
    x_lab: torch.Tensor,
    x_unlab: torch.Tensor,
    unlabelled_target: float | torch.Tensor = 0.0,
) -> float:
    """One discriminator update on the latent means of a frozen VAE (train mode, labelled and
    unlabelled encoded as one batch, see the module docs): ``BCE(D(mu_lab), 1) + BCE(D(mu_unlab),
    unlabelled_target)``. Returns the loss."""
    vae.train()
    with torch.no_grad():
        mu, _ = vae.encode(torch.cat([x_lab, x_unlab]))
        mu_l, mu_u = mu[: len(x_lab)], mu[len(x_lab) :]
    loss = labelled_bce(discriminator(mu_l), 1.0) + labelled_bce(
        discriminator(mu_u), unlabelled_target
    )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def train_adversarial(
    cfg: AdversarialConfig,
    vae: ConvVAE,
    discriminator: LatentDiscriminator,
    labelled: BatchStream,
    unlabelled: BatchStream,
    iterations: int,
    *,
    head: nn.Module | None = None,
    supervised: SupervisedLoss | None = None,
    recon_weight: float = 1.0,
    unlabelled_target: UnlabelledTarget | None = None,
) -> StepLosses:
    """The published VAAL training loop (module docs) for ``iterations`` iterations.

    ``head``: extra parameters trained with the VAE's Adam optimizer (SRAAL's classifier) through
    ``supervised``; ``unlabelled_target``: the discriminator's target for an unlabelled batch from
    its positions (default 0: "unlabelled"). Randomness: the streams' numpy generators and torch's
    global generator (seed it). Returns the per-iteration losses.
    """
    vae_params = list(vae.parameters()) + ([] if head is None else list(head.parameters()))
    optim_vae = torch.optim.Adam(vae_params, lr=cfg.lr)
    optim_disc = torch.optim.Adam(discriminator.parameters(), lr=cfg.lr)
    history = StepLosses()
    if head is not None:
        head.train()
    discriminator.train()
    for _ in range(iterations):
        x_l, y_l, _ = labelled.next()
        x_u, _, pos_u = unlabelled.next()
        for step in range(cfg.num_vae_steps):
            losses = vae_step(
                vae,
                discriminator,
                optim_vae,
                x_l,
                x_u,
                beta=cfg.beta,
                adversary_param=cfg.adversary_param,
                recon_weight=recon_weight,
                supervised=supervised,
                y_lab=y_l,
            )
            if step < cfg.num_vae_steps - 1:
                x_l, y_l, _ = labelled.next()
                x_u, _, pos_u = unlabelled.next()
        history.vae.append(losses["vae"])
        history.reconstruction.append(losses["reconstruction"])
        history.adversarial.append(losses["adversarial"])
        if "supervised" in losses:
            history.supervised.append(losses["supervised"])
        for step in range(cfg.num_adv_steps):
            target = 0.0 if unlabelled_target is None else unlabelled_target(pos_u)
            disc_loss = discriminator_step(vae, discriminator, optim_disc, x_l, x_u, target)
            if step == cfg.num_adv_steps - 1:
                history.discriminator.append(disc_loss)
            else:
                x_l, y_l, _ = labelled.next()
                x_u, _, pos_u = unlabelled.next()
    return history


def input_shape(pool: Dataset, index: int) -> tuple[int, ...]:
    """``(C, H, W)`` (``(C, D, H, W)`` for volumes) of the pool row ``index``; ConfigError
    unless it is an image or volume tensor."""
    x, _ = next(iter_batches(pool, 1, np.asarray([index], dtype=np.int64)))
    if x.dim() not in (4, 5):
        raise ConfigError(
            f"the VAE of vaal / sraal needs images [C, H, W] or volumes [C, D, H, W], got "
            f"samples of shape {tuple(x.shape[1:])}; use an image or volume dataset"
        )
    return tuple(int(s) for s in x.shape[1:])  # type: ignore[return-value]


def streams(
    ctx: SelectionContext, cfg: AdversarialConfig, seed: int, name: str
) -> tuple[BatchStream, BatchStream]:
    """Labelled and unlabelled (= the candidates) batch streams, each with its own generator
    derived from ``seed``. PoolError when there is no labelled sample to learn "labelled" from."""
    if len(ctx.labeled) == 0:
        raise PoolError(
            f"{name} learns what labelled samples look like and needs at least one; raise the "
            "initial labelled fraction"
        )
    labelled = BatchStream(
        ctx.pool, ctx.labeled, cfg.batch_size, np.random.default_rng([seed, 0]), ctx.device
    )
    unlabelled = BatchStream(
        ctx.pool,
        ctx.candidates,
        cfg.batch_size,
        np.random.default_rng([seed, 1]),
        ctx.device,
        drop_last=False,
    )
    return labelled, unlabelled


def build_networks(
    ctx: SelectionContext, cfg: AdversarialConfig
) -> tuple[ConvVAE, LatentDiscriminator]:
    """A fresh VAE sized to the pool's images and a discriminator, float32 on ``ctx.device``
    (initialised from torch's global generator: seed it)."""
    shape = input_shape(ctx.pool, int(ctx.candidates[0]))
    vae = ConvVAE(shape, latent_dim=cfg.latent_dim, width=cfg.width).to(ctx.device)
    disc = LatentDiscriminator(cfg.latent_dim, cfg.hidden).to(ctx.device)
    return vae, disc


def candidate_logits(
    ctx: SelectionContext, vae: ConvVAE, discriminator: LatentDiscriminator
) -> torch.Tensor:
    """float64 [M] discriminator logits ``D(mu(x))`` of the candidates, VAE in eval mode: the
    running BatchNorm statistics of the mixed training batches, so a score depends on its sample
    alone (the published sampler uses train mode, see the module docs)."""
    discriminator.eval()
    return map_batches(
        ctx, ctx.candidates, lambda x: discriminator(vae.encode(x)[0]), model=vae
    ).double()
