"""State-relabeling adversarial active learning (Zhang, Li, Yang, Wang, Zha & Huang, CVPR 2020,
"State-Relabeling Adversarial Active Learning", arXiv:2004.04943).

There is no official code release to rely on; this follows the paper, on top of the VAAL networks
and training loop it extends (:mod:`gradnorm_al.strategies.vae`). An unofficial re-implementation
(wenxuanou/SRAAL_Realization) was used only to cross-check the reading of the uncertainty
indicator below.

* Unified representation generator: the VAAL beta-VAE (unsupervised image reconstructor) whose
  latent sample ``z`` of a labelled image also feeds a classifier head (the supervised target
  learner, :class:`TargetLearner`) trained with cross-entropy on the labels. Generator loss:
  ``recon_weight * (vae_loss(lab) + vae_loss(unlab)) + classifier_weight * CE(head(z_lab), y)
  + adversary_param * (BCE(D(mu_lab), 1) + BCE(D(mu_unlab), 1))`` (lambda1, lambda2, lambda3).
* Online uncertainty indicator (:func:`oui_state`): the task model's softmax ``P`` of an
  unlabelled sample is mapped to a labelled-state in (0, 1]; labelled samples have state 1.
* State discriminator on ``mu``: ``BCE(D(mu_lab), 1) + BCE(D(mu_unlab), state(x_unlab))`` with the
  states as soft targets ("relabelling" the unlabelled samples by their certainty).
* Selection: the candidates with the lowest predicted state ``sigmoid(D(mu(x)))`` (score =
  ``-logit``).

Deviations, all forced by the loop's interface: the paper's indicator is "online" (recomputed
from the task model while it trains jointly with the generator); here the task model is already
trained when the strategy runs, so the states come from the final task model of the cycle, which
is what the online indicator ends at. The generator and discriminator are trained fresh at every
selection for ``iterations`` iterations, as in :mod:`gradnorm_al.strategies.vaal` (whether the
paper keeps them across cycles is not stated). The paper's initial-pool sampling algorithm is not
implemented: the loop draws the initial labelled pool. Loss weights, step counts, learning rate,
batch size and latent size default to VAAL's published values (the paper builds on VAAL; the
values in its text could not be checked here).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..options import NonNegativeFloat, validate
from .base import STRATEGIES, ScoringStrategy, SelectionContext
from .common import probabilities, seeded_torch
from .vae import (
    AdversarialConfig,
    StepLosses,
    build_networks,
    candidate_logits,
    latent_mlp,
    streams,
    train_adversarial,
)


def oui_state(probs: torch.Tensor) -> torch.Tensor:
    """SRAAL's online uncertainty indicator, as a labelled-state: [N, C] probabilities ->
    float64 [N] in (0, 1] (1 = as certain as a labelled sample).

    With ``m = max_i P_i`` and ``V(P) = (1/C) sum_i (P_i - 1/C)^2`` the variance of the
    prediction, ``minV(m)`` is the smallest variance of any distribution whose largest entry is
    ``m``, reached when the other ``C - 1`` entries are equal to ``(1 - m) / (C - 1)``:
    ``minV(m) = (1/C) [(m - 1/C)^2 + (C - 1) ((1 - m)/(C - 1) - 1/C)^2] = (m - 1/C)^2 / (C - 1)``.
    The paper's indicator (uncertainty) is ``ind(P) = 1 - minV(m) / V(P) * m``; the relabelled
    state returned here is ``1 - ind(P) = minV(m) / V(P) * m``.

    A one-hot prediction gets state 1 (the largest possible: the ratio and ``m`` are at most 1);
    when the non-maximal classes share the rest equally the ratio is 1 and the state is ``m``, so
    the uniform prediction gets ``1/C``, the least among those. Uneven rests lower the ratio: a
    two-way tie ``(1/2, 1/2, 0)`` gets ``1/8 < 1/3``.

    Round-off: the variances are taken about each row's own mean (``sum_i P_i / C``, 1 up to
    rounding), so a row of equal entries has ``V = 0`` exactly in any precision; there the ratio is
    taken as 1 (its limit along equal rests), and so whenever ``V`` is below the square of the
    input precision's machine epsilon, where the ratio of two round-off-sized variances would be
    meaningless.
    """
    p = torch.as_tensor(probs)
    precision = p.dtype if p.is_floating_point() else torch.float64
    p = p.double()
    if p.dim() != 2 or p.shape[1] < 2:
        raise ValueError(f"expected probabilities [N, C] with C >= 2, got shape {tuple(p.shape)}")
    c = p.shape[1]
    mean = p.mean(dim=1, keepdim=True)
    m = p.max(dim=1).values
    var = ((p - mean) ** 2).mean(dim=1)
    min_var = (m - mean[:, 0]) ** 2 / (c - 1)
    flat = var <= torch.finfo(precision).eps ** 2
    ratio = torch.where(flat, torch.ones_like(var), min_var / torch.where(flat, 1.0, var))
    return ratio.clamp(0.0, 1.0) * m


class TargetLearner(nn.Module):
    """The supervised target learner: ``Linear(z, hidden)-ReLU-Linear(hidden, hidden)-ReLU-
    Linear(hidden, num_classes)`` on the latent sample (our choice of layers, the discriminator's
    shape with ``num_classes`` outputs; the paper gives no layer sizes we could check)."""

    def __init__(self, latent_dim: int, num_classes: int, hidden: int = 512) -> None:
        super().__init__()
        self.net = latent_mlp(latent_dim, hidden, num_classes)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


@STRATEGIES.register("sraal")
class SRAALStrategy(ScoringStrategy):
    """Select the candidates with the lowest predicted labelled-state.

    Hyper-parameters (defaults: VAAL's published values, see
    :class:`gradnorm_al.strategies.vae.AdversarialConfig`, except the CPU-sized ``iterations``):
    ``iterations`` 100 (None = ``(pool size * epochs) // batch_size``), ``epochs`` 100,
    ``batch_size`` 128, ``latent_dim`` 32, ``width`` 128, ``num_vae_steps`` 2, ``num_adv_steps``
    1, ``lr`` 5e-4 (Adam, generator + head and discriminator), ``beta`` 1, ``recon_weight`` 1
    (lambda1), ``classifier_weight`` 1 (lambda2), ``adversary_param`` 1 (lambda3), ``hidden`` 512.
    """

    dense_reason = (
        "its target learner classifies the VAE latent into one label per sample and its "
        "uncertainty indicator needs one softmax [C] per sample; a segmentation label is a mask "
        "(vaal, its unsupervised counterpart, runs on segmentation)"
    )

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
        recon_weight: NonNegativeFloat = 1.0,
        classifier_weight: NonNegativeFloat = 1.0,
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
        validate(self.config, "strategy sraal")
        self.recon_weight = float(recon_weight)
        self.classifier_weight = float(classifier_weight)
        #: losses of the last selection's training, for inspection
        self.history: StepLosses | None = None
        #: float64 [M] relabelled states of the last selection's candidates
        self.states: np.ndarray | None = None

    def score(self, ctx: SelectionContext) -> np.ndarray:
        cfg = self.config
        seed = int(ctx.rng.integers(0, 2**63 - 1))
        labelled, unlabelled = streams(ctx, cfg, seed, "sraal")
        states = oui_state(probabilities(ctx))
        self.states = states.numpy()
        targets = states.float().to(ctx.device)

        def supervised(z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
            if y is None:
                raise ConfigError("sraal trains a classifier on the labels, but the pool has none")
            return self.classifier_weight * F.cross_entropy(head(z), y)

        with seeded_torch(ctx.device, seed):
            vae, discriminator = build_networks(ctx, cfg)
            head = TargetLearner(cfg.latent_dim, ctx.num_classes, cfg.hidden).to(ctx.device)
            self.history = train_adversarial(
                cfg,
                vae,
                discriminator,
                labelled,
                unlabelled,
                cfg.resolved_iterations(len(ctx.pool)),
                head=head,
                supervised=supervised,
                recon_weight=self.recon_weight,
                unlabelled_target=lambda positions: targets[
                    torch.from_numpy(positions).to(ctx.device)
                ],
            )
            logits = candidate_logits(ctx, vae, discriminator)
        return (-logits).numpy()
