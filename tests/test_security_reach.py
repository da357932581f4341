"""What a pod (or anything else on the pod network) can reach, in the simulated cluster.

Real agents, real pods, STRICT mTLS in the mesh namespace from the start. Three kinds of
client try every way we know around the agent:

- ``a``: a mesh pod on n1 (a compromised app whose traffic the agent captures);
- ``q``: a pod outside the mesh on n1 (no capture, no identity);
- ``attacker``: a host on the pod network that is neither node nor pod (a network attacker
  with its own address on the bridge).

Each probe connects, sends one HTTP request line and reports what came back: an answer from
the agent's admin would start with ``HTTP/``, an answer from pod ``b``'s echo app would be
our own bytes. Only the mesh pod's HBONE path (through both agents, port 15008) may reach
``b``'s app; nothing reaches an admin port.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from ipaddress import IPv4Address

import pytest
from cluster_mesh import Mesh, cluster_mesh, send, until

from ztunnel.cluster import apps
from ztunnel.model import ports

pytestmark = pytest.mark.root

CLUSTER = textwrap.dedent(
    """\
    namespaces:
      mesh: {labels: {istio.io/dataplane-mode: ambient}}
      plain: {labels: {}}
    nodes: [n1, n2]
    pods:
      - {name: a, namespace: mesh, node: n1, serviceAccount: sa-a}
      - {name: c, namespace: mesh, node: n1, serviceAccount: sa-c}
      - {name: q, namespace: plain, node: n1}
      - name: b
        namespace: mesh
        node: n2
        serviceAccount: sa-b
        program: [python, -m, ztunnel.cluster.apps, echo, --port, "8080"]
        ports: [8080]
    policies:
      - apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata: {name: default, namespace: mesh}
        spec: {mtls: {mode: STRICT}}
    """
)
ATTACKER_IP = IPv4Address("10.244.250.66")
REQUEST = b"GET /config_dump HTTP/1.0\r\nHost: localhost\r\n\r\n"

# Runs in the client's netns: argv[1] is a JSON list of [host, port]; prints one JSON
# object per target: "refused", "reset", "timeout", "closed" (EOF, nothing read) or the
# first bytes read (hex), so the test can tell an HTTP answer or an echo from a TLS alert.
PROBE = textwrap.dedent(
    """\
    import json, socket, sys
    for host, port in json.loads(sys.argv[1]):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(3)
        try:
            s.connect((host, port))
            s.sendall(bytes.fromhex(sys.argv[2]))
            data = s.recv(64)
            got = "data:" + data.hex() if data else "closed"
        except ConnectionRefusedError:
            got = "refused"
        except ConnectionResetError:
            got = "reset"
        except (socket.timeout, TimeoutError):
            got = "timeout"
        except OSError as exc:
            got = f"oserror:{exc.errno}"
        finally:
            s.close()
        print(json.dumps({"target": f"{host}:{port}", "got": got}), flush=True)
    """
)


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    with cluster_mesh(CLUSTER, {"b": 8080}) as m:
        m.net.attach_host("attacker", ATTACKER_IP)
        yield m


def probe(mesh: Mesh, client: str, targets: list[tuple[str, int]]) -> dict[str, str]:
    argv = ["python", "-c", PROBE, json.dumps(targets), REQUEST.hex()]
    members = {**mesh.net.hosts, **mesh.net.nodes}
    if client in members:  # not a pod: the attacker host, or a node (the positive control)
        cmd = ["ip", "netns", "exec", members[client].netns, sys.executable, *argv[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    else:
        proc = apps.run_in_pod(mesh.net, client, argv, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    return {line["target"]: line["got"] for line in lines}


def answered_http(got: str) -> bool:
    return got.startswith("data:" + b"HTTP/".hex())


def echoed(got: str) -> bool:
    return got.startswith("data:" + REQUEST[:16].hex())


ADMIN_PORTS = (ports.ADMIN,)  # state-changing and detailed: loopback of the agent's netns only


def admin_targets(mesh: Mesh) -> list[tuple[str, int]]:
    hosts = [
        "127.0.0.1", "127.0.0.2", "127.1.2.3", "::1", "::ffff:127.0.0.1", "0.0.0.0", "::",
        str(mesh.net.gateway), *(str(n.ip) for n in mesh.net.nodes.values()),
        *(f"::ffff:{n.ip}" for n in mesh.net.nodes.values()),
    ]  # fmt: skip
    return [(h, p) for h in hosts for p in ADMIN_PORTS]


@pytest.mark.parametrize("client", ["a", "q", "attacker"])
def test_no_client_reaches_an_agents_admin_on_any_address(mesh: Mesh, client: str) -> None:
    results = probe(mesh, client, admin_targets(mesh))
    assert len(results) == len(admin_targets(mesh))
    reached = {t: got for t, got in results.items() if got.startswith("data:")}
    assert not reached, reached


def test_the_probe_sees_the_admin_from_the_agents_own_loopback(mesh: Mesh) -> None:
    """The positive control: the same probe, run in a node's netns, gets the admin's answer."""
    results = probe(mesh, "n1", [("127.0.0.1", ports.ADMIN)])
    assert answered_http(results[f"127.0.0.1:{ports.ADMIN}"]), results


def b_targets(mesh: Mesh) -> list[tuple[str, int]]:
    b = mesh.ip("b")
    return [(b, 8080), (b, ports.OUTBOUND), (b, ports.INBOUND_PLAINTEXT), (b, ports.INBOUND)]


@pytest.mark.parametrize("client", ["q", "attacker"])
def test_without_mtls_nothing_reaches_another_pods_app(mesh: Mesh, client: str) -> None:
    results = probe(mesh, client, b_targets(mesh))
    # The app port is captured into b's agent (15006), which STRICT refuses; b's own proxy
    # ports are refused as self calls; 15008 wants TLS and answers an HTTP line with nothing
    # the app sent. No echo on any port.
    assert not any(echoed(got) or answered_http(got) for got in results.values()), results
    refused = [
        r for r in mesh.records("n2") if "denied" in str(r.get("error", ""))
        and str(r.get("src.addr", "")).startswith(client_ip(mesh, client))
    ]  # fmt: skip
    assert refused, "b's agent saw and refused the plaintext connection to 8080"


def client_ip(mesh: Mesh, client: str) -> str:
    return str(ATTACKER_IP) if client == "attacker" else mesh.ip(client)


def test_a_mesh_pod_reaches_another_pods_app_only_through_hbone(mesh: Mesh) -> None:
    b = mesh.ip("b")
    assert send(mesh, "a", f"{b}:8080", 10_000)["ok"]  # through both agents, 15008
    assert echoed(probe(mesh, "a", [(b, 8080)])[f"{b}:8080"])  # the probe sees an echo
    record = next(
        r for r in reversed(mesh.records("n2"))
        if str(r.get("src.addr", "")).startswith(mesh.ip("a"))
    )  # fmt: skip
    assert record["src.identity"] == "spiffe://cluster.local/ns/mesh/sa/sa-a"
    # Straight at b's proxy ports (not its app): the client's agent carries it over HBONE and
    # b's agent refuses a target port that is one of its own listeners.
    results = probe(mesh, "a", [(b, ports.OUTBOUND), (b, ports.INBOUND_PLAINTEXT)])
    assert not any(echoed(got) or answered_http(got) for got in results.values()), results


SPOOF = textwrap.dedent(
    """\
    import socket, sys
    s = socket.socket()
    s.settimeout(5)
    s.bind((sys.argv[1], 0))
    s.connect((sys.argv[2], 8080))
    s.sendall(b"spoofed"); print(s.recv(16).decode(), flush=True)
    """
)


def test_a_pod_using_another_pods_ip_keeps_its_own_identity(mesh: Mesh) -> None:
    """A compromised pod that takes pod c's address (NET_ADMIN in its netns) still speaks as
    itself: its agent chooses the certificate by the pod it serves, never by a source IP."""
    a, c, b = mesh.ip("a"), mesh.ip("c"), mesh.ip("b")
    seen_before = len(mesh.records("n2"))
    apps.run_in_pod(mesh.net, "a", ["ip", "addr", "add", f"{c}/32", "dev", "eth0"])
    try:
        proc = apps.run_in_pod(mesh.net, "a", ["python", "-c", SPOOF, c, b], timeout=30)
        assert proc.stdout.strip() == "spoofed", proc.stderr
    finally:
        apps.run_in_pod(mesh.net, "a", ["ip", "addr", "del", f"{c}/32", "dev", "eth0"])
    sa_a = "spiffe://cluster.local/ns/mesh/sa/sa-a"

    def from_c() -> list[dict[str, object]]:
        return [r for r in mesh.records("n1") if str(r.get("src.addr", "")).startswith(f"{c}:")]

    until(lambda: bool(from_c()) and len(mesh.records("n2")) > seen_before, "both access logs")
    # a's agent saw the borrowed source address and still speaks as a ...
    (out,) = from_c()
    assert (out["src.workload"], out["src.identity"]) == ("a", sa_a)
    # ... and b's agent sees a's certificate (and a's own address), never c's identity.
    inbound = mesh.records("n2")[seen_before:]
    assert inbound and {r["src.identity"] for r in inbound} == {sa_a}
    assert all(str(r["src.addr"]).startswith(f"{a}:") for r in inbound)
