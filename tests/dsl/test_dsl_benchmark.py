"""Keep benchmarks/dsl.py from rotting: a tiny run must finish and print its tables."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "dsl.py"


def test_benchmark_runs_on_a_small_input() -> None:
    result = subprocess.run(
        [sys.executable, str(BENCHMARK), "--pipelines", "40", "--sources", "4", "--repeat", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout.startswith("40 pipelines, 4 sources")
    assert "optimize (merged DAGs)" in result.stdout
    before = int(next(line for line in result.stdout.splitlines() if line.startswith("before")).split()[-1])
    after = int(next(line for line in result.stdout.splitlines() if line.startswith("after")).split()[-1])
    assert 0 < after < before
