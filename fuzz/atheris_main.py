"""One target under atheris/libFuzzer (coverage-guided). Started by ``fuzz/run.py``.

    python -m fuzz.atheris_main TARGET STATS_FILE [libFuzzer options and corpus dirs]

Appends a JSON line of progress to STATS_FILE every few thousand inputs and at the
ZTUNNEL_FUZZ_RUNS-th (inputs, inputs that reached the target's deep end, RSS, open
fds): libFuzzer ends the process with exit() and no atexit handler runs, so the
parent reads the last line instead of a return value.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import atheris  # type: ignore[import-untyped]

from fuzz.stats import open_fds, rss_kib

REPORT_EVERY = 5000
WARMUP = 2000  # inputs before the baseline is taken (imports, caches, first allocations)


def main() -> None:
    name, stats_path, *libfuzzer_args = sys.argv[1:]
    with atheris.instrument_imports(include=["fuzz"]):
        from fuzz.targets import TARGETS, imported
    target = TARGETS[name]
    if early := imported(target.instrument):
        sys.exit(f"{name}: listed for instrumentation but already imported: {early}")
    with atheris.instrument_imports(include=list(target.instrument)):
        for seed in target.seeds():  # imports the target's modules under instrumentation
            target.run(seed)
    stats = Path(stats_path)
    state = {"inputs": 0, "reached": 0, "start": time.monotonic()}
    baseline: dict[str, int] = {"rss_kib": rss_kib(), "fds": open_fds()}

    def report(final: bool = False) -> None:
        line = {
            "target": name,
            "inputs": state["inputs"],
            "reached": state["reached"],
            "seconds": round(time.monotonic() - state["start"], 1),
            "baseline_rss_kib": baseline["rss_kib"],
            "baseline_fds": baseline["fds"],
            "rss_kib": rss_kib(),
            "fds": open_fds(),
            "final": final,
        }
        with stats.open("a") as f:
            f.write(json.dumps(line) + "\n")

    def one_input(data: bytes) -> None:
        state["inputs"] += 1
        if target.run(data):
            state["reached"] += 1
        n = state["inputs"]
        if n == WARMUP:
            baseline.update(rss_kib=rss_kib(), fds=open_fds())
        if n == total:
            report(final=True)
        elif n % REPORT_EVERY == 0:
            report()

    total = int(os.environ.get("ZTUNNEL_FUZZ_RUNS", "0"))
    atheris.Setup([sys.argv[0], *libfuzzer_args], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
