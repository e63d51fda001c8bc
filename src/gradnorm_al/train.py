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

from . import distributed
from ._torch import AMP_MODES, autocast, eval_mode, first_output
from .data.batching import iter_batches
from .errors import NonFiniteError
from .options import option
from .seeding import derive_seed

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
    amp: str = option(
        "none",
        "mixed precision of training and per-candidate scoring: bf16 (bfloat16 autocast; for "
        "CUDA, works on the CPU) or none",
        choices=AMP_MODES,
    )
    channels_last: bool = option(
        False, "channels-last memory format for 2-D convolutional models (CUDA)"
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

    ``cfg.amp="bf16"``: forward pass and loss under bfloat16 autocast; ``cfg.channels_last``: the
    model (4-D weights) and inputs in channels-last memory format.

    Under torchrun (:mod:`gradnorm_al.distributed`) the model trains under
    DistributedDataParallel: each global batch of the one-process order is split evenly between
    the processes (``batch_size`` must be a multiple of their number), a smaller share of the last
    batch weighs its loss by its samples, and a global batch is skipped unless every process gets
    two of its samples. BatchNorm normalises each process's share with its own statistics (as
    DistributedDataParallel does without SyncBatchNorm), so a model with BatchNorm trains a little
    differently from one process; rank 0's weights and statistics end on every process.
    ``auxiliary``'s gradients are averaged over the processes.
    """
    rank = distributed.rank()
    positions, per_process, factors = distributed.split_batches(len(indices), cfg.batch_size)
    # the batch order is shared; each process draws its own dropout masks and augmentations
    torch.manual_seed(seed if rank == 0 else derive_seed(seed, rank))
    generator = torch.Generator().manual_seed(seed)
    augment_generator = (
        generator if rank == 0 else torch.Generator().manual_seed(derive_seed(seed, rank))
    )
    indices = np.asarray(indices, dtype=np.int64)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    params = list(model.parameters())
    aux_params = [] if auxiliary is None else list(auxiliary.module.parameters())
    if auxiliary is not None:
        auxiliary.module.train()
    optimizer = torch.optim.SGD(
        params + aux_params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    schedule = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=cfg.resolved_milestones(), gamma=cfg.gamma
    )
    model.train()
    net = distributed.ddp(model, device)  # the model itself in one process
    finite = torch.ones((), dtype=torch.bool, device=device)  # read once per epoch: no sync
    epochs = tqdm(range(cfg.epochs), desc=desc, leave=False, unit="epoch", disable=not progress)
    for epoch in epochs:
        # the one-process order, each process reading its share of every batch of it
        order = torch.randperm(len(indices), generator=generator).numpy()[positions]
        batches = iter_batches(
            dataset,
            per_process,
            indices[order],
            num_workers=cfg.num_workers,
            targets=None if targets is None else targets[torch.from_numpy(order)],
        )
        for (x, y), factor in zip(batches, factors):
            if factor is None:
                continue
            if augment is not None:
                x, y = augment(x, y, augment_generator)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if cfg.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, cfg.amp):
                logits = first_output(net(x))
                if auxiliary is None:
                    loss = F.cross_entropy(logits, y) if task is None else task.loss(logits, y)
                else:
                    per_sample = (
                        F.cross_entropy(logits, y, reduction="none")
                        if task is None
                        else task.per_sample_loss(logits, y)
                    )
                    loss = per_sample.mean() + auxiliary.loss(per_sample, epoch, cfg.epochs)
            if factor != 1.0:  # a share smaller than the others: weigh it by its samples
                loss = loss * factor
            finite &= torch.isfinite(loss.detach())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            distributed.average_gradients(aux_params)
            optimizer.step()
        weights = torch.stack([torch.isfinite(p).all() for p in params + aux_params]).all()
        loss_ok, weights_ok = distributed.all_true(finite, weights)
        if not (loss_ok and weights_ok):
            what = "training loss" if not loss_ok else "model's weights after the epoch"
            raise NonFiniteError(
                f"epoch {epoch + 1}: the {what} are not finite (lr {cfg.lr:g}); lower --lr, or "
                "check the data for NaN or infinite values"
            )
        schedule.step()
    optimizer.zero_grad(set_to_none=True)
    distributed.broadcast_module(model)  # rank 0's BatchNorm statistics on every process
    model.eval()
    if auxiliary is not None:
        distributed.broadcast_module(auxiliary.module)
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
    not finite raise :class:`~gradnorm_al.errors.NonFiniteError` rather than score a metric.
    Under torchrun each process evaluates a block of the data and the counts of an accumulator
    with ``merge`` are merged (exact: they are sums)."""
    sharded = distributed.is_distributed() and callable(getattr(metrics, "merge", None))
    if sharded:
        idx = np.arange(len(dataset)) if indices is None else np.asarray(indices, np.int64)
        start, stop = distributed.shard_bounds(len(idx), batch_size)
        indices, targets = idx[start:stop], None if targets is None else targets[start:stop]
    finite = True
    with eval_mode(model):  # each submodule's own mode comes back afterwards
        for x, y in iter_batches(dataset, batch_size, indices, targets=targets):
            output = first_output(model(x.to(device)))
            finite = bool(torch.isfinite(output).all())
            if not finite:
                break
            metrics.update(output, y)
    if sharded:
        (finite,) = distributed.all_true(finite)
    if not finite:
        raise NonFiniteError(
            "evaluation: the model's outputs are not finite (NaN or infinite): the model "
            "diverged (lower --lr) or the data holds such values"
        )
    if sharded:
        parts = distributed.gather_objects(metrics)
        metrics = parts[0]
        for part in parts[1:]:
            metrics.merge(part)  # type: ignore[attr-defined]
    return metrics.compute()
