"""End to end in the simulated cluster: real agent processes (one per node netns), real pods.

Each test gets its own cluster (unique prefix) and its own agents, always torn down, and
runs once per redirect mode (iptables, eBPF): the outcomes must be the same.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster_mesh import APPS, MODES, Mesh, cluster_mesh, mode_param, send, until
from pod_capture import assert_captured_once, is_untouched, pod_capture

from ztunnel.cluster import apps
from ztunnel.cluster.net import ClusterNet
from ztunnel.redirect import iptables
from ztunnel.testing.harness import config_dump, recreate_pod_netns

pytestmark = pytest.mark.root

CLUSTER = textwrap.dedent(
    """\
    namespaces:
      mesh: {labels: {istio.io/dataplane-mode: ambient}}
      plain: {labels: {}}
    nodes: [n1, n2]
    pods:
      - {name: a, namespace: mesh, node: n1, serviceAccount: sa-a}
      - name: b
        namespace: mesh
        node: n2
        serviceAccount: sa-b
        program: [python, -m, ztunnel.cluster.apps, echo, --port, "8080"]
        ports: [8080]
      - name: w
        namespace: mesh
        node: n2
        program: [python, -m, ztunnel.cluster.apps, whoami, --port, "9090"]
        ports: [9090]
      - {name: q, namespace: plain, node: n1}
      - name: p
        namespace: plain
        node: n2
        program: [python, -m, ztunnel.cluster.apps, echo, --port, "8080"]
        ports: [8080]
    """
)
CLI = [sys.executable, "-m", "ztunnel.cli"]
NOT_AMBIENT = CLUSTER.replace("mesh: {labels: {istio.io/dataplane-mode: ambient}}", "mesh: {}")


@pytest.fixture(params=MODES)
def mesh(request: pytest.FixtureRequest) -> Iterator[Mesh]:
    mode = mode_param(request.param)
    with cluster_mesh(CLUSTER, {"b": 8080, "w": 9090, "p": 8080}, mode) as m:
        yield m


def _listening(mesh: Mesh, pod: str, port: int) -> bool:
    with mesh.net.open_netns(mesh.net.pod(pod)) as ns, ns.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


# -- the wire --------------------------------------------------------------------------


MARKER_PROGRAM = textwrap.dedent(
    """\
    import socket, sys
    data = b"ZT-PLAINTEXT-MARKER-" * 5000
    s = socket.create_connection((sys.argv[1], 8080), timeout=8)
    s.sendall(data); s.shutdown(socket.SHUT_WR)
    got = b""
    while chunk := s.recv(65536):
        got += chunk
    print("same" if got == data else f"differs {len(got)}")
    """
)


class Capture:
    """tcpdump on the pod network bridge (inside the podnet netns), written to a pcap."""

    def __init__(self, net: ClusterNet, pcap: Path) -> None:
        self.pcap = pcap
        self.proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                net.podnet,
                "tcpdump",
                "-i",
                "br0",
                "-U",
                "-n",
                "-w",
                str(pcap),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()  # "listening on br0 ..." once capturing
        assert "listening" in line, line

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        self.proc.communicate(timeout=10)  # also closes our end of its stderr pipe

    def tcp_lines(self, bpf: str = "tcp") -> list[str]:
        out = subprocess.run(
            ["tcpdump", "-r", str(self.pcap), "-n", bpf],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return out.stdout.splitlines()


def test_app_bytes_arrive_unchanged_and_the_wire_carries_only_tls_to_15008(
    mesh: Mesh, tmp_path: Path
) -> None:
    capture = Capture(mesh.net, tmp_path / "wire.pcap")
    try:
        result = send(mesh, "a", f"{mesh.ip('b')}:8080", 1_000_000)
        marker = apps.run_in_pod(
            mesh.net, "a", ["python", "-c", MARKER_PROGRAM, mesh.ip("b")], timeout=20
        )
    finally:
        capture.stop()
    assert result["ok"] and result["bytes"] == 1_000_000, result  # sha256 checked by send
    assert marker.stdout.strip() == "same", marker.stdout + marker.stderr
    packets = capture.tcp_lines()
    assert packets, "nothing captured"
    off_mesh = [line for line in packets if ".15008" not in line]
    assert not off_mesh, off_mesh[:5]
    assert b"ZT-PLAINTEXT-MARKER" not in capture.pcap.read_bytes()
    # The first bytes the client sends to 15008 are a TLS handshake record (0x16).
    tls = "tcp dst port 15008 and (tcp[((tcp[12:1] & 0xf0) >> 2):1] = 0x16)"
    assert capture.tcp_lines(tls)
    records = [r for r in mesh.records("n2") if r.get("direction") == "inbound"]
    assert any(r.get("src.identity") == "spiffe://cluster.local/ns/mesh/sa/sa-a" for r in records)


def test_server_sees_the_client_pod_ip(mesh: Mesh) -> None:
    proc = apps.run_in_pod(mesh.net, "a", [*APPS, "read", "--to", f"{mesh.ip('w')}:9090"])
    result = json.loads(proc.stdout)
    assert result["ok"], result
    assert result["line"].split(":")[0] == mesh.ip("a")
    inbound = [r for r in mesh.records("n2") if r.get("dst.workload") == "w"]
    assert inbound and str(inbound[-1].get("src.identity")).endswith("/ns/mesh/sa/sa-a")


def test_non_ambient_pods_are_not_captured(mesh: Mesh) -> None:
    for pod in ("p", "q"):
        assert is_untouched(mesh, pod)  # no rules, no programs, no pins, no link
        assert not _listening(mesh, pod, 15001)
    before = {node: len(mesh.records(node)) for node in mesh.agents}
    result = send(mesh, "q", f"{mesh.ip('p')}:8080")
    assert result["ok"], result
    new = _after_a_marker_connection(mesh, before)
    assert not [r for r in new if mesh.ip("q") in str(r.get("src.addr"))], new


def _marker_records(mesh: Mesh, records: list[dict[str, object]]) -> list[dict[str, object]]:
    return [r for r in records if str(r.get("src.identity", "")).endswith("/sa/sa-a")]


def _after_a_marker_connection(mesh: Mesh, before: dict[str, int]) -> list[dict[str, object]]:
    """The access-log records each agent wrote since ``before``, once both agents logged a
    meshed a -> b connection made afterwards: a record of anything earlier would precede
    it, so a check for *no* record is not made before the agents got that far."""
    assert send(mesh, "a", f"{mesh.ip('b')}:8080")["ok"]

    def new() -> list[dict[str, object]]:
        return [r for n in mesh.agents for r in mesh.records(n)[before[n] :]]

    until(
        lambda: all(_marker_records(mesh, mesh.records(n)[before[n] :]) for n in mesh.agents),
        "both agents to log the marker connection",
    )
    return [r for r in new() if r not in _marker_records(mesh, new())]


def test_installed_redirection_is_exactly_the_expected_one(mesh: Mesh) -> None:
    got = assert_captured_once(mesh, "a")  # the ip rule and local route in both modes
    dump = config_dump(mesh.agents["n1"])
    shown = dump["workloadState"]["Kubernetes//Pod/mesh/a"]["redirection"]
    assert shown["mode"] == dump["redirection"]["mode"] == mesh.mode
    assert shown["installed"] is True
    if mesh.mode == "iptables":
        ours = [
            line
            for line in got.iptables_save.splitlines()
            if "ISTIO_" in line and line.startswith("-A")
        ]
        expected = [
            line for line in iptables.render_rules(iptables.InpodConfig()).splitlines()
            if line.startswith("-A")
        ]  # fmt: skip
        assert sorted(ours) == sorted(expected)  # verbatim, and nothing twice
        assert shown["current"] is True
        return
    # What the agent reports is what the kernel holds.
    assert {(p["device"], p["direction"]): p["id"] for p in shown["programs"]} == got.prog_ids
    assert shown["sk_lookup"]["link_id"] == got.links[0]
    assert dump["redirection"]["build"] == shown["build"]
    sizes = {m["name"]: m["max_entries"] for m in dump["redirection"]["maps"]}
    assert sizes == {"zt_config": 1, "zt_stats": 7, "zt_handoff": 1024}
    # The counters are read live: a's outbound connection is counted.
    before = dump["redirection"]["counters"]["outbound_captured"]
    assert send(mesh, "a", f"{mesh.ip('b')}:8080", 1000)["ok"]
    after = config_dump(mesh.agents["n1"])["redirection"]["counters"]["outbound_captured"]
    assert after == before + 1
    # ztunnel ctl shows the same, per pod.
    node = mesh.agents["n1"].node.netns_path
    ctl = subprocess.run(
        ["nsenter", f"--net={node}", "--", *CLI, "ctl", "redirection"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        env=mesh.agents["n1"].env,
    ).stdout
    row = next(line.split() for line in ctl.splitlines() if line.startswith("mesh "))
    assert row[:4] == ["mesh", "a", "ebpf", "True"]
    assert f"eth0/egress=zt_egress#{got.prog_ids[('eth0', 'egress')]}" in row
    assert "maps: zt_config array 1 entries" in ctl


# -- lifecycle -------------------------------------------------------------------------


def _until_unenrolled(mesh: Mesh, pod: str) -> None:
    until(lambda: is_untouched(mesh, pod), f"redirection removed from {pod}")
    until(lambda: not _listening(mesh, pod, 15008), f"{pod}'s listeners closed")


def test_editing_namespace_labels_enrolls_and_unenrolls_live_pods(mesh: Mesh) -> None:
    mesh.path.write_text(NOT_AMBIENT)
    # Both ends leave the mesh (a on n1, b on n2: two agents, each at its own pace).
    for pod in ("a", "b"):
        _until_unenrolled(mesh, pod)
    before = {node: len(mesh.records(node)) for node in mesh.agents}
    assert send(mesh, "a", f"{mesh.ip('b')}:8080")["ok"]  # direct now, no agent
    mesh.path.write_text(CLUSTER)
    until(lambda: _listening(mesh, "a", 15008) and _listening(mesh, "b", 15008), "re-enroll")
    assert_captured_once(mesh, "a")
    # The meshed connection is logged by both agents; the direct one, made while a and b
    # were out of the mesh, by neither (checked once the later records are there).
    assert _after_a_marker_connection(mesh, before) == []


def test_agent_restart_reuses_rules_without_duplicates(mesh: Mesh) -> None:
    before = assert_captured_once(mesh, "a")
    mesh.agents["n1"].stop()
    # Fail closed: the redirection stays, a's traffic has nowhere to go while its agent is away.
    while_away = pod_capture(mesh, "a")
    assert (while_away.rules, while_away.prog_ids, while_away.links) == (
        before.rules,
        before.prog_ids,
        before.links,
    )
    assert not send(mesh, "a", f"{mesh.ip('b')}:8080", 1000, timeout=3)["ok"]
    mesh.restart("n1")
    after = assert_captured_once(mesh, "a")
    assert after.iptables_save.count("-A OUTPUT -j ISTIO_OUTPUT") == (
        2 if mesh.mode == "iptables" else 0
    )  # mangle + nat, once each
    # eBPF: the very programs and link the first agent attached (pinned, reused, not reloaded)
    assert after.prog_ids == before.prog_ids and after.links == before.links
    assert any(
        r.get("message") == "pod enrolled" and r.get("rules") == "reused"
        for r in mesh.agents["n1"].log_lines()
    )
    result = send(mesh, "a", f"{mesh.ip('b')}:8080")
    assert result["ok"], result


def test_pod_recreated_with_a_new_netns_is_reenrolled(mesh: Mesh) -> None:
    old = pod_capture(mesh, "a")
    recreate_pod_netns(mesh.net, "mesh/a")
    until(lambda: _listening(mesh, "a", 15001), "a enrolled in its new netns")
    assert_captured_once(mesh, "a")
    # eBPF: the dead sandbox's pins are dropped once its proxy drained (nothing leaks)
    until(lambda: not old.pin_dir.exists(), "the old sandbox's pins dropped")
    enrolled = [
        r
        for r in mesh.agents["n1"].log_lines()
        if r.get("message") == "pod enrolled" and r.get("pod") == "mesh/a"
    ]
    assert len(enrolled) == 2
    before = len(mesh.records("n2"))
    result = send(mesh, "a", f"{mesh.ip('b')}:8080")
    assert result["ok"], result
    until(lambda: len(mesh.records("n2")) > before, "b's agent logged the meshed connection")
    assert os.path.exists(mesh.net.pod("a").netns_path)


def test_switching_a_node_between_modes_leaves_only_the_new_ones_state() -> None:
    """REDIRECT_MODE changed and the agent restarted: each pod holds the new mode only (the
    old one's state is removed after the new one is in place), both ways."""
    mode_param("ebpf")
    with cluster_mesh(CLUSTER, {"b": 8080}, "iptables") as mesh:
        for mode in ("ebpf", "iptables"):
            mesh.mode = mode
            mesh.restart("n1")
            assert_captured_once(mesh, "a")  # and nothing of the other mode
            result = send(mesh, "a", f"{mesh.ip('b')}:8080")
            assert result["ok"], result
            assert is_untouched(mesh, "q")
