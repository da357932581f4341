"""``ztunnel ca serve`` as a process (through the CLI): an agent-side CA client gets
certificates for pods of its node, is refused others (counted on its /metrics), and the
placement file is followed as it changes."""

from __future__ import annotations

import datetime
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from ztunnel.identity.ca import ROOT_CERT, init_ca_dir
from ztunnel.identity.ca_serve import StaticPlacement
from ztunnel.identity.errors import CAError
from ztunnel.identity.istio_ca import IstioCAClient, IstioCAConfig
from ztunnel.identity.manager import SecretManager
from ztunnel.model.identity import Identity

ECHO = Identity("cluster.local", "default", "echo")
SLEEP = Identity("cluster.local", "default", "sleep")
ZTUNNEL = "spiffe://cluster.local/ns/istio-system/sa/ztunnel"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def ca_process(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    init_ca_dir(tmp_path / "ca")
    (tmp_path / "tokens.yaml").write_text(
        f"tokens:\n  - {{token: t1, node: node1, identity: '{ZTUNNEL}'}}\n"
    )
    placement = tmp_path / "placement.yaml"
    placement.write_text(f"nodes:\n  node1: ['{ECHO}']\n  node2: ['{SLEEP}']\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ztunnel.cli", "ca", "serve", "--ca-dir", str(tmp_path / "ca"),
         "--tokens", str(tmp_path / "tokens.yaml"), "--placement", str(placement),
         "--port", "0", "--host", "127.0.0.1", "--ip", "127.0.0.1",
         "--metrics-port", "0", "--metrics-host", "127.0.0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"listening on \('127\.0\.0\.1', (\d+)\)", line)
        assert match, line + (proc.stderr.read() if proc.stderr else "")
        metrics = re.search(r"metrics on 127\.0\.0\.1:(\d+)", proc.stdout.readline())
        assert metrics
        (tmp_path / "metrics-port").write_text(metrics.group(1))
        yield int(match.group(1)), tmp_path
    finally:
        proc.kill()
        proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


async def test_ca_serve_process(ca_process: tuple[int, Path]) -> None:
    port, tmp = ca_process
    (tmp / "token").write_text("t1")
    client = IstioCAClient(
        IstioCAConfig(
            address=f"https://127.0.0.1:{port}",
            root_cert=tmp / "ca" / ROOT_CERT,
            token_path=tmp / "token",
        )
    )
    manager = SecretManager(client, ttl=datetime.timedelta(seconds=60))
    assert (await manager.fetch(ECHO)).identity == ECHO
    with pytest.raises(CAError, match="PERMISSION_DENIED"):
        await manager.fetch(SLEEP)
    # the refusal is counted on the service's /metrics
    metrics = await trio.to_thread.run_sync(_metrics, int((tmp / "metrics-port").read_text()))
    assert 'ztunnel_ca_refusals_total{reason="not_on_node"} 1.0' in metrics
    assert "ztunnel_ca_certificates_issued_total 1.0" in metrics
    # sleep is rescheduled onto node1
    (tmp / "placement.yaml").write_text(f"nodes:\n  node1: ['{ECHO}', '{SLEEP}']\n")
    assert (await manager.fetch(SLEEP)).identity == SLEEP


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text: str = resp.read().decode()
    return text


def test_placement_file_fails_closed(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(f"nodes:\n  node1: ['{ECHO}']\n")
    placement = StaticPlacement(path)
    assert ECHO in placement("node1")
    path.write_text("nodes: [broken")
    assert placement("node1") == frozenset()
    path.unlink()
    assert placement("node1") == frozenset()


def test_bad_ca_dir_is_a_config_error(tmp_path: Path) -> None:
    from ztunnel.cli import main

    code = main(["ca", "serve", "--ca-dir", str(tmp_path), "--tokens", "x", "--placement", "y"])
    assert code == 2


def test_ca_help_lists_serve() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ztunnel.cli", "ca", "--help"],
        capture_output=True, text=True, cwd=ROOT, check=True,
    ).stdout  # fmt: skip
    assert "serve" in out and "init" in out
    usage = subprocess.run(
        [sys.executable, "-m", "ztunnel.cli", "ca", "serve", "--help"],
        capture_output=True, text=True, cwd=ROOT, check=True,
    ).stdout  # fmt: skip
    assert "--placement" in usage and "--metrics-port" in usage
