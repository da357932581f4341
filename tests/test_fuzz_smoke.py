"""The fuzz harnesses (fuzz/) stay runnable: a short coverage-guided run of every target
in CI, the seeds of each replayed in-process, and the structured HTTP/2 inputs still
reaching a CONNECT answer most of the time (the issue's random inputs reached ~1%).
The 1M-input runs are `fuzz/run.py --all`; figures in docs/reliability.md."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from fuzz.targets import TARGETS

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_seeds_run_clean(name: str) -> None:
    target = TARGETS[name]
    seeds = target.seeds()
    assert seeds
    reached = [target.run(seed) for seed in seeds]
    assert any(reached), f"no seed of {name} reaches the target's deep end"


@pytest.mark.parametrize("name", ["hbone-frames", "hbone-connection", "waypoint-h2", "grpc-engine"])
def test_structured_inputs_reach_deep(name: str) -> None:
    """Random bytes through the structured generator: most become answered requests."""
    rng = random.Random(14)
    n = 200
    reached = sum(TARGETS[name].run(rng.randbytes(rng.randint(0, 300))) for _ in range(n))
    assert reached / n >= 0.2, f"{name}: {reached}/{n} reached"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TARGETS))
def test_short_atheris_run(name: str, tmp_path: Path) -> None:
    pytest.importorskip("atheris", reason="atheris (libFuzzer) is not installed")
    results = tmp_path / "results.jsonl"
    proc = subprocess.run(
        [sys.executable, "fuzz/run.py", "--target", name, "--inputs", "300", "--max-time", "20",
         "--workdir", str(tmp_path), "--results", str(results)],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [result] = [json.loads(line) for line in results.read_text().splitlines()]
    assert result["crashes"] == [] and result["inputs"] > 0
    assert result["fds_after"] == result["fds_before"]


def test_connection_target_sees_driver_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug the driver's catch-all only logs (here the stream handler raising) is a
    finding: the driver logs with structlog, which an unconfigured process prints and
    never hands to stdlib logging, so the target must capture structlog's entries."""
    import fuzz.targets as fuzz_targets

    async def broken(request: object, stream: object) -> None:
        raise ValueError("a bug in the handler")

    monkeypatch.setattr(fuzz_targets, "_echo", broken)
    with pytest.raises(fuzz_targets.Finding, match="stream handler failed"):
        TARGETS["hbone-connection"].run(bytes(64))
    monkeypatch.undo()
    assert TARGETS["hbone-connection"].run(bytes(64))  # the same input, no bug: no finding


def test_instrumented_modules_are_not_imported_early() -> None:
    """atheris instruments only modules first imported inside its block (after
    fuzz.targets is imported): a listed module fuzz.targets imports itself would get no
    coverage feedback, silently (as yaml, h11 and hpack once did)."""
    code = (
        "import json; from fuzz.targets import TARGETS, imported;"
        "print(json.dumps({n: imported(t.instrument) for n, t in TARGETS.items()}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout) == {name: [] for name in TARGETS}


def test_sniff_target_flags_a_decision_that_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The waypoint acts on the first decision; a sniffer that decides HTTP/1.1 on the
    request line and TCP once more bytes arrive is a finding."""
    import fuzz.targets as fuzz_targets
    import ztunnel.waypoint.sniff as sniff_module
    from ztunnel.waypoint.messages import Protocol

    real = sniff_module.sniff

    def unstable(data: bytes, *, eof: bool = False) -> Protocol | None:
        return Protocol.TCP if data.count(b"\n") > 1 else real(data, eof=eof)

    request = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    assert TARGETS["waypoint-sniff"].run(request)
    monkeypatch.setattr(sniff_module, "sniff", unstable)
    with pytest.raises(fuzz_targets.Finding, match="sniff decided"):
        TARGETS["waypoint-sniff"].run(request)


@pytest.mark.parametrize("path", sorted((ROOT / "fuzz" / "findings").glob("*.bin")), ids=str)
def test_findings_replay_clean(path: Path) -> None:
    """Every saved finding (named after its target) runs clean on the fixed code."""
    name = max((n for n in TARGETS if path.name.startswith(n + "-")), key=len)
    TARGETS[name].run(path.read_bytes())
