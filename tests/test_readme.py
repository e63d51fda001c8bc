"""The README's "Your own model and data" block runs exactly as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _block(heading: str) -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_your_own_model_and_data_block_runs_as_written(tmp_path):
    code = _block("Your own model and data")
    assert len(code.strip().splitlines()) <= 20
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    accuracy = float(re.search(r"'accuracy': ([0-9.]+)", done.stdout).group(1))
    assert 0.5 < accuracy <= 1.0  # 150 labels chosen by gradnorm: far above chance (0.1)
