"""The simulated cluster's CA (root): ``ztunnel ca serve`` in its own netns signs the
agents' pods' identities, no agent holds a CA key, and a node's token cannot get the
identity of a pod scheduled on another node (refused, logged and counted)."""

from __future__ import annotations

import datetime
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from cluster_mesh import Mesh, cluster_mesh, send

from ztunnel.identity.certificate import new_csr
from ztunnel.identity.istio_ca import CARequestError, IstioCAClient, IstioCAConfig
from ztunnel.model.identity import Identity
from ztunnel.redirect.netns import NetNamespace

pytestmark = pytest.mark.root

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
A = Identity("cluster.local", "mesh", "sa-a")
B = Identity("cluster.local", "mesh", "sa-b")


@pytest.fixture
def mesh() -> Iterator[Mesh]:
    with cluster_mesh(CLUSTER, {"b": 8080}) as m:
        yield m


def _ask_as(mesh: Mesh, node: str, identity: Identity, token: Path | None = None) -> None:
    """A CreateCertificate for ``identity`` with ``node``'s token, from ``node``'s netns
    (the CA is reachable on the pod network only); raises CARequestError if refused."""
    client = IstioCAClient(
        IstioCAConfig(
            address=mesh.ca.address,
            root_cert=mesh.ca.root_cert,
            token_path=token or mesh.ca.tokens[node],
            impersonate=True,
        )
    )
    _key, csr = new_csr(identity)
    with NetNamespace.named(mesh.net.nodes[node].netns).entered():
        trio.run(client.create_certificate, csr, datetime.timedelta(hours=1))


def test_agents_get_certificates_from_ca_serve_and_hold_no_key(mesh: Mesh) -> None:
    result = send(mesh, "a", f"{mesh.ip('b')}:8080")
    assert result["ok"], result
    assert mesh.ca.issued() >= 2  # a's and b's, each by its own node's agent
    assert mesh.ca.refusals() == 0
    for agent in mesh.agents.values():
        assert "CA_DIR" not in agent.env and "FAKE_CA" not in agent.env
        assert agent.env["CA_ADDRESS"] == mesh.ca.address
        assert str(mesh.ca.ca_dir) not in " ".join(agent.env.values())


def test_a_token_for_another_nodes_pod_is_refused(mesh: Mesh) -> None:
    _ask_as(mesh, "n1", A)  # a runs on n1: granted
    with pytest.raises(CARequestError, match="PERMISSION_DENIED") as info:
        _ask_as(mesh, "n1", B)  # b runs on n2: n1's agent may not have its identity
    assert f"no pod with identity {B} is scheduled on node n1" in str(info.value)
    metrics = mesh.ca.metrics()
    assert metrics['ztunnel_ca_refusals_total{reason="not_on_node"}'] == 1
    assert mesh.ca.refusals() == 1
    # an unknown token is refused before anything else
    bogus = mesh.net.log_dir / "bogus-token"
    bogus.write_text("not-a-token")
    with pytest.raises(CARequestError, match="UNAUTHENTICATED"):
        _ask_as(mesh, "n2", B, token=bogus)
    assert mesh.ca.metrics()['ztunnel_ca_refusals_total{reason="bad_token"}'] == 1
