"""How much bfloat16 autocast (``--amp bf16``) moves the scores, against float32.

Usage::

    python benchmarks/amp_scores.py [--device cpu|cuda] [--strategies entropy-gradnorm,...]

Rows (each: the strategy's candidate scores with ``amp="bf16"`` against the same model's float32
scores):

* smallcnn trained 2 and 10 epochs (lr 0.05, batch 32, seed 0) on the first 300 digits of the
  pool, scoring the next 1,000 (a confident model: its small scores are the most sensitive to
  the rounding of the logits);
* resnet18-cifar with the seeded random weights of ``benchmarks/scoring.py``, 2,048
  random-normal 3x32x32 candidates.

Columns: the relative L2 error of the score vector, the largest error over the largest score,
and how many of the float32 top-K (K = 5% of the candidates) the bf16 scores keep. One JSON line
per row follows the table. The numbers are measured margins, not bounds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scoring import SEED, build_model  # noqa: E402

from gradnorm_al import create_model, create_strategy, load_dataset  # noqa: E402
from gradnorm_al.strategies import SelectionContext  # noqa: E402
from gradnorm_al.train import TrainConfig, fit  # noqa: E402

LABELED = np.arange(0, 300)
CANDIDATES = np.arange(300, 1300)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--strategies",
        default="entropy-gradnorm,expected-gradnorm,entropy",
        help="comma-separated strategies with candidate scores",
    )
    parser.add_argument("--resnet-n", type=int, default=2048, help="random resnet18 candidates")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    args.strategies = [s for s in args.strategies.split(",") if s]
    return args


def compare(model, pool, candidates, device, strategy_name: str) -> dict[str, float]:
    strategy = create_strategy(strategy_name)

    def scores(amp: str) -> np.ndarray:
        ctx = SelectionContext(
            model=model,
            pool=pool,
            candidates=candidates,
            labeled=np.arange(0),
            num_classes=10,
            device=device,
            rng=np.random.default_rng(0),
            amp=amp,
        )
        return np.asarray(strategy.candidate_scores(ctx), dtype=np.float64)

    exact, bf16 = scores("none"), scores("bf16")
    k = max(1, len(candidates) // 20)
    kept = len(set(np.argsort(-exact)[:k]) & set(np.argsort(-bf16)[:k]))
    return {
        "rel_l2": float(np.linalg.norm(bf16 - exact) / np.linalg.norm(exact)),
        "max_over_largest": float(np.abs(bf16 - exact).max() / np.abs(exact).max()),
        "top_k_kept": kept,
        "k": k,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    rows = []
    digits = load_dataset("digits")
    for epochs in (2, 10):
        model = create_model("smallcnn", num_classes=10, in_channels=1).to(device)
        cfg = TrainConfig(epochs=epochs, lr=0.05, batch_size=32)
        fit(model, digits.train, LABELED, cfg, device=device, seed=SEED)
        model.eval()
        for name in args.strategies:
            row = compare(model, digits.train_eval, CANDIDATES, device, name)
            rows.append(
                {"model": f"smallcnn, {epochs} epochs on 300 digits", "strategy": name} | row
            )
    model = build_model("resnet18-cifar", device)
    gen = torch.Generator().manual_seed(SEED)
    x = torch.randn(args.resnet_n, 3, 32, 32, generator=gen)
    pool = TensorDataset(x, torch.zeros(args.resnet_n, dtype=torch.long))
    for name in args.strategies:
        row = compare(model, pool, np.arange(args.resnet_n), device, name)
        rows.append({"model": "resnet18-cifar, random weights", "strategy": name} | row)

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"bf16 autocast vs float32 scores on {where} (torch {torch.__version__})")
    print("| model | strategy | L2 rel. error | max error / largest score | top-K kept |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['strategy']} | {100 * r['rel_l2']:.2f}% "
            f"| {100 * r['max_over_largest']:.1f}% | {r['top_k_kept']} of {r['k']} |"
        )
    for r in rows:
        print(json.dumps(r | {"device": where}))


if __name__ == "__main__":
    main()
