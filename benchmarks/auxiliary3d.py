"""What the auxiliary-model baselines cost on 3-D data, next to gradnorm, with the 3-D task model.

Usage::

    python benchmarks/auxiliary3d.py [--size 32] [--labelled 32] [--candidates 64]
        [--vae-width 16] [--vae-iterations 10] [--vae-batch-size 16] [--threads T]
        [--strategies entropy-gradnorm,vaal,...]

The paper argues that the baselines built on an auxiliary network (a VAE and a discriminator for
vaal / sraal, a loss-prediction module for ll4al, a graph network for the GCN ones) must be
redesigned for 3-D data, while gradnorm needs nothing beyond the task model. Here every strategy
runs through :class:`gradnorm_al.ActiveLearner` on the same random subtomogram-sized pool
(``--labelled`` labelled and ``--candidates`` unlabelled volumes 1 x size^3, 10 classes) with
``cnn3d`` at its default width, one training epoch (batch 16) and one query of 8. For each:

* ``extra_params``: parameters of the auxiliary networks as run (0 for gradnorm and the
  baselines that need none), and ``published_params``: the same networks at the published sizes
  (VAE width 128, latent 32, discriminator hidden 512; ll4al hidden 128; GCN hidden 128), counted
  on the meta device (nothing allocated);
* ``fit_s``: the training epoch (ll4al trains its module jointly: its overhead shows here);
* ``select_s``: the query, and ``select_over_gradnorm``: its ratio to entropy-gradnorm's query.

vaal / sraal train their 3-D VAE for ``--vae-iterations`` iterations of batch ``--vae-batch-size``
at width ``--vae-width`` (the published 128 is far beyond a CPU: at 32^3 one VAE step of the
published network took 0.95 s per volume on the 2-core development machine, so one published
iteration, two steps on 128 + 128 volumes, about 8 minutes); ``s_per_vae_iteration`` is
``select_s / iterations`` and ``published_iterations`` the published schedule's iteration count
for this pool (``pool * 100 // 128``). Same seed, same model weights for every strategy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from gradnorm_al import ActiveLearner
from gradnorm_al.models import create_model
from gradnorm_al.strategies import create_strategy
from gradnorm_al.strategies.gcn import SequentialGCN
from gradnorm_al.strategies.ll4al import LossPredictionModule, feature_stages, stage_channels
from gradnorm_al.strategies.sraal import TargetLearner
from gradnorm_al.strategies.vae import ConvVAE, LatentDiscriminator
from gradnorm_al.tasks import ClassificationTask
from gradnorm_al.train import TrainConfig

CLASSES, QUERY, SEED = 10, 8, 0
DEFAULT_STRATEGIES = "entropy-gradnorm,entropy,core-set,badge,mc-dropout,ll4al,core-gcn,vaal,sraal"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=32, help="volume side (default 32)")
    parser.add_argument("--labelled", type=int, default=32)
    parser.add_argument("--candidates", type=int, default=64)
    parser.add_argument("--vae-width", type=int, default=16)
    parser.add_argument("--vae-iterations", type=int, default=10)
    parser.add_argument("--vae-batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--strategies", default=DEFAULT_STRATEGIES)
    args = parser.parse_args(argv)
    if min(args.size, args.labelled, args.candidates) < 1 or args.candidates < QUERY:
        parser.error(f"sizes must be positive and --candidates at least {QUERY}")
    return args


def _count(*modules: nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def auxiliary_params(name: str, args: argparse.Namespace, model: nn.Module) -> tuple[int, int]:
    """(parameters as run, at the published sizes) of ``name``'s auxiliary networks."""
    shape = (1, args.size, args.size, args.size)

    def vae(width: int, latent: int, hidden: int, head: bool) -> int:
        with torch.device("meta"):
            nets = [ConvVAE(shape, latent, width), LatentDiscriminator(latent, hidden)]
            if head:
                nets.append(TargetLearner(latent, CLASSES, hidden))
        return _count(*nets)

    if name in ("vaal", "sraal"):
        return (
            vae(args.vae_width, 32, 512, name == "sraal"),
            vae(128, 32, 512, name == "sraal"),
        )
    if name == "ll4al":
        channels = [stage_channels(s) for s in feature_stages(model)]
        count = _count(LossPredictionModule(channels, 128))
        return count, count
    if name in ("core-gcn", "uncertain-gcn"):
        count = _count(SequentialGCN(model.feature_dim, 128))
        return count, count
    return 0, 0


def strategy_options(name: str, args: argparse.Namespace) -> dict:
    if name in ("vaal", "sraal"):
        return {
            "width": args.vae_width,
            "iterations": args.vae_iterations,
            "batch_size": args.vae_batch_size,
        }
    return {}


def run(name: str, args: argparse.Namespace, pool: TensorDataset) -> dict:
    learner = ActiveLearner(
        lambda: create_model("cnn3d", num_classes=CLASSES, in_channels=1),
        pool,
        ClassificationTask(CLASSES),
        create_strategy(name, **strategy_options(name, args)),
        train=TrainConfig(epochs=1, batch_size=16),
        seed=SEED,
        batch_size=16,
    )
    learner.update(np.arange(args.labelled), pool.tensors[1][: args.labelled])
    start = time.perf_counter()
    learner.fit()
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    learner.query(QUERY)
    select_s = time.perf_counter() - start
    extra, published = auxiliary_params(name, args, learner.model)
    row = {
        "strategy": name,
        "extra_params": extra,
        "published_params": published,
        "fit_s": round(fit_s, 2),
        "select_s": round(select_s, 2),
    }
    if name in ("vaal", "sraal"):
        row["s_per_vae_iteration"] = round(select_s / args.vae_iterations, 3)
        row["published_iterations"] = len(pool) * 100 // 128
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(SEED)
    n = args.labelled + args.candidates
    x = torch.randn(n, 1, args.size, args.size, args.size, generator=g)
    pool = TensorDataset(x, torch.arange(n) % CLASSES)
    print(
        f"cnn3d on {n} volumes 1x{args.size}^3 ({args.labelled} labelled, {args.candidates} "
        f"candidates), threads={torch.get_num_threads()} torch={torch.__version__}"
    )
    run("random", args, pool)  # warm-up: one-off imports and thread pools of a first fit
    rows = [run(name, args, pool) for name in args.strategies.split(",")]
    base = next((r["select_s"] for r in rows if r["strategy"] == "entropy-gradnorm"), None)
    print(
        f"{'strategy':<18} {'extra params':>13} {'published':>13} {'fit s':>8} {'select s':>9} "
        f"{'x gradnorm':>10}"
    )
    for r in rows:
        if base:
            r["select_over_gradnorm"] = round(r["select_s"] / base, 2)
        ratio = r.get("select_over_gradnorm", float("nan"))
        print(
            f"{r['strategy']:<18} {r['extra_params']:>13,d} {r['published_params']:>13,d} "
            f"{r['fit_s']:>8.2f} {r['select_s']:>9.2f} {ratio:>10.2f}"
        )
    for r in rows:
        if "s_per_vae_iteration" in r:
            print(
                f"{r['strategy']}: {r['s_per_vae_iteration']} s per VAE iteration at width "
                f"{args.vae_width}, batch {args.vae_batch_size}; the published schedule runs "
                f"{r['published_iterations']} iterations on this pool"
            )
    print(json.dumps({"size": args.size, "pool": n, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
