"""bench/admission_micro.py runs (a tiny count) and prints its three figures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "admission_micro.py"


def test_the_admission_micro_benchmark_runs() -> None:
    out = subprocess.run(
        [sys.executable, str(BENCH), "--conns", "200"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "share (in the worker)" in out
    assert out.count("µs CPU per connection") == 3
    assert "a round trip" in out
