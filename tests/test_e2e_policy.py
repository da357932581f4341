"""L4 authorization end to end in the simulated cluster: real agents, real pods, policy edits.

Policies are Istio documents in the cluster file; the agents re-read the file when it changes,
so each test starts with no policy and edits the file as an operator would apply a manifest.
Every test runs once per redirect mode (iptables, eBPF) with the same expectations.
"""

from __future__ import annotations

import subprocess
import textwrap
from collections.abc import Iterator

import pytest
from cluster_mesh import MODES, Mesh, cluster_mesh, mode_param, send, until

from ztunnel.cluster import apps

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
        labels: {app: b}
        program: [python, -m, ztunnel.cluster.apps, echo, --port, "8080"]
        ports: [8080]
    """
)

ALLOW_A = """\
policies:
  - apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: allow-a, namespace: mesh}
    spec:
      selector: {matchLabels: {app: b}}
      action: ALLOW
      rules:
        - from: [{source: {principals: [cluster.local/ns/mesh/sa/sa-a]}}]
"""
STRICT = """\
policies:
  - apiVersion: security.istio.io/v1
    kind: PeerAuthentication
    metadata: {name: default, namespace: mesh}
    spec: {mtls: {mode: STRICT}}
"""
DENY_A = """\
policies:
  - apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: deny-a, namespace: mesh}
    spec:
      action: DENY
      rules:
        - from: [{source: {principals: [cluster.local/ns/mesh/sa/sa-a]}}]
"""


@pytest.fixture(params=MODES)
def mesh(request: pytest.FixtureRequest) -> Iterator[Mesh]:
    with cluster_mesh(CLUSTER, {"b": 8080}, mode_param(request.param)) as m:
        yield m


def apply(mesh: Mesh, policies: str) -> None:
    mesh.path.write_text(CLUSTER + policies)


def allowed(mesh: Mesh, pod: str) -> bool:
    return bool(send(mesh, pod, f"{mesh.ip('b')}:8080", 10_000)["ok"])


def denials(mesh: Mesh) -> list[dict[str, object]]:
    return [r for r in mesh.records("n2") if "denied" in str(r.get("error", ""))]


def test_allow_policy_admits_one_identity_across_nodes(mesh: Mesh) -> None:
    assert allowed(mesh, "a") and allowed(mesh, "c")  # no policy: everything allowed
    apply(mesh, ALLOW_A)
    until(lambda: not allowed(mesh, "c"), "the ALLOW policy to reach n2's agent")
    assert allowed(mesh, "a")
    (denial, *_) = denials(mesh)
    assert denial["src.identity"] == "spiffe://cluster.local/ns/mesh/sa/sa-c"
    assert denial["direction"] == "inbound"


def test_strict_peer_authentication_denies_plaintext_clients(mesh: Mesh) -> None:
    assert allowed(mesh, "q")  # plaintext, captured on b's 15006, no policy yet
    apply(mesh, STRICT)
    until(lambda: not allowed(mesh, "q"), "STRICT to reach n2's agent")
    assert allowed(mesh, "a")  # mTLS clients are unaffected
    assert any(r.get("src.identity") in (None, "") for r in denials(mesh))


LONG_LIVED = textwrap.dedent(
    """\
    import socket, sys, time
    s = socket.create_connection((sys.argv[1], 8080), timeout=5)
    s.sendall(b"ping"); assert s.recv(16) == b"ping"
    print("connected", flush=True)
    for i in range(200):
        time.sleep(0.1)
        try:
            s.sendall(b"ping")
            if s.recv(16) != b"ping":
                break
        except OSError:
            break
    print("closed" if i < 199 else "still open", flush=True)
    """
)


def test_live_policy_change_closes_an_open_connection(mesh: Mesh) -> None:
    argv = ["python", "-c", LONG_LIVED, mesh.ip("b")]
    proc = apps.start_program(mesh.net, "a", argv, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "connected"
        apply(mesh, DENY_A)
        out, _ = proc.communicate(timeout=30)
        assert out.strip() == "closed"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert any("no longer allowed by policy" in str(r.get("error", "")) for r in mesh.records("n2"))
    assert not allowed(mesh, "a")
