"""Variational adversarial active learning (Sinha, Ebrahimi & Darrell, ICCV 2019, "Variational
Adversarial Active Learning"; facts from the published code sinhasam/vaal, see
:mod:`gradnorm_al.strategies.vae`).

A beta-VAE embeds labelled and unlabelled images; a discriminator on the latent mean learns to
tell labelled (1) from unlabelled (0) while the VAE learns to fool it. The candidates the
discriminator finds least likely to be labelled are selected: score = ``-logit D(mu(x))``, the
top-K of which are the K lowest probabilities ``sigmoid(logit)`` (ranking by the logit avoids ties
where float32 probabilities saturate at 0 or 1).

The networks never see the task model or the labels. The published solver trains them in the same
loop as the task model, one VAE/discriminator iteration per task-model step, on the same labelled
and unlabelled sets; since neither depends on the other, training them here, at selection time,
for the same number of iterations on the same sets is the same procedure. Like the published
``main.py``, which builds a new VAE and discriminator inside its loop over labelling rounds, every
selection trains fresh networks (seeded from ``ctx.rng``); nothing persists across cycles.

The unlabelled set is the context's candidates (all unlabelled samples unless the loop draws a
candidate subset; the published code uses every unlabelled sample).

Dense tasks (segmentation, as in the VAAL paper's Cityscapes experiment): nothing changes, the
networks see the images alone (never the masks or the task model's output). The VAE sizes itself
to the images (:func:`gradnorm_al.strategies.vae.vae_layout`) with at most four stride-2 stages,
so its linear layers grow with the image area: at ``width`` 128 a 512x1024 image gives each latent
head 67 M parameters and the decoder's first layer 277 M (433 M in all: 1.7 GB in float32, three
times that with Adam's state); shrink ``width`` or the images for large inputs.
"""

from __future__ import annotations

import numpy as np

from ..options import validate
from .base import STRATEGIES, ScoringStrategy, SelectionContext
from .common import seeded_torch
from .vae import (
    AdversarialConfig,
    StepLosses,
    build_networks,
    candidate_logits,
    streams,
    train_adversarial,
)


@STRATEGIES.register("vaal")
class VAALStrategy(ScoringStrategy):
    """Select the candidates with the lowest discriminator probability of being labelled.

    Hyper-parameters (published values in brackets, see
    :class:`gradnorm_al.strategies.vae.AdversarialConfig`): ``iterations`` 100 (None = the
    published ``(pool size * epochs) // batch_size``, 39062 on CIFAR-10), ``epochs`` 100,
    ``batch_size`` 128, ``latent_dim`` 32, ``width`` 128, ``num_vae_steps`` 2, ``num_adv_steps``
    1, ``lr`` 5e-4, ``beta`` 1, ``adversary_param`` 1, ``hidden`` 512.
    """

    supports_dense = True  # images only: the task model and its outputs are never used

    def __init__(
        self,
        iterations: int | None = 100,
        epochs: int = 100,
        batch_size: int = 128,
        latent_dim: int = 32,
        width: int = 128,
        num_vae_steps: int = 2,
        num_adv_steps: int = 1,
        lr: float = 5e-4,
        beta: float = 1.0,
        adversary_param: float = 1.0,
        hidden: int = 512,
    ) -> None:
        self.config = AdversarialConfig(
            iterations=iterations,
            epochs=epochs,
            batch_size=batch_size,
            latent_dim=latent_dim,
            width=width,
            num_vae_steps=num_vae_steps,
            num_adv_steps=num_adv_steps,
            lr=lr,
            beta=beta,
            adversary_param=adversary_param,
            hidden=hidden,
        )
        validate(self.config, "strategy vaal")
        #: losses of the last selection's training, for inspection
        self.history: StepLosses | None = None

    def score(self, ctx: SelectionContext) -> np.ndarray:
        cfg = self.config
        seed = int(ctx.rng.integers(0, 2**63 - 1))
        labelled, unlabelled = streams(ctx, cfg, seed, "vaal")
        with seeded_torch(ctx.device, seed):
            vae, discriminator = build_networks(ctx, cfg)
            self.history = train_adversarial(
                cfg,
                vae,
                discriminator,
                labelled,
                unlabelled,
                cfg.resolved_iterations(len(ctx.pool)),
            )
            logits = candidate_logits(ctx, vae, discriminator)
        return (-logits).numpy()
