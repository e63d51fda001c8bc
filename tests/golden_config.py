"""The small run whose results the redesign must reproduce bit for bit on the same machine.

``python tests/golden_config.py OUT`` runs it with whatever gradnorm_al is importable and writes
``OUT/golden.json``: the results without their wall times, the selected indices, and the machine
they were computed on. tests/data/golden_run.json was written by the code before the
ActiveLearner redesign (commit aa7c63f); tests/test_golden.py re-runs the configuration and
compares on a machine of the same fingerprint.
"""

from __future__ import annotations

import csv
import hashlib
import json
import platform
import sys
from pathlib import Path

GOLDEN_CONFIG = {
    "dataset": "digits",
    "model": "smallcnn",
    "pool_size": 300,
    "trials": 1,
    "cycles": 3,
    "epochs": 3,
    "lr": 0.05,
    "batch_size": 32,
    "strategies": ["random", "entropy-gradnorm", "core-set", "mc-dropout", "ll4al", "badge"],
    "strategy_params": {"mc-dropout": {"samples": 4}},
}


def machine() -> dict:
    """What float results depend on: CPU model, thread count, library versions."""
    import numpy
    import torch

    cpu, flags = platform.processor(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == platform.processor():
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_flags": hashlib.sha256(flags.encode()).hexdigest()[:16],  # kernels differ by ISA
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


def run(out: Path) -> dict:
    from gradnorm_al import ExperimentConfig, run_experiment

    config = ExperimentConfig.from_dict(GOLDEN_CONFIG)
    run_experiment(config, out, overwrite=True, progress=False)
    with open(out / "results.csv", newline="", encoding="utf-8") as fh:
        rows = [
            {k: v for k, v in row.items() if k not in ("train_seconds", "select_seconds")}
            for row in csv.DictReader(fh)
        ]
    selections = [
        {k: s[k] for k in ("strategy", "trial", "cycle", "indices")}
        for s in map(json.loads, (out / "selections.jsonl").read_text().splitlines())
    ]
    return {"machine": machine(), "rows": rows, "selections": selections}


if __name__ == "__main__":
    target = Path(sys.argv[1])
    result = run(target)
    (target / "golden.json").write_text(json.dumps(result, indent=1) + "\n")
