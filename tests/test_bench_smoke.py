"""CI runs a tiny benchmark so that the suite cannot rot (figures are not asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.integration
def test_benchmark_smoke_run_prints_the_table() -> None:
    res = subprocess.run([sys.executable, "-m", "bench", "--smoke"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    for measure in ("ingest: naive nats-py subscriber", "ingest: workermon (fully applied)",
                    "latency publish→callback", "per-event cost, workermon", "per-event cost, naive port",
                    "is_busy()", "busy_workers()", "initial sync", "memory per worker"):
        assert measure in out, f"{measure!r} missing from:\n{out}"
    # The correctness check inside the benchmark must hold even at smoke size.
    assert "| 0 wrong of" in out
