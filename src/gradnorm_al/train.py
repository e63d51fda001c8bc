"""Fit and evaluate a task model: the training recipe, the loss and metrics from its task."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ._torch import eval_mode, first_output
from .data.batching import iter_batches
from .errors import NonFiniteError
from .options import option

if TYPE_CHECKING:  # tasks sit above train in the layers; fit only calls their methods
    from .tasks import MetricAccumulator, Task


@dataclass
class TrainConfig:
    """SGD with momentum and weight decay, step decay at ``milestones`` (epochs) by ``gamma``.

    ``milestones=None`` means one milestone at 80% of the epochs (160 of 200, as published).
    """

    epochs: int = option(200, "epochs per cycle", ge=1)
    lr: float = option(0.1, "SGD learning rate", gt=0.0)
    momentum: float = option(0.9, "SGD momentum", ge=0.0)
    weight_decay: float = option(5e-4, "weight decay", ge=0.0)
    milestones: list[int] | None = option(
        None,
        "epochs at which the lr is multiplied by --gamma",
        ge=1,
        metavar="EPOCH",
        none="80% of the epochs",
    )
    gamma: float = option(0.1, "lr decay factor", ge=0.0)
    batch_size: int = option(128, "training batch", ge=1)
    eval_batch_size: int = option(
        256, "batch size for the test and training metrics (large images: lower it)", ge=1
    )
    num_workers: int = option(
        0, "training data loader worker processes for file-backed datasets", ge=0
    )

    def resolved_milestones(self) -> list[int]:
        if self.milestones is None:
            return [max(1, round(0.8 * self.epochs))]
        return list(self.milestones)


class Auxiliary:
    """A module a strategy trains jointly with the task model (learning loss's loss predictor).

    ``module``'s parameters join the task model's in one SGD optimizer with the same
    hyper-parameters and schedule (the same as two optimizers with equal settings). After every
    forward pass of a training batch, :meth:`loss` gets the per-sample cross-entropy [B] of the
    batch and returns a scalar added to the task loss; features it needs it captures itself (e.g.
    with forward hooks it registered on the model).
    """

    module: nn.Module

    def loss(self, per_sample_loss: torch.Tensor, epoch: int, epochs: int) -> torch.Tensor:
        raise NotImplementedError


def fit(
    model: nn.Module,
    dataset: Dataset,
    indices: np.ndarray,
    cfg: TrainConfig,
    *,
    device: torch.device,
    seed: int,
    progress: bool = False,
    desc: str = "train",
    auxiliary: Auxiliary | None = None,
    task: Task | None = None,
    targets: torch.Tensor | None = None,
    augment: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> None:
    """Train ``model`` on ``dataset[indices]`` for ``cfg.epochs`` epochs; a fresh optimizer and
    schedule each call (the published warm start re-creates them every cycle).

    ``task`` gives the loss (default: cross-entropy on class indices); ``targets`` [len(indices),
    ...] are the labels to train on, in the order of ``indices`` (default: the dataset's own).

    ``seed`` fixes batch order and any randomness in the model (dropout, augmentation in the
    default process). A batch of a single sample is skipped: BatchNorm cannot train on it.
    ``auxiliary``: a module trained jointly, its loss added to the task loss (see
    :class:`Auxiliary`). ``augment(inputs, labels, generator) -> (inputs, labels)`` transforms
    every training batch before it reaches the device, with the seeded batch-order generator
    (a joint augmentation of images and masks, :class:`~gradnorm_al.data.augment.RandomCropFlip`).
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    params = list(model.parameters())
    if auxiliary is not None:
        params += list(auxiliary.module.parameters())
        auxiliary.module.train()
    optimizer = torch.optim.SGD(
        params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    schedule = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=cfg.resolved_milestones(), gamma=cfg.gamma
    )
    model.train()
    finite = torch.ones((), dtype=torch.bool, device=device)  # read once per epoch: no sync
    epochs = tqdm(range(cfg.epochs), desc=desc, leave=False, unit="epoch", disable=not progress)
    for epoch in epochs:
        for x, y in iter_batches(
            dataset,
            cfg.batch_size,
            indices,
            shuffle=True,
            generator=generator,
            num_workers=cfg.num_workers,
            targets=targets,
        ):
            if len(x) < 2:
                continue
            if augment is not None:
                x, y = augment(x, y, generator)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = first_output(model(x))
            if auxiliary is None:
                loss = F.cross_entropy(logits, y) if task is None else task.loss(logits, y)
            else:
                per_sample = (
                    F.cross_entropy(logits, y, reduction="none")
                    if task is None
                    else task.per_sample_loss(logits, y)
                )
                loss = per_sample.mean() + auxiliary.loss(per_sample, epoch, cfg.epochs)
            finite &= torch.isfinite(loss.detach())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        weights = torch.stack([torch.isfinite(p).all() for p in params]).all()
        if not bool(finite & weights.to(finite.device)):
            what = "training loss" if not bool(finite) else "model's weights after the epoch"
            raise NonFiniteError(
                f"epoch {epoch + 1}: the {what} are not finite (lr {cfg.lr:g}); lower --lr, or "
                "check the data for NaN or infinite values"
            )
        schedule.step()
    optimizer.zero_grad(set_to_none=True)
    model.eval()
    if auxiliary is not None:
        auxiliary.module.eval()


@torch.no_grad()
def predict(
    model: nn.Module,
    dataset: Dataset,
    indices: np.ndarray | None = None,
    *,
    device: torch.device,
    batch_size: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """(predicted classes, true targets) over ``dataset[indices]`` in eval mode."""
    preds, targets = [], []
    with eval_mode(model):  # each submodule's own mode comes back afterwards
        for x, y in iter_batches(dataset, batch_size, indices):
            preds.append(first_output(model(x.to(device))).argmax(dim=1).cpu())
            targets.append(y)
    if not preds:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return torch.cat(preds).numpy(), torch.cat(targets).numpy()


def accuracy(
    model: nn.Module,
    dataset: Dataset,
    indices: np.ndarray | None = None,
    *,
    device: torch.device,
    batch_size: int = 256,
) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` on ``dataset[indices]`` (all if None), eval mode."""
    pred, target = predict(model, dataset, indices, device=device, batch_size=batch_size)
    return float((pred == target).mean()) if len(target) else float("nan")


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    metrics: MetricAccumulator,
    indices: np.ndarray | None = None,
    *,
    device: torch.device,
    batch_size: int = 256,
    targets: torch.Tensor | None = None,
) -> dict[str, float]:
    """The task's metrics (``metrics``, a fresh accumulator) of ``model`` on ``dataset[indices]``
    (all if None), eval mode; ``targets`` replaces the dataset's own labels. Outputs that are
    not finite raise :class:`~gradnorm_al.errors.NonFiniteError` rather than score a metric."""
    with eval_mode(model):  # each submodule's own mode comes back afterwards
        for x, y in iter_batches(dataset, batch_size, indices, targets=targets):
            output = first_output(model(x.to(device)))
            if not bool(torch.isfinite(output).all()):
                raise NonFiniteError(
                    "evaluation: the model's outputs are not finite (NaN or infinite): the model "
                    "diverged (lower --lr) or the data holds such values"
                )
            metrics.update(output, y)
    return metrics.compute()
