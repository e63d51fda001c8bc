"""Throughput of per-sample gradient-norm scoring: batched engine vs. batch-size-1 loop vs. a step.

Usage::

    python benchmarks/scoring.py --model smallcnn|resnet18-cifar|fcn-small|drn-d-22|cnn3d|resnet3d
        |vit-small-cifar|lstm-text
        [--device cpu|cuda] [--n N] [--batch-size B] [--repeats R] [--threads T] [--loop-n M]
        [--pin-heap] [--no-memory]

Three methods are timed on the same model (random seeded weights, BatchNorm running statistics
randomised a little, a ViT's zero-initialised head drawn from N(0, 0.02), eval mode, float32) and
the same random-normal inputs (1x28x28 for ``smallcnn``, 3x32x32 for ``resnet18-cifar`` and
``vit-small-cifar``, 3x64x64 crops for the segmentation models ``fcn-small`` and ``drn-d-22``,
1x32x32x32 subtomograms for the 3-D models ``cnn3d`` and ``resnet3d``; for the text classifier
``lstm-text``, uniformly random token ids), with the entropy loss of the GradNorm strategy (for
the dense models: per-pixel entropy averaged over each image, ``entropy_loss``'s default
reduction).

``lstm-text`` (issue 20) is a plain recurrent text classifier, sized like the common
IMDB / AG-News baselines: ``nn.Embedding(20000, 128)`` -> a one-layer unidirectional
``nn.LSTM(128, 256, batch_first=True)`` -> ``nn.Linear(256, 10)`` on the final hidden state,
over sequences of 64 tokens. One layer is the common baseline; a second layer or direction adds
one more such unit of work to every method alike.

The methods:

(a) ``loop``: :func:`gradnorm_al.pergrad.per_sample_grad_norms_loop`, one backward per sample. It
    is slow, so it runs on the first ``M`` samples only (``--loop-n``; default ``min(N, 64)`` on
    CPU, ``min(N, 256)`` on CUDA) and is converted to samples/s.
(b) ``engine``: :func:`gradnorm_al.pergrad.per_sample_grad_norms` on every batch of ``B`` samples
    (``chunk_size=B``) over all ``N`` samples.
(c) ``train-step``: the floor. A plain batched forward and ``entropy_loss(out).sum().backward()``
    in eval mode on the same batches, grads zeroed (set to None) between batches: what one
    training step costs. For the dense models the loss is the pixel cross-entropy against fixed
    random labels (``F.cross_entropy(out, y).backward()``), what a segmentation training step
    computes.

The methods are interleaved: one warm-up round of a, b, c, then ``R`` rounds (default 6) whose
order rotates (a, b, c / b, c, a / c, a, b / ...), so that machine noise and whatever one method
leaves behind for the next (caches, the allocator's heap) hit all three alike; each method's
time is the median over its ``R`` rounds. Before
timing, engine and loop are compared on the loop's subset; the script exits with status 1 when the
median relative difference exceeds 1e-3, so a broken engine cannot post a fast number silently.

``--pin-heap`` (Linux, glibc) keeps freed memory in the process: glibc neither trims its heap
nor serves large blocks with fresh ``mmap`` calls, so that the kernel's page faults on re-touched
memory (which vary a lot between processes on a busy machine) do not add noise. It applies to all
three methods alike; without it the allocator runs with its defaults, as a user's scoring would.

Peak memory (Linux; ``--no-memory`` skips it): each method runs once more in a fresh Python
process (same seed, model and inputs); after the setup the process's peak resident set size is
reset (``/proc/self/clear_refs``) and ``VmHWM`` read after the method: ``peak_mib`` is that peak,
``extra_mib`` the peak minus the resident size before the method (what the method itself adds,
one-off allocations of a first call such as thread pools included; a fresh process, so no memory
freed by another method or a warm-up is reused). Where the peak cannot be reset
``extra_mib`` is measured against the process's peak since start (``ru_maxrss``).

The last line printed is one JSON object with the rates, ``loop_over_engine`` (loop time per
sample / engine time per sample: how many times faster the engine is) and
``engine_over_train_step`` (engine time per sample / train-step time per sample; <= 1.0 means the
engine is cheaper than a training step).

Targets (from the issue):

* ``engine_over_train_step <= 1.0`` for ``smallcnn`` and ``resnet18-cifar`` on the 2-core CPU;
* ``loop_over_engine >= 4`` for ``smallcnn`` on the CPU;
* on a GPU, ``loop_over_engine >= 30`` for ``resnet18-cifar`` at batch size 256;
* ``engine_over_train_step <= 1.3`` for ``fcn-small`` and ``drn-d-22`` on the CPU (the train step
  being the dense loss's forward + backward), with the engine's peak memory growing with the
  chunk (``--batch-size``), not with ``--n``.

* ``engine_over_train_step <= 1.2`` for ``vit-small-cifar`` and ``lstm-text`` on the CPU
  (issue 20).

No target is set for the 3-D models (issue 17): the numbers are reported as measured. A 32^3
volume costs about as much as a 180x180 image, so on the CPU the 3-D models default to
``--n 32 --batch-size 16 --loop-n 8`` (explicit flags win). On the CPU ``lstm-text`` defaults to
``--loop-n 16``: the loop's float32 LSTM backward (oneDNN's) costs ~0.2 s per call at any size.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gradnorm_al.models import create_model
from gradnorm_al.pergrad import per_sample_grad_norms, per_sample_grad_norms_loop
from gradnorm_al.strategies import entropy_loss

INPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "smallcnn": (1, 28, 28),
    "resnet18-cifar": (3, 32, 32),
    "fcn-small": (3, 64, 64),
    "drn-d-22": (3, 64, 64),
    "cnn3d": (1, 32, 32, 32),
    "resnet3d": (1, 32, 32, 32),
    "vit-small-cifar": (3, 32, 32),
    "lstm-text": (64,),  # token ids
}
#: text models: vocabulary size (the inputs are token ids of INPUT_SHAPES' length)
VOCAB = {"lstm-text": 20000}
#: CPU defaults of --n, --batch-size and --loop-n where the general ones would take too long
CPU_DEFAULTS = {name: (32, 16, 8) for name in ("cnn3d", "resnet3d")} | {"lstm-text": (256, 64, 16)}
NUM_CLASSES = 10
#: segmentation models: Cityscapes' 19 classes
DENSE_NUM_CLASSES = {"fcn-small": 19, "drn-d-22": 19}
SEED = 0
MAX_MEDIAN_REL_ERR = 1e-3


@dataclass
class Method:
    """One timed method: ``run`` processes ``samples`` samples."""

    name: str
    run: Callable[[], None]
    samples: int


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, choices=sorted(INPUT_SHAPES))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--n",
        type=int,
        default=None,
        help="samples for engine and train step (default: 256 CPU (3-D models 32), 2048 CUDA)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="batch size / engine chunk size (default: 64 CPU (3-D models 16), 256 CUDA)",
    )
    parser.add_argument(
        "--repeats", type=int, default=6, help="timed rounds after one warm-up (order rotates)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's own)"
    )
    parser.add_argument(
        "--pin-heap",
        action="store_true",
        help="keep freed memory in the process (glibc mallopt): no page-fault noise",
    )
    parser.add_argument(
        "--loop-n",
        type=int,
        default=None,
        help="samples timed with the loop (default: min(N, 64) CPU (3-D: 8), 256 CUDA)",
    )
    parser.add_argument(
        "--no-memory", action="store_true", help="skip the peak-memory runs (fresh processes)"
    )
    parser.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    n, batch, loop_n = (2048, 256, 256) if cuda else CPU_DEFAULTS.get(args.model, (256, 64, 64))
    if args.n is None:
        args.n = n
    if args.batch_size is None:
        args.batch_size = batch
    if args.loop_n is None:
        args.loop_n = min(args.n, loop_n)
    for name in ("n", "batch_size", "repeats", "loop_n"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.loop_n > args.n:
        parser.error("--loop-n must be <= --n")
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    return args


class LSTMText(nn.Module):
    """Token ids [N, L] -> embedding -> one-layer LSTM -> linear head on the final hidden state."""

    def __init__(self, vocab: int, num_classes: int, embed: int = 128, hidden: int = 256) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        _, (h_n, _) = self.lstm(self.embed(ids))
        return self.head(h_n[-1])


def build_model(name: str, device: torch.device) -> nn.Module:
    """Seeded random weights, BatchNorm running statistics randomised a little, eval mode."""
    num_classes = DENSE_NUM_CLASSES.get(name, NUM_CLASSES)
    if name in VOCAB:
        model = LSTMText(VOCAB[name], num_classes)
    else:
        model = create_model(name, num_classes=num_classes, in_channels=INPUT_SHAPES[name][0])
    with torch.no_grad():
        if name.startswith("vit"):
            # torchvision starts a ViT's head at zero, where no gradient reaches the rest
            model.classifier.weight.normal_(0.0, 0.02)
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model.to(device=device, dtype=torch.float32).eval()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], None], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def check_agreement(
    model: nn.Module, x: torch.Tensor, batch_size: int
) -> tuple[float, float, list[str]]:
    """Max and median relative difference of engine vs. loop on ``x``, and any warnings raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = per_sample_grad_norms(model, x, entropy_loss, chunk_size=batch_size)
        loop = per_sample_grad_norms_loop(model, x, entropy_loss)
    rel = ((engine - loop).abs() / loop.abs().clamp_min(torch.finfo(torch.float64).tiny)).cpu()
    messages = [f"{w.category.__name__}: {w.message}" for w in caught]
    return rel.max().item(), rel.median().item(), messages


def make_methods(
    model: nn.Module,
    x: torch.Tensor,
    batch_size: int,
    loop_n: int,
    labels: torch.Tensor | None = None,
) -> list[Method]:
    """``labels`` (dense models): per-pixel classes for the train step's cross-entropy."""
    batches = list(torch.split(x, batch_size))
    label_batches = None if labels is None else list(torch.split(labels, batch_size))
    loop_x = x[:loop_n]

    def loop() -> None:
        per_sample_grad_norms_loop(model, loop_x, entropy_loss)

    def engine() -> None:
        for xb in batches:
            per_sample_grad_norms(model, xb, entropy_loss, chunk_size=batch_size)

    # A recurrent layer without dropout computes the same function in train mode, where a real
    # training step runs it (on CUDA, cuDNN's RNN backward refuses eval mode).
    recurrent = [m for m in model.modules() if isinstance(m, nn.RNNBase) and not m.dropout]

    def train_step() -> None:
        for m in recurrent:
            m.train()
        for i, xb in enumerate(batches):
            if label_batches is None:
                entropy_loss(model(xb)).sum().backward()
            else:
                F.cross_entropy(model(xb), label_batches[i]).backward()
            model.zero_grad(set_to_none=True)
        for m in recurrent:
            m.eval()

    return [
        Method("loop", loop, loop_n),
        Method("engine", engine, x.shape[0]),
        Method("train-step", train_step, x.shape[0]),
    ]


def benchmark(methods: list[Method], repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds per method over ``repeats`` interleaved rounds, after one warm-up round;
    round r runs the methods in the order rotated by r (no method always follows the same one)."""
    times: dict[str, list[float]] = {m.name: [] for m in methods}
    for round_ in range(repeats + 1):
        shift = (round_ - 1) % len(methods) if round_ > 0 else 0
        for method in methods[shift:] + methods[:shift]:
            seconds = timed(method.run, device)
            if round_ > 0:
                times[method.name].append(seconds)
    return {name: statistics.median(ts) for name, ts in times.items()}


#: glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def pin_heap() -> None:
    """Ask glibc to keep freed memory: no heap trimming, no mmap for blocks under 1 GiB."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) and libc.mallopt(M_MMAP_THRESHOLD, 2**30)
    except (OSError, AttributeError):
        ok = False
    if not ok:
        raise SystemExit("--pin-heap needs glibc (Linux); run without it")


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def measure_memory(method: Method, device: torch.device) -> dict[str, float | None]:
    """Peak resident set size while ``method`` runs once (see the module docstring), in MiB."""
    before = _status_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        reset = True
    except OSError:
        reset = False
    timed(method.run, device)
    peak = _status_kib("VmHWM") if reset else None
    if peak is None:  # ru_maxrss is KiB on Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    extra = None if before is None else (peak - before) / 1024
    return {"peak_mib": round(peak / 1024, 1), "extra_mib": extra and round(extra, 1)}


def memory_in_fresh_processes(args: argparse.Namespace, names: list[str]) -> dict[str, dict]:
    """Run each method once in its own Python process (same arguments) and collect its peak."""
    if not sys.platform.startswith("linux"):
        return {}
    argv = [sys.executable, os.path.abspath(__file__), "--model", args.model]
    argv += ["--device", args.device, "--n", str(args.n), "--batch-size", str(args.batch_size)]
    argv += ["--loop-n", str(args.loop_n)]
    if args.threads is not None:
        argv += ["--threads", str(args.threads)]
    if args.pin_heap:
        argv.append("--pin-heap")
    result = {}
    for name in names:
        done = subprocess.run(
            [*argv, "--memory-of", name], capture_output=True, text=True, check=False
        )
        lines = done.stdout.strip().splitlines()
        if done.returncode != 0 or not lines:
            print(f"memory run of {name} failed: {done.stderr.strip()[-500:]}", file=sys.stderr)
            continue
        result[name] = json.loads(lines[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.pin_heap:
        pin_heap()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(SEED)
    model = build_model(args.model, device)
    if args.model in VOCAB:
        x = torch.randint(VOCAB[args.model], (args.n, *INPUT_SHAPES[args.model]), device=device)
    else:
        x = torch.randn(args.n, *INPUT_SHAPES[args.model], device=device, dtype=torch.float32)
    labels = None
    if args.model in DENSE_NUM_CLASSES:
        shape = (args.n, *INPUT_SHAPES[args.model][1:])
        labels = torch.randint(DENSE_NUM_CLASSES[args.model], shape, device=device)
    if args.memory_of is not None:
        methods = make_methods(model, x, args.batch_size, args.loop_n, labels)
        (method,) = [m for m in methods if m.name == args.memory_of]
        print(json.dumps(measure_memory(method, device)))
        return 0
    print(
        f"model={args.model} device={args.device} n={args.n} batch_size={args.batch_size} "
        f"repeats={args.repeats} threads={torch.get_num_threads()} pin_heap={args.pin_heap} "
        f"torch={torch.__version__}"
    )
    print(f"loop timed on {args.loop_n} of {args.n} samples")

    max_rel, median_rel, messages = check_agreement(model, x[: args.loop_n], args.batch_size)
    print(
        f"engine vs loop on {args.loop_n} samples: max rel diff {max_rel:.3e}, "
        f"median {median_rel:.3e}"
    )
    for message in messages:
        print(f"warning during check: {message}")
    if not median_rel <= MAX_MEDIAN_REL_ERR:
        print(
            f"FAIL: median relative difference {median_rel:.3e} > {MAX_MEDIAN_REL_ERR:g}",
            file=sys.stderr,
        )
        return 1

    methods = make_methods(model, x, args.batch_size, args.loop_n, labels)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        medians = benchmark(methods, args.repeats, device)
    for message in sorted({f"{w.category.__name__}: {w.message}" for w in caught}):
        print(f"warning during timing: {message}")

    per_sample = {m.name: medians[m.name] / m.samples for m in methods}
    rate = {name: 1.0 / t for name, t in per_sample.items()}
    print()
    print(f"{'method':<12} {'samples':>8} {'samples/s':>12} {'ms/sample':>11}")
    for m in methods:
        print(
            f"{m.name:<12} {m.samples:>8d} {rate[m.name]:>12.1f} {1e3 * per_sample[m.name]:>11.3f}"
        )
    loop_over_engine = per_sample["loop"] / per_sample["engine"]
    engine_over_train_step = per_sample["engine"] / per_sample["train-step"]
    print(
        f"loop/engine (time per sample): {loop_over_engine:.2f}x   "
        f"engine/train-step: {engine_over_train_step:.3f}"
    )
    memory = {} if args.no_memory else memory_in_fresh_processes(args, [m.name for m in methods])
    for name, mem in memory.items():
        print(f"peak memory {name:<12} {mem['peak_mib']} MiB (method adds {mem['extra_mib']} MiB)")
    print(
        json.dumps(
            {
                "model": args.model,
                "device": args.device,
                "n": args.n,
                "batch_size": args.batch_size,
                "loop_n": args.loop_n,
                "repeats": args.repeats,
                "threads": torch.get_num_threads(),
                "pin_heap": args.pin_heap,
                "torch": torch.__version__,
                "loop_samples_per_s": round(rate["loop"], 3),
                "engine_samples_per_s": round(rate["engine"], 3),
                "train_step_samples_per_s": round(rate["train-step"], 3),
                "loop_over_engine": round(loop_over_engine, 4),
                "engine_over_train_step": round(engine_over_train_step, 4),
                "max_rel_err": max_rel,
                "median_rel_err": median_rel,
                "memory_mib": memory,
                "process_max_rss_mib": round(
                    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
                ),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
