"""`ztunnel run` with worker processes: none outlives the agent, however it ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ztunnel.testing.loopback import agent_env, mesh_yaml, random_base

ROOT = Path(__file__).resolve().parent.parent


def _alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _records(log: Path) -> list[dict[str, object]]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _start(tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path, list[int]]:
    base = random_base()
    (tmp_path / "mesh.yaml").write_text(mesh_yaml(base))
    extra = {
        "LOCAL_XDS_PATH": str(tmp_path / "mesh.yaml"),
        "FAKE_CA": "true",
        "LOG_FORMAT": "json",
        "ZTUNNEL_WORKER_THREADS": "2",
    }
    env = {**os.environ, **agent_env(f"{base}.2", "default/server/server", extra=extra)}
    log = tmp_path / "agent.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ztunnel.cli", "run"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        records = _records(log)
        ready = [r for r in records if r.get("message") == "workers ready"]
        if ready and any(r.get("message") == "agent ready" for r in records):
            pids = json.loads(str(ready[0]["pids"]))
            return proc, log, [int(p) for p in pids]
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"agent not ready:\n{log.read_text()[-3000:]}")


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill-9"])
def test_no_worker_outlives_the_agent(tmp_path: Path, how: signal.Signals) -> None:
    proc, log, pids = _start(tmp_path)
    try:
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        # Workers share the agent's process group (a signal to the group reaches all).
        assert {os.getpgid(p) for p in pids} == {os.getpgid(proc.pid)}
        proc.send_signal(how)
        proc.wait(timeout=20)
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(p) for p in pids), log.read_text()[-3000:]
        if how == signal.SIGTERM:
            assert proc.returncode == 0
            assert "Traceback" not in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
