"""Learning loss for active learning (Yoo & Kweon, CVPR 2019, "Learning Loss for Active
Learning"; facts checked against the authors' PyTorch re-implementation by Mephisto405,
``Learning-Loss-for-Active-Learning``: ``models/lossnet.py``, ``main.py``, ``config.py``).

A small loss-prediction module is trained jointly with the task model and predicts each sample's
cross-entropy loss from the task model's intermediate features; the candidates with the highest
predicted loss are selected.

Module (``LossNet``): for every feature tap (each of ``model.stages``, else each of
``model.blocks``) global average pooling -> ``Linear(channels, hidden)`` -> ReLU; the per-tap
vectors are concatenated and ``Linear(taps * hidden, 1)`` gives one predicted loss per sample.

Training (through :class:`gradnorm_al.train.Auxiliary`): the total loss is
``mean_i CE_i + weight * L_rank`` with the pairwise margin ranking loss
(:func:`loss_prediction_loss`). The features reach the module with their gradient for the first
``round(stop_gradient_fraction * epochs)`` epochs and detached (no gradient from the module into
the task model) afterwards. Published: ``epoch_loss = 120`` of 200 epochs, so
``stop_gradient_fraction = 0.6``. The published loop detaches when ``epoch > 120`` with 0-based
epochs, i.e. 121 epochs with gradient; we follow the paper's "after 120 epochs" (120 epochs with
gradient), which also makes a fraction of 0 mean "always detached" and 1 "never".

Optimiser: the published code trains the module with its own SGD (lr 0.1, momentum 0.9, weight
decay 5e-4, the task model's milestones). ``fit`` puts the module's parameters into the task
model's SGD optimizer instead; SGD updates every parameter on its own from the same lr, momentum,
weight decay and schedule, so the two are mathematically the same.

Selection: both the task model and the module in eval mode, one predicted loss per candidate,
top-K (the published code sorts ascending and takes the last K).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._torch import eval_mode
from ..errors import ConfigError
from ..options import NonNegativeFloat, PositiveInt, Range
from ..train import Auxiliary
from .base import STRATEGIES, ScoringStrategy, SelectionContext
from .common import map_batches


def loss_prediction_loss(
    predicted: torch.Tensor, target: torch.Tensor, margin: float = 1.0
) -> torch.Tensor:
    """The pairwise margin ranking loss of learning loss (the published ``LossPredLoss``).

    ``predicted`` [B] are the module's predicted losses and ``target`` [B] the true per-sample
    losses (detached here: the target gives only the direction of each pair). The batch is split
    into the pairs ``(i, B-1-i)``, ``i < B // 2`` (the batch against its flip), and

        ``L = mean over pairs of max(0, margin - s_ij * (predicted_i - predicted_j))``,
        ``s_ij = +1 if target_i > target_j else -1``

    (ties count as -1, as in the published ``2 * sign(clamp(t_i - t_j, min=0)) - 1``). An odd
    batch leaves its middle sample unpaired; the published code asserts an even batch instead,
    which our training loop cannot promise (its last batch may be odd). Returns a scalar tensor.
    """
    if predicted.dim() != 1 or predicted.shape != target.shape:
        raise ValueError(
            f"expected predicted and target losses shaped [B], got {tuple(predicted.shape)} and "
            f"{tuple(target.shape)}"
        )
    pairs = len(predicted) // 2
    if pairs < 1:
        raise ValueError("the ranking loss needs a batch of at least 2 samples")
    diff_pred = (predicted - predicted.flip(0))[:pairs]
    diff_true = (target - target.flip(0))[:pairs].detach()
    sign = torch.where(diff_true > 0, 1.0, -1.0).to(diff_pred.dtype)
    return (margin - sign * diff_pred).clamp_min(0.0).mean()


def feature_stages(model: nn.Module) -> list[nn.Module]:
    """The modules whose outputs feed the loss-prediction module: ``model.stages`` (ResNets), else
    ``model.blocks`` (smallcnn), in forward order."""
    for name in ("stages", "blocks"):
        stages = getattr(model, name, None)
        if isinstance(stages, nn.Module) and len(list(stages.children())) > 0:
            return list(stages.children())
    raise ConfigError(
        f"ll4al needs intermediate features, but {type(model).__name__} has no 'stages' or "
        "'blocks' module list; give the model one (nn.ModuleList of the blocks run in order)"
    )


def stage_channels(stage: nn.Module) -> int:
    """The channel count of ``stage``'s output, read from its structure: the width of the last
    registered submodule that has one (``out_channels`` of a conv, ``num_features`` of a norm,
    ``out_features`` of a linear layer). Checked against the real features on the first forward
    pass (:class:`LossPredictionModule` raises ConfigError on a mismatch)."""
    for module in reversed(list(stage.modules())):
        for attr in ("out_channels", "num_features", "out_features"):
            width = getattr(module, attr, None)
            if isinstance(width, int) and not isinstance(width, bool):
                return width
    raise ConfigError(
        f"cannot tell the output channels of the stage {type(stage).__name__}: it has no "
        "convolution, normalisation or linear layer; ll4al taps only such stages"
    )


class LossPredictionModule(nn.Module):
    """The loss-prediction module: per tap GAP -> Linear(c, hidden) -> ReLU, concatenated, then
    Linear(taps * hidden, 1). ``forward(features)`` takes one tensor per tap ([B, c, ...] or
    [B, c]; with ``tokens``, [B, L, c] token sequences, averaged over the L tokens, as a
    transformer's blocks give) and returns the predicted losses [B]."""

    def __init__(self, channels: Sequence[int], hidden: int = 128, tokens: bool = False) -> None:
        super().__init__()
        self.tokens = bool(tokens)
        self.channels = [int(c) for c in channels]
        self.taps = nn.ModuleList(nn.Linear(c, hidden) for c in self.channels)
        self.head = nn.Linear(len(self.channels) * hidden, 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(features) != len(self.taps):
            raise ValueError(f"expected {len(self.taps)} feature tensors, got {len(features)}")
        vectors = []
        for i, (fc, f) in enumerate(zip(self.taps, features, strict=True)):
            # global average pooling: the published AvgPool2d(feature_size) on maps of that size
            if self.tokens and f.dim() == 3:
                pooled = f.mean(dim=1)  # the average token, as GAP averages positions
            else:
                pooled = f.flatten(2).mean(dim=2) if f.dim() > 2 else f
            if pooled.dim() != 2 or pooled.shape[1] != fc.in_features:
                raise ConfigError(
                    f"ll4al expected {fc.in_features} channels from feature stage {i}, got shape "
                    f"{tuple(f.shape)}; the stage's output width could not be read from its "
                    "structure (its last conv/norm/linear layer must give it)"
                )
            vectors.append(F.relu(fc(pooled)))
        return self.head(torch.cat(vectors, dim=1)).squeeze(1)


class LossPredictionAuxiliary(Auxiliary):
    """The loss-prediction module of one task model, and the forward hooks feeding it.

    Each feature stage of the model gets one forward hook. A hook keeps the stage's output only
    while the stage is in train mode (training batches in ``fit``) or inside :meth:`capturing`
    (scoring), and only that of the latest forward pass; :meth:`loss` and :meth:`predict` take
    and clear it, so evaluation passes hold nothing. The auxiliary keeps no reference to the model
    (a strategy can key it by the model in a weak dictionary); :meth:`remove` removes the hooks.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        margin: float = 1.0,
        weight: float = 1.0,
        hidden: int = 128,
        stop_gradient_fraction: float = 0.6,
    ) -> None:
        stages = feature_stages(model)
        ref = next(model.parameters(), None)
        self.module = LossPredictionModule(
            [stage_channels(s) for s in stages],
            hidden,
            tokens=bool(getattr(model, "token_features", False)),
        )
        if ref is not None:
            self.module.to(device=ref.device, dtype=ref.dtype)
        self.margin = margin
        self.weight = weight
        self.stop_gradient_fraction = stop_gradient_fraction
        self._features: list[torch.Tensor | None] = [None] * len(stages)
        self._capturing = False
        self._handles = [
            stage.register_forward_hook(partial(self._hook, i)) for i, stage in enumerate(stages)
        ]

    def _hook(self, index: int, stage: nn.Module, inputs: object, output: object) -> None:
        if stage.training or self._capturing:
            if not isinstance(output, torch.Tensor):
                raise ConfigError(
                    f"ll4al feature stage {index} ({type(stage).__name__}) returned "
                    f"{type(output).__name__}, not a tensor; tap stages that return one tensor"
                )
            self._features[index] = output

    @contextlib.contextmanager
    def capturing(self) -> Iterator[None]:
        """Keep the stages' outputs also in eval mode (for scoring)."""
        self._capturing = True
        try:
            yield
        finally:
            self._capturing = False

    def take_features(self) -> list[torch.Tensor]:
        """The features of the latest captured forward pass, one per stage; clears them."""
        features, self._features = self._features, [None] * len(self._features)
        if any(f is None for f in features):
            raise RuntimeError(
                "ll4al found no captured features: run the model's forward pass (in train mode, "
                "or inside capturing()) right before asking for the loss or the prediction"
            )
        return features  # type: ignore[return-value]

    def gradient_stopped(self, epoch: int, epochs: int) -> bool:
        """Whether the features are detached in ``epoch`` (0-based) of ``epochs``: from epoch
        ``round(stop_gradient_fraction * epochs)`` on (120 of 200 as published)."""
        return epoch >= round(self.stop_gradient_fraction * epochs)

    def loss(self, per_sample_loss: torch.Tensor, epoch: int, epochs: int) -> torch.Tensor:
        """``weight * loss_prediction_loss(predicted, per_sample_loss, margin)`` on the latest
        training batch."""
        features = self.take_features()
        if self.gradient_stopped(epoch, epochs):
            features = [f.detach() for f in features]
        predicted = self.module(features)
        return self.weight * loss_prediction_loss(predicted, per_sample_loss, self.margin)

    def predict(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Predicted losses [B] of the batch ``x`` (one forward pass of ``model``, which must be
        the model this auxiliary hooks; modes are the caller's)."""
        with self.capturing():
            model(x)
        return self.module(self.take_features())

    def remove(self) -> None:
        """Remove the forward hooks from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._features = [None] * len(self._features)


@STRATEGIES.register("ll4al")
class LL4ALStrategy(ScoringStrategy):
    """Learning loss: select the candidates with the highest loss predicted by the module trained
    jointly with the task model (see the module docstring).

    Parameters
    ----------
    margin : margin of the ranking loss (published 1.0).
    weight : weight ``lambda`` of the ranking loss in the total loss (published 1.0).
    hidden : width of each tap's FC layer (published 128).
    stop_gradient_fraction : fraction of the epochs after which the module's gradient no longer
        reaches the task model (published 120 of 200 epochs = 0.6).
    """

    per_candidate = True
    dense_reason = (
        "its loss-prediction module is implemented and checked for one classification loss per "
        "sample only; predicting an image's reduced pixel loss is not implemented"
    )

    def __init__(
        self,
        margin: NonNegativeFloat = 1.0,
        weight: NonNegativeFloat = 1.0,
        hidden: PositiveInt = 128,
        stop_gradient_fraction: Annotated[float, Range(ge=0.0, le=1.0)] = 0.6,
    ) -> None:
        self.margin = float(margin)
        self.weight = float(weight)
        self.hidden = int(hidden)
        self.stop_gradient_fraction = float(stop_gradient_fraction)
        # One auxiliary per task model (a strategy object serves several trials one after the
        # other); weak keys, so a finished trial's model and its module can be freed.
        self._auxiliaries: weakref.WeakKeyDictionary[nn.Module, LossPredictionAuxiliary] = (
            weakref.WeakKeyDictionary()
        )

    def auxiliary(self, model: nn.Module) -> LossPredictionAuxiliary:
        """Build the loss-prediction module for ``model`` (initialised from torch's global
        generator, which the loop seeds) and hook its feature stages; replaces an earlier one."""
        old = self._auxiliaries.pop(model, None)
        if old is not None:
            old.remove()
        aux = LossPredictionAuxiliary(
            model,
            margin=self.margin,
            weight=self.weight,
            hidden=self.hidden,
            stop_gradient_fraction=self.stop_gradient_fraction,
        )
        self._auxiliaries[model] = aux
        return aux

    def auxiliary_for(self, model: nn.Module) -> LossPredictionAuxiliary:
        """The auxiliary built for ``model`` by :meth:`auxiliary`; ConfigError if there is none."""
        aux = self._auxiliaries.get(model)
        if aux is None:
            raise ConfigError(
                "ll4al has no loss-prediction module for this model: it is trained jointly with "
                "the task model, so call strategy.auxiliary(model) before training and pass it "
                "to fit(auxiliary=...) (run_trial does both)"
            )
        return aux

    def score(self, ctx: SelectionContext) -> np.ndarray:
        """float64 [M]: the predicted loss of each candidate (model and module in eval mode)."""
        aux = self.auxiliary_for(ctx.model)
        with eval_mode(aux.module):
            predicted = map_batches(ctx, ctx.candidates, partial(aux.predict, ctx.model))
        return predicted.double().numpy()
