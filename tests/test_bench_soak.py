"""bench/soak.py cannot rot: its verdict arithmetic, and a 5-second soak end to end.

No timed assertions: the run checks that every connection opened, every request was
answered, the interval reports add up and the agents' fds came back, never how fast.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import soak_report as report  # noqa: E402


def _sample(t: float, phase: str, rss_mib: float, fds: int) -> dict[str, Any]:
    reading = {"rss_kib": int(rss_mib * 1024), "fds": fds, "cpu_s": t / 10}
    return {"t": t, "phase": phase, "loadavg": [1.0, 1.0, 1.0], "agents": {"A": reading}}


def _run(rss_during_load: list[float], fds_after: int) -> list[dict[str, Any]]:
    samples = [_sample(0, "baseline", 60, 15), _sample(5, "open", 80, 10_015)]
    samples += [_sample(10 + 10 * i, "load", rss, 10_025) for i, rss in enumerate(rss_during_load)]
    samples.append(_sample(200, "after", 85, fds_after))
    return samples


def test_steady_growth_skips_the_warm_up_tenth_of_the_load() -> None:
    # 11 load samples 10 s apart: the first tenth (100 s) ends at the second sample
    samples = _run([80, 90, 91, 91, 92, 92, 93, 93, 94, 94, 95], fds_after=15)
    assert report.steady_rss_growth(samples, "A") == pytest.approx(5.0, abs=0.01)
    fig = report.agent_figures(samples, "A", baseline_fds=15)
    assert fig["rss_mib"]["baseline"] == 60.0 and fig["rss_mib"]["peak"] == 95.0
    assert fig["fds"] == {"baseline": 15, "idle_open": 10_015, "peak": 10_025, "after": 15}
    assert fig["load_vcpu"] == pytest.approx(0.1)


def test_verdict_fails_on_errors_leaked_fds_and_steady_growth() -> None:
    clean = {"A": report.agent_figures(_run([80, 80, 81], 15), "A", 15)}
    assert report.verdict({"requests unanswered": 0}, clean, 64) == {"ok": True, "reasons": []}

    failed = report.verdict({"requests unanswered": 3}, clean, 64)
    assert failed == {"ok": False, "reasons": ["3 requests unanswered"]}

    leaked = {"A": report.agent_figures(_run([80, 80, 81], 17), "A", 15)}
    v = report.verdict({}, leaked, 64)
    assert not v["ok"] and v["reasons"] == ["agent A: 17 fds after close, baseline 15"]

    growing = {"A": report.agent_figures(_run([80, 100, 200], 15), "A", 15)}
    v = report.verdict({}, growing, 64)
    assert not v["ok"] and "RSS grew 100.0 MiB" in v["reasons"][0]


@pytest.mark.timeout(120)
def test_short_soak_answers_everything_and_gives_fds_back(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    if shutil.which("gcc") is None and shutil.which("cc") is None:
        pytest.skip("no C compiler (scripts/install.sh installs gcc as root)")
    argv = ["--duration", "5", "--idle", "200", "--rate", "100", "--interval", "1"]
    argv += ["--pool-idle", "1", "--out", str(tmp_path)]
    proc = subprocess.run(
        [sys.executable, str(BENCH / "soak.py"), *argv],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "soak.json").read_text())
    assert doc["verdict"] == {"ok": True, "reasons": []}
    assert doc["idle"]["opened"] == 200 and doc["idle"]["errors"] == 0
    load = doc["load"]
    assert load["sent"] == load["done"] == 500 and load["lost"] == 0
    # the interval reports partition the run: every answered request is in exactly one
    intervals = doc["latency_intervals"]
    assert len(intervals) >= 4
    assert sum(iv["latency_us"]["n"] for iv in intervals) == load["done"]
    assert intervals[-1]["done"] == load["done"]
    assert set(doc["errors"].values()) == {0}
    for name in ("A", "B"):
        fds = doc["agents"][name]["fds"]
        # each agent held one fd per idle connection, then gave them all back
        assert fds["idle_open"] >= fds["baseline"] + 200
        assert fds["after"] <= fds["baseline"]
    phases = [s["phase"] for s in doc["samples"]]
    assert {"baseline", "open", "load", "close", "after"} <= set(phases)
    assert doc["fds_back_s"] is not None
    assert (tmp_path / "soak.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "PASS" in (tmp_path / "soak.txt").read_text()
