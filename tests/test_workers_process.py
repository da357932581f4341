"""`ztunnel run` with worker processes: none outlives the agent, however it ends."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from ztunnel.testing.loopback import APP_PORT, agent_env, mesh_yaml, random_base

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


def _start(
    tmp_path: Path,
    who: str = "server",
    base: str | None = None,
    extra: dict[str, str] | None = None,
    *,
    wait: bool = True,
) -> tuple[subprocess.Popen[bytes], Path, list[int]]:
    """A dedicated-mode ``ztunnel run`` (the loopback mesh's client or server workload);
    ``wait``: until it and its workers said they are ready (their pids)."""
    base = base or random_base()
    (tmp_path / "mesh.yaml").write_text(mesh_yaml(base))
    env_extra = {
        "LOCAL_XDS_PATH": str(tmp_path / "mesh.yaml"),
        "LOG_FORMAT": "json",
        "ZTUNNEL_WORKER_THREADS": "2",
        **(extra or {"FAKE_CA": "true"}),
    }
    ip = f"{base}.1" if who == "client" else f"{base}.2"
    env = {**os.environ, **agent_env(ip, f"default/{who}/{who}", extra=env_extra)}
    log = tmp_path / f"agent-{who}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ztunnel.cli", "run"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    if not wait:
        return proc, log, []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        records = _records(log)
        ready = [r for r in records if r.get("message") == "workers ready"]
        workers = env_extra["ZTUNNEL_WORKER_THREADS"] != "1"
        if (ready or not workers) and any(r.get("message") == "agent ready" for r in records):
            pids = json.loads(str(ready[0]["pids"])) if ready else []
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


def _admin(log: Path) -> str:
    (ready,) = [r for r in _records(log) if r.get("message") == "agent ready"]
    return str(ready["admin"])


def test_a_log_level_set_through_admin_reaches_the_workers(tmp_path: Path) -> None:
    """POST /logging?level=... on the control process changes what the workers log: their
    pools' debug line for an idle HBONE connection appears only after the change."""
    base = random_base()
    subprocess.run(
        [sys.executable, "-m", "ztunnel.cli", "ca", "init", str(tmp_path / "ca")], check=True
    )
    common = {"CA_DIR": str(tmp_path / "ca"), "POOL_UNUSED_RELEASE_TIMEOUT": "300ms"}
    client_dir, server_dir = tmp_path / "a", tmp_path / "b"
    client_dir.mkdir()
    server_dir.mkdir()
    server, _, _ = _start(server_dir, "server", base, {**common, "ZTUNNEL_WORKER_THREADS": "1"})
    client, log, _ = _start(client_dir, "client", base, {**common, "RUST_LOG": "info"})
    try:
        app = socket.create_server((f"{base}.2", APP_PORT))

        def one_connection() -> None:
            with socks5_connect_blocking((f"{base}.1", 15080), (f"{base}.2", APP_PORT)) as s:
                conn, _ = app.accept()
                with conn:
                    s.sendall(b"x")
                    assert conn.recv(1) == b"x"

        def idle_closed() -> int:
            return sum(r.get("message") == "closing idle connection" for r in _records(log))

        one_connection()
        time.sleep(1.0)
        assert idle_closed() == 0  # at info, the workers say nothing
        request = urllib.request.Request(f"http://{_admin(log)}/logging?level=debug", method="POST")
        with urllib.request.urlopen(request, timeout=5) as resp:
            assert b"debug" in resp.read()
        one_connection()
        deadline = time.monotonic() + 10
        while idle_closed() == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert idle_closed() >= 1, log.read_text()[-3000:]
        app.close()
    finally:
        for proc in (client, server):
            proc.terminate()
            proc.wait(timeout=20)


def socks5_connect_blocking(proxy: tuple[str, int], dst: tuple[str, int]) -> socket.socket:
    sock = socket.create_connection(proxy, timeout=10)
    sock.sendall(b"\x05\x01\x00")
    assert sock.recv(2) == b"\x05\x00"
    sock.sendall(b"\x05\x01\x00\x01" + socket.inet_aton(dst[0]) + dst[1].to_bytes(2, "big"))
    reply = sock.recv(10)
    assert reply[1] == 0, reply
    return sock


def _probe(url: str) -> tuple[int, str] | None:
    """(status, body) of a GET, or None when nothing listens yet."""
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except urllib.error.URLError:
        return None


def test_readiness_answers_while_the_workers_start(tmp_path: Path) -> None:
    """Readiness is served before the worker processes are up (each imports the agent
    anew, seconds on a busy node): a probe meanwhile gets 503 naming the worker it waits
    for, not a refused connection, then 200."""
    base = random_base()
    url = f"http://{base}.2:15021/healthz/ready"
    extra = {"FAKE_CA": "true", "ZTUNNEL_READINESS_ADDR": f"{base}.2:15021"}
    proc, log, _ = _start(tmp_path, "server", base, extra, wait=False)
    try:
        answers: list[tuple[int, str]] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            answer = _probe(url)
            if answer is not None:
                answers.append(answer)
                if answer[0] == 200:
                    break
            time.sleep(0.01)
        assert answers and answers[-1][0] == 200, log.read_text()[-3000:]
        waiting = [body for status, body in answers if status == 503]
        assert any("worker 0: starting" in body for body in waiting), answers[:3]
    finally:
        proc.terminate()
        proc.wait(timeout=20)
