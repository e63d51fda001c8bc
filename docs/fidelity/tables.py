"""The tables of docs/fidelity.md, from the committed raw files of its cells.

    python docs/fidelity/tables.py CELL [CELL ...] [--pairs A:B,A:B,...]

For each CELL (a folder under docs/fidelity/ holding ``results.csv``): the test accuracy (%)
per labelled fraction and the AUC, mean ± std over trials, best AUC first; then paired AUC
differences (percentage points) with the 95% t-interval, the paired t-test's and the exact
sign-flip permutation p-values and the wins, for every pair with a gradnorm strategy in it (or
the pairs given), each read better vs worse. Several cells are merged first (their strategies
must not overlap; the trials pair by seed). Uses the package's own summary and statistics
code, as ``gradnorm-al report`` does.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

from gradnorm_al.experiment.results import read_results
from gradnorm_al.reports.stats import compare_pair
from gradnorm_al.reports.summary import format_table, per_trial_auc, summarise

HERE = Path(__file__).resolve().parent
NAMES = {  # the names used on the page
    "entropy-gradnorm": "entropy-gradnorm (tensor-sum)",
    "entropy-gradnorm@top-k": "entropy-gradnorm (L2)",
    "entropy-gradnorm@power": "entropy-gradnorm@power (tensor-sum)",
}


def name(strategy: str) -> str:
    return NAMES.get(strategy, strategy)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cells", nargs="+")
    parser.add_argument("--pairs", default="", help="A:B,... (default: gradnorm vs every other)")
    args = parser.parse_args()
    rows = []
    for cell in args.cells:
        rows += read_results(HERE / cell / "results.csv")
    summaries = sorted(summarise(rows), key=lambda s: -s.auc.mean())
    for s in summaries:
        s.strategy = name(s.strategy)
    print(format_table(summaries))
    aucs = per_trial_auc(summaries)
    if args.pairs:
        pairs = [tuple(name(x) for x in p.split(":")) for p in args.pairs.split(",")]
    else:
        pairs = [p for p in itertools.combinations(aucs, 2) if any("gradnorm" in s for s in p)]
    print("| pair | mean ΔAUC | 95% interval | t-test p | permutation p | wins |")
    print("|---|---|---|---|---|---|")
    for a, b in pairs:
        c = compare_pair(a, b, aucs[a], aucs[b])
        if c.mean_diff < 0:  # read "better vs worse"
            c = compare_pair(b, a, aucs[b], aucs[a])
        print(
            f"| {c.first} vs {c.second} | {100 * c.mean_diff:+.2f} "
            f"| [{100 * c.ci_low:+.2f}, {100 * c.ci_high:+.2f}] | {c.t_pvalue:.2g} "
            f"| {c.perm_pvalue:.2g} | {c.wins}/{c.n} |"
        )


if __name__ == "__main__":
    main()
