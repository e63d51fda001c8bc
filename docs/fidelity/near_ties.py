"""Which samples entropy-gradnorm passes over: a look at the kept models of a main-table run.

    python docs/fidelity/near_ties.py RUN_DIR [--strategy entropy-gradnorm] [--cycles 0,1,2,3,4]

For each selecting cycle, at the models of ``--strategy``'s own trials (the models that made its
selections), with K its budget, the table gives:

* the share of misclassified samples among three top-K sets of the candidates: by the
  true-label gradient norm ||grad_theta CE(x, y)|| (Table 1's ranking), by the prediction
  entropy, and by the entropy's gradient norm ||grad_theta H(p(x))|| (entropy-gradnorm's score);
* the near-ties: candidates whose two largest class probabilities differ by less than 0.1, how
  many there are, the share of them misclassified, and the median percentile of their
  entropy-gradnorm score among all the candidates (100: the highest score).

Why near-ties: with z the logits, dH/dz_j = -p_j (log p_j + H), which is zero for every j when
p is uniform over the classes it gives mass to. A perfect tie therefore has a zero gradient, and
near-ties score below the top-K, while they are the samples a model most often gets wrong.
Mean over the trials; the norm is the run's. Needs ``run --keep-models``; uses the package's
own replay of the run and its batched engine (exact per-sample norms).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from gradnorm_al.analyses.replay import RunReader
from gradnorm_al.analyses.topk_overlap import true_label_grad_norms
from gradnorm_al.data.batching import iter_batches
from gradnorm_al.pergrad import per_sample_grad_norms
from gradnorm_al.strategies.base import top_k_positions
from gradnorm_al.strategies.common import entropy
from gradnorm_al.strategies.gradnorm import entropy_loss

NEAR_TIE = 0.1  # top-2 probability gap below which a candidate counts as a near-tie


def cycle_stats(reader: RunReader, strategy: str, trial: int, cycle: int) -> dict[str, float]:
    view = next(v for v in reader.cycles(strategy, trial) if v.cycle == cycle)
    model = reader.model(strategy, trial, cycle)
    candidates, k, norm = view.candidates, len(view.selected), reader.config.norm
    labels = reader.true_labels(candidates)
    data, batch = reader.bundle.train_eval, reader.config.score_batch_size
    true = true_label_grad_norms(
        model, data, candidates, norm=norm, batch_size=batch, task=reader.task, labels=labels
    )
    probs, score = [], []
    device = next(model.parameters()).device
    for x, _ in iter_batches(data, batch, candidates):
        x = x.to(device)
        with torch.no_grad():
            probs.append(torch.softmax(model(x), dim=1))
        score.append(per_sample_grad_norms(model, x, entropy_loss, norm=norm, chunk_size=len(x)))
    p_tensor = torch.cat(probs).double().cpu()
    p, gradnorm = p_tensor.numpy(), torch.cat(score).cpu().numpy()
    wrong = p.argmax(1) != labels.numpy()
    top2 = np.sort(p, axis=1)[:, -2:]
    ties = top2[:, 1] - top2[:, 0] < NEAR_TIE
    percentile = 100 * (np.argsort(np.argsort(gradnorm, kind="stable"), kind="stable") + 1)
    percentile = percentile / len(candidates)

    def wrong_share(scores: np.ndarray) -> float:
        return float(wrong[top_k_positions(scores, k)].mean())

    return {
        "k": k,
        "candidates": len(candidates),
        "accuracy": float(1 - wrong.mean()),
        "wrong_true": wrong_share(true),
        "wrong_entropy": wrong_share(entropy(p_tensor).numpy()),
        "wrong_gradnorm": wrong_share(gradnorm),
        "ties": int(ties.sum()),
        "wrong_ties": float(wrong[ties].mean()) if ties.any() else float("nan"),
        "tie_percentile": float(np.median(percentile[ties])) if ties.any() else float("nan"),
    }


def _mean(values: list[float]) -> float:
    """The mean over the trials that have a value (NaN: a trial without near-ties)."""
    finite = [v for v in values if not np.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _percent(share: float) -> str:
    return "—" if np.isnan(share) else f"{100 * share:.0f}%"


def _number(value: float) -> str:
    return "—" if np.isnan(value) else f"{value:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--strategy", default="entropy-gradnorm")
    parser.add_argument("--cycles", default="0,1,2,3,4")
    args = parser.parse_args()
    reader = RunReader(args.run_dir)
    reader.require_models()
    print(
        f"# Which samples {args.strategy} passes over\n\n"
        f"At the kept models of {args.strategy}'s {len(reader.trials(args.strategy))} trials "
        "(mean over them): misclassified share of the top-K candidates by each ranking, and the "
        f"near-ties (top-2 probability gap < {NEAR_TIE}), the share of them misclassified and "
        "the median percentile of their entropy-gradnorm score (100: highest). "
        "Made by docs/fidelity/near_ties.py.\n"
    )
    print(
        "| cycle | K / candidates | accuracy on candidates | misclassified in top-K by: "
        "true-label gradnorm | entropy | entropy-gradnorm | near-ties | misclassified among "
        "them | their median entropy-gradnorm percentile |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for cycle in (int(c) for c in args.cycles.split(",")):
        rows = [cycle_stats(reader, args.strategy, t, cycle) for t in reader.trials(args.strategy)]
        mean = {key: _mean([r[key] for r in rows]) for key in rows[0]}
        print(
            f"| {cycle} | {rows[0]['k']} / {rows[0]['candidates']} | {100 * mean['accuracy']:.1f}% "
            f"| {100 * mean['wrong_true']:.0f}% | {100 * mean['wrong_entropy']:.0f}% "
            f"| {100 * mean['wrong_gradnorm']:.0f}% | {mean['ties']:.1f} "
            f"| {_percent(mean['wrong_ties'])} | {_number(mean['tie_percentile'])} |"
        )


if __name__ == "__main__":
    main()
