"""Run fuzz targets and report inputs/s, crashes, open fds and RSS before/after.

    python fuzz/run.py --list
    python fuzz/run.py --target hbone-frames --inputs 1000000
    python fuzz/run.py --all --inputs 1000000 --results fuzz-results.jsonl

Engines: ``atheris`` (default; coverage-guided libFuzzer, one child process per
target) and ``random`` (in-process: seeds mutated at random, no coverage feedback;
for machines without atheris). A crash is any exception outside the target's
documented errors, a broken invariant (``Finding``), a hang past ``--timeout`` or
memory past ``--rss-limit-mb``; atheris saves the input as ``crash-*`` in the
artifacts directory and the run stops there (libFuzzer's behaviour), the random
engine saves it and goes on. Exit status: 0 when no target crashed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fuzz.stats import open_fds, rss_kib  # noqa: E402
from fuzz.targets import TARGETS, Target  # noqa: E402

MAX_LEN = 4096


def run_atheris(
    target: Target, inputs: int, workdir: Path, timeout: int, rss_limit_mb: int, max_time: int
) -> dict[str, object]:
    corpus = workdir / "corpus" / target.name
    corpus.mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(target.seeds()):
        (corpus / f"seed-{i}").write_bytes(seed)
    artifacts = workdir / "artifacts" / target.name
    artifacts.mkdir(parents=True, exist_ok=True)
    stats = workdir / f"{target.name}.stats.jsonl"
    stats.unlink(missing_ok=True)
    log = workdir / f"{target.name}.log"
    args = [
        sys.executable, "-m", "fuzz.atheris_main", target.name, str(stats),
        f"-runs={inputs}", f"-max_len={MAX_LEN}", f"-timeout={timeout}",
        f"-rss_limit_mb={rss_limit_mb}", f"-artifact_prefix={artifacts}/",
        "-print_final_stats=1", str(corpus),
    ]  # fmt: skip
    if max_time:
        args.insert(-1, f"-max_total_time={max_time}")
    env = {**os.environ, "ZTUNNEL_FUZZ_RUNS": str(inputs), "PYTHONPATH": str(ROOT)}
    started = time.monotonic()
    cpu_before = _children_cpu()
    with log.open("wb") as out:
        code = subprocess.run(
            args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        ).returncode
    elapsed = time.monotonic() - started
    cpu = _children_cpu() - cpu_before
    last = _last_line(stats)
    crashes = sorted(str(p) for p in artifacts.iterdir())
    result: dict[str, object] = {
        "target": target.name,
        "engine": "atheris",
        "exit": code,
        # libFuzzer's count when it printed one (a -max_total_time exit writes no final
        # progress line), else the last progress line's (every REPORT_EVERY inputs).
        "inputs": _executed_units(log) or last.get("inputs", 0),
        "reached": last.get("reached", 0),
        "seconds": round(elapsed, 1),
        "cpu_seconds": round(cpu, 1),
        "crashes": crashes,
        "rss_kib_before": last.get("baseline_rss_kib"),
        "rss_kib_after": last.get("rss_kib"),
        "fds_before": last.get("baseline_fds"),
        "fds_after": last.get("fds"),
        "log": str(log),
    }
    if code != 0 and not crashes:
        result["crashes"] = [f"exit {code} without an artifact, see {log}"]
    if code != 0:
        result["error"] = _crash_excerpt(log)
    return result


def _children_cpu() -> float:
    """User+system CPU seconds of this process's finished children (the fuzzer): unlike
    wall time, it moves little with the load of a shared machine."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _last_line(path: Path) -> dict[str, object]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    return json.loads(lines[-1]) if lines else {}


def _executed_units(log: Path) -> int:
    found = re.search(r"stat::number_of_executed_units: (\d+)", log.read_text(errors="replace"))
    return int(found.group(1)) if found else 0


def _crash_excerpt(log: Path) -> str:
    text = log.read_text(errors="replace")
    at = text.find("=== Uncaught Python exception: ===")
    if at < 0:
        at = text.find("ERROR: libFuzzer")
    return text[at : at + 3000] if at >= 0 else text[-3000:]


def mutate(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    """A few byte-level mutations (flip, set, insert, delete, duplicate, splice)."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(7)
        at = rng.randrange(len(buf) + 1)
        if op == 0 and buf:
            buf[at % len(buf)] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:
            buf[at % len(buf)] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))
        elif op == 2:
            buf[at:at] = rng.randbytes(rng.randint(1, 8))
        elif op == 3 and buf:
            del buf[at : at + rng.randint(1, 8)]
        elif op == 4 and buf:
            end = min(len(buf), at + rng.randint(1, 16))
            buf[at:at] = buf[at:end]
        elif op == 5:
            other = rng.choice(corpus)
            cut = rng.randrange(len(other) + 1)
            buf = buf[:at] + bytearray(other[cut:])
        else:
            buf = bytearray(rng.randbytes(rng.randint(0, 64))) + buf
    return bytes(buf[:MAX_LEN])


def random_inputs(target: Target, inputs: int, seed: int) -> Iterator[bytes]:
    rng = random.Random(seed)
    corpus = [s for s in target.seeds() if s] or [b"\x00"]
    yield from target.seeds()
    for _ in range(inputs - len(target.seeds())):
        yield mutate(rng, rng.choice(corpus), corpus)


def run_random(
    target: Target, inputs: int, workdir: Path, seed: int, max_time: int
) -> dict[str, object]:
    artifacts = workdir / "artifacts" / target.name
    artifacts.mkdir(parents=True, exist_ok=True)
    reached = done = 0
    crashes: list[str] = []
    errors: list[str] = []
    baseline = {"rss_kib": rss_kib(), "fds": open_fds()}
    started = time.monotonic()
    cpu_started = time.process_time()
    for data in random_inputs(target, inputs, seed):
        done += 1
        try:
            reached += target.run(data)
        except Exception:
            path = artifacts / f"crash-{done}"
            path.write_bytes(data)
            crashes.append(str(path))
            errors.append(traceback.format_exc(limit=-3))
        if done == 2000:
            baseline = {"rss_kib": rss_kib(), "fds": open_fds()}
        if max_time and time.monotonic() - started > max_time:
            break
    result: dict[str, object] = {
        "target": target.name,
        "engine": "random",
        "exit": 1 if crashes else 0,
        "inputs": done,
        "reached": reached,
        "seconds": round(time.monotonic() - started, 1),
        "cpu_seconds": round(time.process_time() - cpu_started, 1),
        "crashes": crashes[:20],
        "rss_kib_before": baseline["rss_kib"],
        "rss_kib_after": rss_kib(),
        "fds_before": baseline["fds"],
        "fds_after": open_fds(),
    }
    if errors:
        result["error"] = errors[0]
    return result


def summary(result: dict[str, object]) -> str:
    inputs = int(str(result["inputs"]))
    seconds = float(str(result["seconds"])) or 1e-9
    cpu = float(str(result.get("cpu_seconds", 0))) or 1e-9
    reached = int(str(result["reached"]))
    crashes = result["crashes"]
    assert isinstance(crashes, list)
    return (
        f"{result['target']:<17} {result['engine']:<8} inputs={inputs:>9} "
        f"rate={inputs / seconds:>8.0f}/s ({inputs / cpu:.0f}/CPU s) "
        f"reached={reached / max(inputs, 1):>6.1%} "
        f"crashes={len(crashes)} rss_kib={result['rss_kib_before']}->{result['rss_kib_after']} "
        f"fds={result['fds_before']}->{result['fds_after']}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--target", action="append", default=[], choices=sorted(TARGETS))
    parser.add_argument("--all", action="store_true", help="every target, one after another")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--inputs", type=int, default=1_000_000)
    parser.add_argument("--engine", choices=("atheris", "random"), default="atheris")
    parser.add_argument("--max-time", type=int, default=0, help="seconds per target (0: none)")
    parser.add_argument("--timeout", type=int, default=30, help="seconds per input (atheris)")
    parser.add_argument("--rss-limit-mb", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=1, help="random engine seed")
    parser.add_argument("--workdir", type=Path, help="corpus, artifacts, logs (default: temp)")
    parser.add_argument("--results", type=Path, help="append one JSON line per target here")
    args = parser.parse_args(argv)
    if args.list:
        for name, t in sorted(TARGETS.items()):
            print(f"{name:<17} {t.doc.splitlines()[0] if t.doc else ''}")
        return 0
    names = sorted(TARGETS) if args.all else args.target
    if not names:
        parser.error("give --target NAME (repeatable), --all or --list")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ztunnel-fuzz-"))
    workdir.mkdir(parents=True, exist_ok=True)
    failed = False
    for name in names:
        target = TARGETS[name]
        if args.engine == "atheris":
            result = run_atheris(
                target, args.inputs, workdir, args.timeout, args.rss_limit_mb, args.max_time
            )
        else:
            result = run_random(target, args.inputs, workdir, args.seed, args.max_time)
        print(summary(result), flush=True)
        if result["crashes"]:
            failed = True
            print(result.get("error", ""), flush=True)
        if args.results:
            with args.results.open("a") as f:
                f.write(json.dumps(result) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
