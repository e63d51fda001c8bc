"""Throughput of entropy-gradnorm candidate scoring split across torchrun processes.

Usage::

    python benchmarks/distributed_scoring.py [--model smallcnn|resnet18-cifar] [--device cpu|cuda]
        [--samples N] [--batch-size B] [--repeats R] [--configs PxT,PxT,...] [--amp none|bf16]
        [--channels-last]

Each configuration ``PxT`` is one ``torchrun --standalone --nproc_per_node P`` launch of this
script with ``OMP_NUM_THREADS=T`` (T torch threads per process; torchrun's own default is 1).
Every process builds the same model as ``benchmarks/scoring.py`` (seeded random weights,
randomised BatchNorm statistics, eval mode) and the same ``N`` random-normal candidates, and
times what a run's selection does: ``strategy.candidate_scores(ctx)`` with a sharded
``SelectionContext`` (each process scores its block of whole batches of ``B`` candidates, then the
full vector is gathered on every process). One warm-up round, then ``R`` timed rounds between
barriers; the rate is N / the median round. The launches run one after the other in one call,
so the machine's load is as alike as it gets; the table ends with each rate over the first
configuration's and one JSON line. The scores of every configuration with one thread per process
are checked to be equal bit for bit (a split changes nothing but the speed).

Defaults: CPU ``--configs 1x1,1x2,2x1`` (the 2-core machine: one process on one core, one
process on both cores, two processes on one core each), ``--samples 512 --batch-size 64``;
CUDA ``--configs 1x1`` (one process per GPU: ``Px1`` with P GPUs), ``--samples 8192
--batch-size 256``. (``--samples``, not ``--n``: torchrun would take ``--n`` for one of its
own options.)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scoring import INPUT_SHAPES, SEED, build_model  # noqa: E402

from gradnorm_al import create_strategy, distributed  # noqa: E402
from gradnorm_al.strategies import SelectionContext  # noqa: E402

MODELS = ("smallcnn", "resnet18-cifar")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smallcnn", choices=MODELS)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--samples", type=int, default=None, help="candidates (512 CPU, 8192 CUDA)")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="scoring batch (64 CPU, 256 CUDA)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds after one warm-up")
    parser.add_argument(
        "--configs", default=None, help="PxT launches: P processes x T threads each"
    )
    parser.add_argument("--amp", default="none", choices=["none", "bf16"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    args.samples = args.samples or (8192 if cuda else 512)
    args.batch_size = args.batch_size or (256 if cuda else 64)
    args.configs = args.configs or ("1x1" if cuda else "1x1,1x2,2x1")
    return args


def worker(args: argparse.Namespace) -> None:
    device = distributed.setup(torch.device(args.device))
    torch.manual_seed(SEED)
    model = build_model(args.model, device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(SEED)
    x = torch.randn(args.samples, *INPUT_SHAPES[args.model], generator=g)
    pool = TensorDataset(x, torch.zeros(args.samples, dtype=torch.int64))
    ctx = SelectionContext(
        model=model,
        pool=pool,
        candidates=np.arange(args.samples),
        labeled=np.zeros(0, dtype=np.int64),
        num_classes=10,
        device=device,
        rng=np.random.default_rng(SEED),
        batch_size=args.batch_size,
        sharded=distributed.is_distributed(),
        amp=args.amp,
    )
    strategy = create_strategy("entropy-gradnorm")
    times = []
    for _ in range(args.repeats + 1):
        distributed.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        scores = strategy.candidate_scores(ctx)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        distributed.barrier()
        times.append(time.perf_counter() - start)
    if distributed.is_main():
        median = statistics.median(times[1:])
        result = {
            "processes": distributed.world_size(),
            "threads": torch.get_num_threads(),
            "samples_per_s": args.samples / median,
            "median_s": median,
            "scores_sha": hashlib.sha256(scores.tobytes()).hexdigest()[:16],
        }
        print("RESULT " + json.dumps(result), flush=True)
    distributed.shutdown()


def launch(args: argparse.Namespace, processes: int, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", str(processes), __file__, "--worker"]
    command += ["--model", args.model, "--device", args.device, "--samples", str(args.samples)]
    command += ["--batch-size", str(args.batch_size), "--repeats", str(args.repeats)]
    command += ["--amp", args.amp] + (["--channels-last"] if args.channels_last else [])
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        sys.exit(f"launch {processes}x{threads} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    results = []
    for config in args.configs.split(","):
        processes, threads = (int(v) for v in config.split("x"))
        results.append(launch(args, processes, threads))
    base = results[0]["samples_per_s"]
    shape = "x".join(str(s) for s in INPUT_SHAPES[args.model])
    print(
        f"entropy-gradnorm scoring, {args.model} {shape}, {args.device}, n {args.samples}, batch "
        f"{args.batch_size}, amp {args.amp}{', channels-last' if args.channels_last else ''}"
    )
    print("| processes x threads | samples/s | vs first |\n|---|---|---|")
    for r in results:
        rate = r["samples_per_s"]
        print(f"| {r['processes']} x {r['threads']} | {rate:,.1f} | {rate / base:.2f} |")
    one_thread = {r["scores_sha"] for r in results if r["threads"] == 1}
    same = len(one_thread) <= 1
    summary = {"model": args.model, "device": args.device, "amp": args.amp, "same": same}
    print(json.dumps({**summary, "results": results}))
    if not same:
        print("scores differ between one-thread configurations", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
