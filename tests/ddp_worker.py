"""What tests/test_distributed.py runs in each process, alone or under torchrun.

``python ddp_worker.py cli ARGS...``: ``gradnorm-al ARGS...`` with the BatchNorm-free test model
``tiny-cnn`` registered (a model whose training under DistributedDataParallel equals one
process's up to the order of floating-point sums).

``python ddp_worker.py abort``: join the process group, then rank 1 aborts (SIGABRT).

``python ddp_worker.py scores MODEL.pt OUT``: score and select with a fixed smallcnn (the weights
in MODEL.pt) on 300 digits candidates with entropy-gradnorm, entropy and random, evaluate it on
the test set, and gather a few uneven arrays; each process writes ``OUT/rank<r>.npz``.
"""

from __future__ import annotations

import atexit
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gradnorm_al import distributed
from gradnorm_al.cli import main
from gradnorm_al.models import MODELS, TaskModel

CANDIDATES = np.arange(100, 400)  # 300 of the digits pool: 3 batches of 128 (the last short)
LABELED = np.arange(0, 100)
STRATEGIES = ("entropy-gradnorm", "entropy", "random")
K = 25
#: what a ``cli`` process prints if the interpreter's teardown ran (it must not, in a group)
FINALIZED = "ddp_worker: interpreter finalized"


class TinyCNN(TaskModel):
    """conv-ReLU-pool, conv-ReLU, global pool, linear: no BatchNorm, no dropout."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.feature_dim = 16
        self.classifier = nn.Linear(16, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).flatten(1)


def register() -> None:
    if "tiny-cnn" not in MODELS:
        MODELS.register("tiny-cnn")(TinyCNN)


def abort_on_rank1() -> None:
    """Join the group, meet once, then rank 1 dies of a native abort (SIGABRT)."""
    distributed.setup(torch.device("cpu"))
    distributed.barrier()
    if distributed.rank() == 1:
        import os

        os.abort()


def scores(model_path: str, out: str) -> None:
    from gradnorm_al import create_model, create_strategy, load_dataset
    from gradnorm_al.strategies import SelectionContext
    from gradnorm_al.tasks import ClassificationTask
    from gradnorm_al.train import evaluate

    device = distributed.setup(torch.device("cpu"))
    bundle = load_dataset("digits")
    model = create_model("smallcnn", num_classes=10, in_channels=1)
    model.load_state_dict(torch.load(model_path, weights_only=True))
    model.eval()
    result: dict[str, np.ndarray] = {}
    for name in STRATEGIES:
        ctx = SelectionContext(
            model=model,
            pool=bundle.train_eval,
            candidates=CANDIDATES,
            labeled=LABELED,
            num_classes=10,
            device=device,
            rng=np.random.default_rng(7),
            batch_size=128,
            sharded=distributed.is_distributed(),
        )
        strategy = create_strategy(name)
        vector = strategy.candidate_scores(ctx)
        if vector is not None:
            result[f"{name}/scores"] = vector
        # a fresh context (the same rng) for the selection: this process's own, not broadcast
        selection = strategy.query(dataclasses.replace(ctx, rng=np.random.default_rng(7)), K)
        result[f"{name}/selected"] = selection.indices
    # one batch of candidates for two processes: rank 1 scores none
    few = dataclasses.replace(ctx, candidates=CANDIDATES[:100])
    result["few/scores"] = create_strategy("entropy").candidate_scores(few)
    accumulator = ClassificationTask(10).metric_accumulator()
    metrics = evaluate(model, bundle.test, accumulator, device=device, batch_size=64)
    result["test_accuracy"] = np.array([metrics["accuracy"]])
    accumulator = ClassificationTask(10).metric_accumulator()
    metrics = evaluate(model, bundle.test, accumulator, np.arange(50), device=device, batch_size=64)
    result["few_accuracy"] = np.array([metrics["accuracy"]])  # rank 1 evaluates none
    rank = distributed.rank()
    result["uneven"] = distributed.gather(np.arange(3 * rank, 6 * rank, dtype=np.float64))
    Path(out).mkdir(parents=True, exist_ok=True)
    np.savez(Path(out) / f"rank{rank}.npz", **result)
    distributed.shutdown()


if __name__ == "__main__":
    register()
    if sys.argv[1] == "cli":
        # the CLI ends a process of torchrun's group without the interpreter's teardown
        atexit.register(lambda: print(FINALIZED, file=sys.stderr))
        sys.exit(main(sys.argv[2:]))
    if sys.argv[1] == "abort":
        abort_on_rank1()
        sys.exit(0)
    scores(*sys.argv[2:])
