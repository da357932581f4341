"""Agent processes in a scratch network namespace (reliability/security tests, bench/upgrade.py).

``scratch_netns`` creates ``<prefix><random>`` with lo up and one veth pair inside it whose
ends carry the given addresses, so the netns has non-loopback local addresses like a node;
it is always deleted. ``start_dedicated`` runs ``ztunnel run`` (dedicated mode, by default
the README's by-hand setup: ztunnel's examples/localhost.yaml and an ephemeral CA) inside it
with ``ip netns exec``, its JSON log in a file; ``http`` and ``connect`` talk to ports inside
the netns from this process (a socket created there). Needs root.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from ztunnel.redirect.netns import NetNamespace, create_named, delete_named
from ztunnel.testing import http as testing_http
from ztunnel.testing import process
from ztunnel.testing.process import LoggedProcess

PROJECT_ROOT = Path(process.PROJECT_ROOT)
LOCALHOST_EXAMPLE = PROJECT_ROOT / "examples" / "localhost.yaml"


@dataclass
class Scratch:
    name: str
    ns: NetNamespace
    addresses: tuple[str, ...]  # without prefix length


@contextlib.contextmanager
def scratch_netns(
    prefix: str = "ztrd", addresses: tuple[str, ...] = ("10.77.0.1/24", "10.77.0.2/24")
) -> Iterator[Scratch]:
    """A netns with lo and a veth pair (``v0`` gets the first address, ``v1`` the rest)."""
    name = f"{prefix}{random.randrange(16**6):06x}"
    ns = create_named(name)
    try:
        lines = ["link add v0 type veth peer name v1", "link set v0 up", "link set v1 up"]
        for i, cidr in enumerate(addresses):
            lines.append(f"addr add {cidr} dev {'v0' if i == 0 else 'v1'}")
        ns.run(["ip", "-batch", "-"], input="\n".join(lines) + "\n")
        yield Scratch(name, ns, tuple(a.split("/")[0] for a in addresses))
    finally:
        ns.close()
        delete_named(name)


@dataclass
class AgentProc(LoggedProcess):
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def fds(self) -> int:
        try:
            return len(os.listdir(f"/proc/{self.proc.pid}/fd"))
        except OSError:
            return 0

    def records(self) -> list[dict[str, Any]]:
        return self.log_lines()

    def log_tail(self, n: int = 20) -> str:
        return super().log_tail(n)

    def wait_logged(self, message: str, timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for record in self.records():
                if record.get("message") == message:
                    return record
            if not self.alive:
                break
            time.sleep(0.05)
        raise RuntimeError(f"no {message!r} in the agent's log:\n{self.log_tail()}")


def dedicated_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The README's by-hand agent: dedicated mode, examples/localhost.yaml, FAKE_CA."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ZTUNNEL_", "CA_", "XDS_", "PROXY_", "LOCAL_XDS"))
    }
    env.update(
        PROXY_MODE="dedicated",
        PROXY_WORKLOAD_INFO="default/local/default",
        LOCAL_XDS_PATH=str(LOCALHOST_EXAMPLE),
        FAKE_CA="true",
        LOG_FORMAT="json",
        PYTHONUNBUFFERED="1",
        # One process: its tests read metrics right after a refusal and count the agent's
        # fds; with worker processes both live partly in the workers (and the books lag by
        # up to workers/telemetry.py's FLUSH_INTERVAL). Callers may ask for workers.
        ZTUNNEL_WORKER_THREADS="1",
        PYTHONPATH=process.project_pythonpath(env),
    )
    env.update(extra or {})
    return env


def start_dedicated(
    scratch: Scratch, log_path: Path, extra_env: Mapping[str, str] | None = None
) -> AgentProc:
    argv = ["ip", "netns", "exec", scratch.name, sys.executable, "-m", "ztunnel.cli", "run"]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dedicated_env(extra_env),
        )
    return AgentProc(proc, log_path)


def connect(
    ns: NetNamespace,
    host: str,
    port: int,
    *,
    source: str | None = None,
    timeout: float = 2.0,
) -> socket.socket:
    """A TCP connection from inside ``ns`` (bound to ``source`` if given)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = ns.socket(family)
    try:
        sock.settimeout(timeout)
        if source is not None:
            sock.bind((source, 0))
        sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def http(
    ns: NetNamespace,
    host: str,
    port: int,
    path: str,
    *,
    method: str = "GET",
    timeout: float = 2.0,
    headers: Mapping[str, str] | None = None,
) -> tuple[int, str]:
    """A tiny HTTP/1.1 request to a port inside ``ns``: (status, body)."""
    with connect(ns, host, port, timeout=timeout) as sock:
        sock.sendall(testing_http.request(path, host, method=method, headers=headers))
        status, body = testing_http.read_response(sock)
    return status, body.decode(errors="replace")


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def wait_until(cond: Any, what: str, timeout: float = 10.0, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(interval)
