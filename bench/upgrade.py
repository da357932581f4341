"""Agent upgrade under load: how many new connections fail while one agent replaces another.

The issue's probe, as a script (needs root): in a scratch netns, the README's by-hand agent
(dedicated mode, SOCKS5 on) and an echo app; one long-lived connection through the agent;
clients opening new connections continuously (``--clients`` threads, each one connection
after the other: SOCKS5 → HBONE → app, one echo each).
Then a second agent starts on the same ports (SO_REUSEPORT), becomes ready, and the first
one gets SIGTERM: it must close its listeners at once (the new agent takes every new
connection), let the long-lived connection run until CONNECTION_TERMINATION_DEADLINE,
reset it there (never a clean FIN), and exit.

With ``--drain-only`` no second agent starts: the one agent gets SIGTERM under the same
load, and every new connection during its drain must be refused at once (ECONNREFUSED on
the SOCKS5 port, since the listeners are closed), never accepted into the kernel queue and
reset later; the figures then count refusals and the slowest failure.

Prints the figures (and ``--json`` writes them): new connections opened and failed before,
during and after the hand-over, how the long-lived connection ended, the old agent's exit
status and drain time.

    sudo .venv/bin/python bench/upgrade.py [--seconds 6] [--deadline 3] [--json out.json]
    sudo .venv/bin/python bench/upgrade.py --drain-only
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ztunnel.testing.netns_agent import (
    AgentProc,
    Scratch,
    http,
    scratch_netns,
    start_dedicated,
    wait_until,
)

APP = ("127.0.0.1", 8080)  # the localhost example's workload (HBONE) and its app port
SOCKS5 = ("127.0.0.1", 15080)
NEW_AGENT_PORTS = {  # the data ports are shared; the second agent's services move aside
    "ZTUNNEL_ADMIN_ADDR": "127.0.0.1:15100",
    "ZTUNNEL_STATS_ADDR": "127.0.0.1:15120",
    "ZTUNNEL_READINESS_ADDR": "127.0.0.1:15121",
}


@dataclass
class Attempt:
    started: float
    ok: bool
    error: str = ""
    took: float = 0.0


@dataclass
class Load:
    attempts: list[Attempt] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    pause_on_refusal: bool = False


def socks5_open(scratch: Scratch, host: str, port: int, timeout: float = 5.0) -> socket.socket:
    sock = scratch.ns.socket()
    try:
        sock.settimeout(timeout)
        sock.connect(SOCKS5)
        sock.sendall(b"\x05\x01\x00")
        if recv_exactly(sock, 2) != b"\x05\x00":
            raise ConnectionError("SOCKS5 method refused")
        sock.sendall(b"\x05\x01\x00\x01" + socket.inet_aton(host) + struct.pack("!H", port))
        reply = recv_exactly(sock, 10)
        if reply[1] != 0:
            raise ConnectionError(f"SOCKS5 reply {reply[1]}")
    except BaseException:
        sock.close()
        raise
    return sock


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def one_connection(scratch: Scratch, n: int) -> None:
    """Open, one echo (the app's "E" preamble, then a line), clean close."""
    with socks5_open(scratch, *APP) as sock:
        line = f"request {n}\n".encode()
        sock.sendall(b"E" + line)
        if recv_exactly(sock, len(line)) != line:
            raise ConnectionError("echo mismatch")
        sock.shutdown(socket.SHUT_WR)
        if sock.recv(1) != b"":
            raise ConnectionError("data after the echo")


def run_load(scratch: Scratch, load: Load, worker: int) -> None:
    n = worker * 1_000_000
    while not load.stop.is_set():
        started = time.monotonic()
        try:
            one_connection(scratch, n)
            load.attempts.append(Attempt(started, True, took=time.monotonic() - started))
        except OSError as exc:
            error = f"{type(exc).__name__}: {exc}"
            load.attempts.append(Attempt(started, False, error, time.monotonic() - started))
            if load.pause_on_refusal and isinstance(exc, ConnectionRefusedError):
                time.sleep(0.01)  # nothing listens any more: no busy loop of refusals
        n += 1


@dataclass
class LongLived:
    sock: socket.socket
    ended: str = ""
    at: float = 0.0


def watch_long_lived(long: LongLived) -> None:
    try:
        while long.sock.recv(65536):
            pass
        long.ended = "FIN (clean end: wrong for a connection the agent cut)"
    except ConnectionResetError:
        long.ended = "RST (reset: the cut is visible as one)"
    except OSError as exc:
        long.ended = f"{type(exc).__name__}: {exc}"
    long.at = time.monotonic()


def ready(scratch: Scratch, port: int) -> bool:
    try:
        return http(scratch.ns, "127.0.0.1", port, "/healthz/ready")[0] == 200
    except OSError:
        return False


def task_tree(scratch: Scratch) -> str:
    try:
        return http(scratch.ns, "127.0.0.1", 15000, "/debug/tasks", timeout=5)[1]
    except OSError as exc:
        return f"admin did not answer: {exc}"


def window(attempts: list[Attempt], start: float, end: float) -> tuple[int, int]:
    inside = [a for a in attempts if start <= a.started < end]
    return len(inside), sum(1 for a in inside if not a.ok)


def drain_failures(attempts: list[Attempt], start: float, end: float) -> dict[str, object]:
    """How the connections opened during a drain failed: refused at once, or otherwise."""
    failed = [a for a in attempts if start <= a.started < end and not a.ok]
    refused = [a for a in failed if a.error.startswith("ConnectionRefusedError")]
    return {
        "refused_at_once": len(refused),
        "failed_otherwise": len(failed) - len(refused),
        "slowest_failure_ms": round(max((a.took for a in failed), default=0.0) * 1000, 1),
    }


def measure(
    seconds: float, deadline: float, clients: int, workdir: Path, drain_only: bool = False
) -> dict[str, object]:
    with scratch_netns("ztup") as scratch:
        app = subprocess.Popen(
            ["ip", "netns", "exec", scratch.name, sys.executable,
             str(Path(__file__).with_name("common.py")), "serve", *APP[:1], str(APP[1])],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        # One CA for both (as one cluster's CA): FAKE_CA would give each agent its own root.
        ca_dir = workdir / "ca"
        subprocess.run([sys.executable, "-m", "ztunnel.cli", "ca", "init", str(ca_dir)], check=True)
        env = {
            "UNSTABLE_ENABLE_SOCKS5": "true",
            "CONNECTION_TERMINATION_DEADLINE": f"{deadline}s",
            "FAKE_CA": "false",
            "CA_DIR": str(ca_dir),
        }
        old = start_dedicated(scratch, workdir / "old.log", env)
        new: AgentProc | None = None
        try:
            assert app.stdout is not None
            app.stdout.readline()  # "listening ..."
            wait_until(lambda: ready(scratch, 15021), "the old agent ready", timeout=30)
            long = LongLived(socks5_open(scratch, *APP))
            long.sock.sendall(b"Ehello\n")
            recv_exactly(long.sock, 6)
            long.sock.settimeout(None)
            threading.Thread(target=watch_long_lived, args=(long,), daemon=True).start()
            load = Load(pause_on_refusal=drain_only)
            loaders = [
                threading.Thread(target=run_load, args=(scratch, load, i), daemon=True)
                for i in range(clients)
            ]
            t0 = time.monotonic()
            for loader in loaders:
                loader.start()
            time.sleep(seconds / 3)
            if not drain_only:
                new = start_dedicated(scratch, workdir / "new.log", {**env, **NEW_AGENT_PORTS})
                wait_until(lambda: ready(scratch, 15121), "the new agent ready", timeout=30)
            t_new_ready = time.monotonic()
            time.sleep(0.5)
            t_term = time.monotonic()
            old.proc.send_signal(signal.SIGTERM)
            try:
                exit_code: int | None = old.proc.wait(deadline + 30)
            except subprocess.TimeoutExpired:  # a drain that never ends: keep what it was doing
                exit_code = None
                (workdir / "old-tasks.txt").write_text(task_tree(scratch))
            t_exit = time.monotonic()
            time.sleep(seconds / 3)
            load.stop.set()
            for loader in loaders:
                loader.join(30)
            t_end = time.monotonic()
        finally:
            old.stop()
            if new is not None:
                new.stop()
            app.terminate()
            app.wait(10)
    attempts = load.attempts
    failures = [a for a in attempts if not a.ok]
    reasons: dict[str, int] = {}
    for a in failures:
        reasons[a.error] = reasons.get(a.error, 0) + 1
    return {
        "mode": "drain only (no second agent)" if drain_only else "upgrade",
        "connections": len(attempts),
        "failed": len(failures),
        "before_new_agent": window(attempts, t0, t_new_ready),
        "both_running": window(attempts, t_new_ready, t_term),
        "old_draining": window(attempts, t_term, t_exit),
        "after_old_exit": window(attempts, t_exit, t_end),
        "failure_reasons": reasons,
        "during_drain": drain_failures(attempts, t_term, t_exit),
        "long_lived_end": long.ended,
        "long_lived_cut_after_s": round(long.at - t_term, 2) if long.at else None,
        "deadline_s": deadline,
        "clients": clients,
        "old_agent_exit_code": exit_code,
        "old_agent_drain_s": round(t_exit - t_term, 2),
        "rate_per_s": round(len(attempts) / (t_end - t0), 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="load before + after")
    parser.add_argument("--deadline", type=float, default=3.0, help="old agent's drain deadline")
    parser.add_argument("--clients", type=int, default=8, help="concurrent client threads")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--logs", type=Path, help="keep the agents' logs here (run-N/)")
    parser.add_argument(
        "--drain-only", action="store_true", help="no second agent: SIGTERM alone under load"
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    results = []
    for run in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(tmp) if args.logs is None else args.logs / f"run-{run + 1}"
            workdir.mkdir(parents=True, exist_ok=True)
            result = measure(args.seconds, args.deadline, args.clients, workdir, args.drain_only)
        results.append(result)
        print(f"run {run + 1}: {json.dumps(result)}", flush=True)
    total = sum(int(r["connections"]) for r in results)  # type: ignore[call-overload]
    failed = sum(int(r["failed"]) for r in results)  # type: ignore[call-overload]
    if args.drain_only:  # after the exit nothing listens: only the drain's answers matter
        print(f"drain: SIGTERM with no second agent, {args.runs} run(s)")
    else:
        print(f"upgrade: {failed} of {total} new connections failed over {args.runs} run(s)")
    for n, r in enumerate(results, 1):
        opened, lost = r["old_draining"]  # type: ignore[misc]
        print(f"  run {n}: during the drain {lost} of {opened} failed: {r['during_drain']}")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
