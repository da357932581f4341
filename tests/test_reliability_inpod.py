"""Crashes and pod deletion in the simulated cluster (real agent processes, real pods).

- ``kill -9`` of either node's agent under traffic fails closed: while it is down the pod's
  connections fail (its rules stay, nothing listens), the capture on the bridge holds no
  byte of the app's payload and no packet to the app port; the restarted agent reconciles
  every pod and readiness says so (bench/crash.py does the measuring and prints the times).
- Deleting a pod whose netns still exists drains its connections at once: the peer app on
  the other node sees a reset right away (GOAWAY / RST_STREAM across, TCP RST to the app),
  not a clean FIN and not a hang until some keepalive notices.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster_mesh import Mesh, cluster_mesh, until

from ztunnel.cluster import apps

pytestmark = pytest.mark.root

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import crash  # noqa: E402


def test_kill_9_fails_closed_and_the_restarted_agent_reconciles_every_pod(
    tmp_path: Path,
) -> None:
    result = crash.measure(tmp_path, down=1.0, settle=1.5)
    # Nothing of the app's payload, and no packet to the app port, ever crossed the bridge;
    # the traffic that did was TLS to 15008.
    assert result["markers_on_wire"] == 0
    assert result["packets_to_app_port_on_wire"] == 0
    assert result["packets_to_15008_on_wire"] > 0
    for side in ("client_side_agent_kill_9", "server_side_agent_kill_9"):
        figures = result[side]
        # Attempts were made while the agent was down, and none got through around it.
        assert figures["connections_while_down"] > 0, side
        assert figures["succeeded_while_down"] == 0, side
        assert figures["traffic_back_after_restart_s"] is not None, side
    assert result["reconciled"] == {"n1": ["a"], "n2": ["b"]}
    assert result["readiness_after"] == {"n1": 200, "n2": 200}


CLUSTER = textwrap.dedent(
    """\
    namespaces:
      mesh: {labels: {istio.io/dataplane-mode: ambient}}
    nodes: [n1, n2]
    pods:
      - {name: a, namespace: mesh, node: n1, serviceAccount: sa-a}
      - name: b
        namespace: mesh
        node: n2
        serviceAccount: sa-b
        program: [python, -m, ztunnel.cluster.apps, echo, --port, "8080"]
        ports: [8080]
    """
)

# In pod a: one long-lived connection to b:8080; prints "connected" once echoed, then how
# it ended: "rst" (reset), "fin" (clean EOF) or "timeout" (nothing within 30 s).
LONG_LIVED = textwrap.dedent(
    """\
    import socket, sys
    s = socket.create_connection((sys.argv[1], 8080), timeout=10)
    s.sendall(b"hello\\n")
    assert s.recv(6) == b"hello\\n"
    print("connected", flush=True)
    s.settimeout(30)
    try:
        while s.recv(65536):
            pass
        print("fin", flush=True)
    except ConnectionResetError:
        print("rst", flush=True)
    except TimeoutError:
        print("timeout", flush=True)
    """
)


@pytest.fixture
def mesh() -> Iterator[Mesh]:
    with cluster_mesh(CLUSTER, {"b": 8080}) as m:
        yield m


def without_pod(name: str) -> str:
    lines = CLUSTER.splitlines(keepends=True)
    if name == "a":
        return "".join(line for line in lines if "{name: a," not in line)
    start = next(i for i, line in enumerate(lines) if "name: b" in line)
    return "".join(lines[:start] + lines[start + 6 :])


@pytest.mark.parametrize("deleted", ["b", "a"])
def test_deleting_a_pod_resets_its_connections_on_the_other_node_at_once(
    mesh: Mesh, deleted: str
) -> None:
    client = subprocess.Popen(
        apps.pod_command(mesh.net, "a", [sys.executable, "-c", LONG_LIVED, mesh.ip("b")]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert client.stdout is not None
        assert client.stdout.readline().strip() == "connected"
        node = "n2" if deleted == "b" else "n1"
        other = "n1" if deleted == "b" else "n2"
        mesh.path.write_text(without_pod(deleted))
        out, err = client.communicate(timeout=40)
        # The app in pod a learns of the cut as a cut, whichever end was deleted.
        assert out.strip() == "rst", (out, err)
        until(lambda: any("drain deadline" in str(r.get("error")) for r in mesh.records(node)),
              f"{node} logged the cut")  # fmt: skip
        cut = [r for r in mesh.records(node) if "drain deadline" in str(r.get("error"))]
        assert cut and all(r["error"] == "connection closed by the agent: drain deadline reached"
                           for r in cut)  # fmt: skip
        side = "upstream" if deleted == "b" else "client"
        until(lambda: any(str(r.get("error", "")).startswith(f"connection aborted by the {side}")
                          for r in mesh.records(other)), f"{other} logged the abort")  # fmt: skip
    finally:
        if client.poll() is None:
            client.kill()
            client.communicate()
