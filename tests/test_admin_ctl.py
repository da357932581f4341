"""``ztunnel ctl`` against a real admin server with a fake config_dump provider."""

from __future__ import annotations

import io
import json
import socket
from collections.abc import AsyncIterator

import pytest
import trio
import yaml
from test_telemetry_metrics import ECHO, outbound

from ztunnel.admin import ctl
from ztunnel.admin.server import serve_admin
from ztunnel.telemetry import logging as zlog
from ztunnel.telemetry.connections import ConnectionTracker
from ztunnel.telemetry.metrics import Metrics

DUMP: dict[str, object] = {
    "workloads": [
        {
            "uid": "c//Pod/default/shell",
            "name": "shell",
            "namespace": "default",
            "workloadIps": ["10.244.0.24"],
            "node": "node1",
            "protocol": "HBONE",
            "serviceAccount": "sleep",
            "trustDomain": "cluster.local",
        },
        {
            "uid": "c//Pod/echo/echo-1",
            "name": "echo-1",
            "namespace": "echo",
            "workloadIps": ["10.244.1.7"],
            "node": "node2-long-name",
        },
    ],
    "services": [
        {
            "name": "echo",
            "namespace": "echo",
            "hostname": "echo.echo.svc.cluster.local",
            "vips": ["/10.96.0.10", "remote/10.96.0.11"],
            "endpoints": {
                "a": {"workloadUid": "a", "status": "Healthy"},
                "b": {"workloadUid": "b", "status": "Unhealthy"},
            },
        }
    ],
    "policies": [
        {
            "name": "deny-9999",
            "namespace": "default",
            "scope": "Namespace",
            "action": "Allow",
            "rules": [[[{"notDestinationPorts": [9999]}]]],
            "dryRun": False,
        }
    ],
    "certificates": [
        {
            "identity": "spiffe://cluster.local/ns/default/sa/sleep",
            "state": "Available",
            "certChain": [
                {"pem": "", "serialNumber": "1a2b", "expirationTime": "2026-12-01T00:00:00Z"}
            ],
            "rootCerts": [],
        }
    ],
}

# What a shared-mode agent adds: per pod the redirection installed, and the agent-wide part.
EBPF_POD = {
    "mode": "ebpf",
    "installed": True,
    "programs": [
        {"device": "lo", "direction": "ingress", "id": 901, "name": "zt_loopback"},
        {"device": "eth0", "direction": "ingress", "id": 899, "name": "zt_ingress"},
        {"device": "eth0", "direction": "egress", "id": 900, "name": "zt_egress"},
    ],
    "sk_lookup": {"link_id": 647, "prog_id": 902, "attached": True, "current": True},
    "build": "faa4a9d54502",
}
DUMP["workloadState"] = {
    "c//Pod/default/shell": {
        "state": "Up",
        "info": {"name": "shell", "namespace": "default", "serviceAccount": "sleep"},
        "redirection": EBPF_POD,
    },
    "c//Pod/echo/echo-1": {
        "state": "Up",
        "info": {"name": "echo-1", "namespace": "echo", "serviceAccount": "default"},
        "redirection": {"mode": "ebpf", "error": "tc: not found"},
    },
}
DUMP["redirection"] = {
    "mode": "ebpf",
    "pin_dir": "/sys/fs/bpf/ztunnel",
    "build": "faa4a9d54502",
    "maps": [
        {"name": "zt_config", "type": "array", "max_entries": 1},
        {"name": "zt_handoff", "type": "sockhash", "max_entries": 1024},
    ],
    "counters": {"inbound_captured": 3, "outbound_captured": 5},
}


@pytest.fixture
async def admin_url() -> AsyncIterator[str]:
    tracker = ConnectionTracker(Metrics())
    conn = tracker.open(outbound(proxy_uid=ECHO.uid))
    conn.add_sent(67)
    conn.add_received(490)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(
            lambda task_status: serve_admin(
                ("127.0.0.1", 0),
                dump_provider=lambda: DUMP,
                tracker=tracker,
                task_status=task_status,
            )
        )
        yield f"http://127.0.0.1:{port}"
        nursery.cancel_scope.cancel()


async def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with trio.fail_after(10):
        code = await trio.to_thread.run_sync(lambda: ctl.main(list(argv), out=out, err=err))
    return code, out.getvalue(), err.getvalue()


async def test_workloads_table(admin_url: str) -> None:
    code, out, _ = await run("--admin", admin_url, "workloads")
    assert code == 0
    assert out.splitlines() == [
        "NAMESPACE   NAME     ADDRESS       NODE              PROTOCOL   IDENTITY",
        "default     shell    10.244.0.24   node1             HBONE      spiffe://cluster.local/ns/default/sa/sleep",
        "echo        echo-1   10.244.1.7    node2-long-name   TCP        spiffe://cluster.local/ns/echo/sa/default",
    ]


async def test_services_policies_certificates_tables(admin_url: str) -> None:
    _, out, _ = await run("services", "--admin", admin_url)
    assert out.splitlines()[1].split() == ["echo", "echo", "10.96.0.10,remote/10.96.0.11", "1/2"]
    _, out, _ = await run("policies", "--admin", admin_url)
    assert out.splitlines()[0].split() == ["NAMESPACE", "NAME", "SCOPE", "ACTION", "RULES"]
    assert out.splitlines()[1].split() == ["default", "deny-9999", "Namespace", "Allow", "1"]
    _, out, _ = await run("certificates", "--admin", admin_url)
    assert out.splitlines()[1].split() == [
        "spiffe://cluster.local/ns/default/sa/sleep",
        "Available",
        "1a2b",
        "2026-12-01T00:00:00Z",
    ]


async def test_connections_table_comes_from_tracker(admin_url: str) -> None:
    _, out, _ = await run("--admin", admin_url, "connections")
    header, row = out.splitlines()
    assert header.split() == [
        "DIRECTION",
        "SRC",
        "DST",
        "SRC-IDENTITY",
        "DST-IDENTITY",
        "BYTES-SENT",
        "BYTES-RECV",
    ]
    assert row.split() == [
        "outbound",
        "10.244.0.24:46238",
        "10.244.1.7:8080",
        "spiffe://cluster.local/ns/default/sa/sleep",
        "spiffe://cluster.local/ns/echo/sa/echo",
        "67",
        "490",
    ]


async def test_json_and_yaml_output(admin_url: str) -> None:
    code, out, _ = await run("--admin", admin_url, "workloads", "-o", "json")
    assert code == 0 and json.loads(out) == DUMP["workloads"]
    _, out, _ = await run("-o", "yaml", "--admin", admin_url, "policies")
    assert yaml.safe_load(out) == DUMP["policies"]


async def test_redirection_shows_each_pods_programs_and_the_maps(admin_url: str) -> None:
    code, out, _ = await run("--admin", admin_url, "redirection")
    assert code == 0
    header, shell, echo, summary = out.splitlines()
    assert header.split() == ["NAMESPACE", "NAME", "MODE", "INSTALLED", "DETAIL"]
    assert shell.split() == [
        "default",
        "shell",
        "ebpf",
        "True",
        "lo/ingress=zt_loopback#901",
        "eth0/ingress=zt_ingress#899",
        "eth0/egress=zt_egress#900",
        "sk_lookup=link#647",
    ]
    assert echo.split()[:3] == ["echo", "echo-1", "ebpf"] and "error: tc: not found" in echo
    assert summary == (
        "(mode ebpf; build faa4a9d54502 pinned in /sys/fs/bpf/ztunnel; "
        "maps: zt_config array 1 entries, zt_handoff sockhash 1024 entries; "
        "counters: inbound_captured=3, outbound_captured=5)"
    )
    _, out, _ = await run("--admin", admin_url, "redirection", "-o", "json")
    data = json.loads(out)
    assert data["redirection"] == DUMP["redirection"]
    assert {p["name"]: p["redirection"] for p in data["pods"]}["shell"] == EBPF_POD


async def test_log_subcommand(admin_url: str) -> None:
    zlog.configure_logging("info", "plain", io.StringIO())
    try:
        code, out, _ = await run("--admin", admin_url, "log")
        assert (code, out) == (0, "current log level is info\n")
        code, out, _ = await run(
            "--admin", admin_url, "log", "--level", "ztunnel::proxy=debug,info"
        )
        assert (code, out) == (0, "current log level is ztunnel::proxy=debug,info\n")
        code, _, err = await run("--admin", admin_url, "log", "--level", "bogus")
        assert code == 1 and "HTTP 400" in err
        _, out, _ = await run("--admin", admin_url, "log", "--reset")
        assert out == "current log level is info\n"
    finally:
        zlog.unconfigure_logging()


async def test_unreachable_admin_is_one_line_exit_2() -> None:
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, out, err = await run("--admin", f"http://127.0.0.1:{port}", "workloads")
    assert (code, out) == (2, "")
    assert err.startswith("error: cannot reach ztunnel admin at") and err.count("\n") == 1
