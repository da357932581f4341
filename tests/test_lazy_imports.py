"""An agent loads the code of a mode (Kubernetes client, Istio CA and xDS over gRPC,
istio-cni, eBPF, the admin UI) only when its configuration selects it: a dedicated-mode
agent with a local config and a file CA must not pay their memory and start-up time
(docs/benchmarks.md, bench/startup.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ztunnel.testing.loopback import random_base

ROOT = Path(__file__).resolve().parent.parent
OPTIONAL = (
    "lightkube",
    "httpx2",
    "google.protobuf",
    "bcc",
    "ztunnel.grpc.engine",
    "ztunnel.identity.istio_ca",
    "ztunnel.sources.xds",
    "ztunnel.sources.zds",
    "ztunnel.sources.kubernetes.client",
    "ztunnel.redirect.iptables",
    "ztunnel.redirect.ebpf",
    "ztunnel.enroll.controller",
    "ztunnel.admin.ui",
)

# What `ztunnel run` does (cli.run_command), up to "agent ready", then which of the
# optional modules are loaded; then the same after touching the lazy Kubernetes names,
# which shows the probe sees a module once something imports it.
CHILD = """
import json, os, sys
import trio
import ztunnel.cli
from ztunnel.agent import Agent
from ztunnel.config import Config

optional = json.loads(sys.argv[1])

async def main():
    agent = Agent.from_config(Config.from_sources(os.environ), env=os.environ)
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        agent.config_dump()
        nursery.cancel_scope.cancel()

trio.run(main)
ready = sorted(m for m in optional if m in sys.modules)
from ztunnel.sources.kubernetes import KubernetesPodSource  # noqa: F401
after = sorted(m for m in optional if m in sys.modules)
print(json.dumps({"ready": ready, "after_kubernetes": after}))
"""


def _probe(extra: dict[str, str]) -> dict[str, list[str]]:
    ip = f"{random_base()}.1"
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("KUBE", "PROXY_", "XDS_", "CA_", "LOCAL_XDS", "INPOD"))
    }
    env.update(
        {
            "PROXY_MODE": "dedicated",
            "PROXY_WORKLOAD_INFO": "default/local/default",
            "LOCAL_XDS_PATH": str(ROOT / "examples" / "localhost.yaml"),
            "PACKET_MARK": "0",
            "UNSTABLE_ENABLE_SOCKS5": "true",
        }
    )
    for name in ("OUTBOUND", "INBOUND", "INBOUND_PLAINTEXT", "SOCKS5", "ADMIN", "STATS"):
        env[f"ZTUNNEL_{name}_ADDR"] = f"{ip}:0"
    env["ZTUNNEL_READINESS_ADDR"] = f"{ip}:0"
    env.update(extra)
    out = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(OPTIONAL)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result: dict[str, list[str]] = json.loads(out.stdout.splitlines()[-1])  # after the logs
    return result


def test_a_dedicated_agent_with_a_file_ca_loads_no_optional_mode(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    init = subprocess.run(
        [sys.executable, "-m", "ztunnel.cli", "ca", "init", str(ca)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert init.returncode == 0, init.stderr
    result = _probe({"CA_DIR": str(ca)})
    assert result["ready"] == []
    # The probe sees a module once something loads it (the test can fail).
    assert {"httpx2", "ztunnel.sources.kubernetes.client"} <= set(result["after_kubernetes"])


def test_fake_ca_agent_loads_no_optional_mode_either() -> None:
    assert _probe({"FAKE_CA": "true"})["ready"] == []
