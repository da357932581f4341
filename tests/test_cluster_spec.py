"""Cluster files: what a valid one gives (pods, layout, mesh state), and how a broken one is
reported. All without root: the agent only reads the file."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from ztunnel.cluster.net import render_service_rules
from ztunnel.cluster.spec import demo_spec
from ztunnel.errors import ConfigError
from ztunnel.model.pod import NetnsRef
from ztunnel.model.workload import TunnelProtocol
from ztunnel.sources.clusterfile.layout import PodNet, layout
from ztunnel.sources.clusterfile.mesh import cluster_state, in_mesh, snapshot
from ztunnel.sources.clusterfile.spec import load_spec, loads_spec

MINIMAL = """
namespaces:
  a: {labels: {istio.io/dataplane-mode: ambient}}
  b: {}
nodes: [n1]
pods:
  - {name: p, namespace: a, node: n1}
"""


def test_demo_cluster_file_describes_the_demo() -> None:
    spec = demo_spec()
    assert spec.nodes == ("node1", "node2")
    assert [p.key for p in spec.pods] == [
        "demo/client",
        "demo/echo-1",
        "demo/echo-2",
        "demo/other",
        "legacy/legacy-client",
        "demo/waypoint",
        "demo/web-v1",
        "demo/web-v2",
    ]
    assert spec.pod("client").service_account == "client"
    assert spec.pod("legacy-client").service_account == "default"
    svc = spec.services[0]
    assert [s.name for s in spec.services] == ["echo", "waypoint", "web", "web-v2"]
    assert svc.hostname == "echo.demo.svc.cluster.local"
    assert svc.vip == IPv4Address("10.96.0.10") and dict(svc.ports) == {80: 8080}
    assert [p.name for p in spec.selected_pods(svc)] == ["echo-1", "echo-2"]
    policy = spec.policies[0]  # the L4 scene's; the rest are the waypoint scene's
    assert [p["kind"] for p in spec.policies] == [
        "AuthorizationPolicy",
        "Gateway",
        "HTTPRoute",
        "AuthorizationPolicy",
        "AuthorizationPolicy",
    ]
    assert policy["kind"] == "AuthorizationPolicy"
    assert policy["apiVersion"] == "security.istio.io/v1"
    principals = policy["spec"]["rules"][0]["from"][0]["source"]["principals"]
    assert principals == ["cluster.local/ns/demo/sa/client"]


def test_enrollment_follows_namespace_and_pod_labels() -> None:
    spec = loads_spec(
        MINIMAL
        + """
  - {name: q, namespace: a, node: n1, labels: {istio.io/dataplane-mode: none}}
  - {name: r, namespace: b, node: n1}
  - {name: s, namespace: b, node: n1, labels: {istio.io/dataplane-mode: ambient}}
"""
    )
    assert [in_mesh(spec, p) for p in spec.pods] == [True, False, False, True]


@pytest.mark.parametrize(
    ("text", "field", "problem"),
    [
        (
            MINIMAL + "  - {name: x, namespace: a, node: n1, color: red}\n",
            "pods[1].color",
            "unknown field",
        ),
        (MINIMAL.replace("node: n1}", "node: n9}"), "pods[0].node", "unknown node"),
        (
            MINIMAL.replace("namespace: a,", "namespace: zz,"),
            "pods[0].namespace",
            "unknown namespace",
        ),
        (MINIMAL.replace("nodes: [n1]", "nodes: n1"), "nodes", "expected a list"),
        (MINIMAL.replace("nodes: [n1]", "nodes: []"), "nodes", "at least one node"),
        (MINIMAL + "  - {name: p, namespace: a, node: n1}\n", "pods[1]", "duplicate pod"),
        (MINIMAL + "  - {name: Bad_Name, namespace: a, node: n1}\n", "pods[1].name", "DNS-1123"),
        (MINIMAL + "  - {namespace: a, node: n1}\n", "pods[1].name", "required"),
        (
            MINIMAL + "  - {name: x, namespace: a, node: n1, program: python}\n",
            "pods[1].program",
            "list",
        ),
        (
            MINIMAL + "  - {name: x, namespace: a, node: n1, labels: {v: 1}}\n",
            "pods[1].labels.v",
            "strings",
        ),
        (
            MINIMAL + "  - {name: x, namespace: a, node: n1, ports: [70000]}\n",
            "pods[1].ports[0]",
            "port",
        ),
        (
            MINIMAL + "services:\n  - {name: s, namespace: a, vip: 10.96.0.300, ports: {80: 80}}\n",
            "services[0].vip",
            "not an IP",
        ),
        (
            MINIMAL + "services:\n  - {name: s, namespace: a, vip: 10.96.0.3, ports: {80: x}}\n",
            "services[0].ports.80",
            "port",
        ),
        (
            MINIMAL
            + "services:\n  - {name: s, namespace: a, vip: 10.96.0.3, ports: {80: 80}, sel: {}}\n",
            "services[0].sel",
            "unknown field",
        ),
        (
            MINIMAL
            + "policies:\n  - {apiVersion: v1, kind: X, metadata: {name: p, namespace: q}}\n",
            "policies[0].metadata.namespace",
            "unknown namespace",
        ),
        (MINIMAL + "extra: 1\n", "extra", "unknown field"),
    ],
)
def test_bad_cluster_files_name_the_field(text: str, field: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        loads_spec(text, "bad.yaml")
    assert info.value.source == "bad.yaml"
    assert info.value.field == field
    assert problem in info.value.problem


def test_invalid_yaml_and_missing_file() -> None:
    with pytest.raises(ConfigError, match="invalid YAML"):
        loads_spec("nodes: [a\n", "x.yaml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_spec("/nonexistent/cluster.yaml")
    with pytest.raises(ConfigError, match="nested too deeply"):
        loads_spec("[" * 5000 + "]" * 5000, "deep.yaml")


def test_service_rules_split_traffic_evenly_over_endpoints() -> None:
    spec = demo_spec()
    pods = {
        p.key: PodNet(p.name, p.namespace, p.node, "x", IPv4Address(f"10.244.9.{i + 2}"))
        for i, p in enumerate(spec.pods)
    }
    rules = render_service_rules(spec, pods).splitlines()
    assert "-A ZT-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -j ZT-SVC-0-80" in rules
    svc_rules = [r for r in rules if r.startswith("-A ZT-SVC-0-80")]
    assert svc_rules == [
        "-A ZT-SVC-0-80 -p tcp -m statistic --mode random --probability 0.50000000000"
        " -j DNAT --to-destination 10.244.9.3:8080",
        "-A ZT-SVC-0-80 -p tcp -j DNAT --to-destination 10.244.9.4:8080",
    ]


def _crowded(pods: int) -> str:
    lines = ["namespaces: {ns: {}}", "nodes: [n1, n2]", "pods:"]
    lines += [f"  - {{name: p{i}, namespace: ns, node: n1}}" for i in range(pods)]
    lines.append("  - {name: other, namespace: ns, node: n2}")
    return "\n".join(lines) + "\n"


def test_a_node_holds_at_most_253_pods() -> None:
    # Each node's pods share one /24 (.2-.254): one more would have no address at all.
    spec = loads_spec(_crowded(253))
    assert layout(spec, "zt000000").pods["ns/p252"].ip == IPv4Address("10.244.1.254")
    with pytest.raises(ConfigError) as info:
        loads_spec(_crowded(254))
    assert info.value.field == "pods[253].node"
    assert "253" in info.value.problem and "'n1'" in info.value.problem


def test_layout_uses_the_cluster_addressing() -> None:
    places = layout(demo_spec(), "zt00beef")
    assert places.pods["demo/echo-2"].ip == IPv4Address("10.244.2.2")
    assert places.pods["legacy/legacy-client"].ip == IPv4Address("10.244.2.4")
    assert places.pods["demo/client"].netns == "zt00beef-pod-demo-client"
    assert places.pods["demo/client"].netns_path == "/var/run/netns/zt00beef-pod-demo-client"
    assert places.nodes["node2"].netns == "zt00beef-node-node2"
    assert places.nodes["node2"].ip == IPv4Address("10.244.2.1")
    assert [p.name for p in places.pods_on("node1")] == ["client", "echo-1", "web-v1"]


def test_cluster_state_models_the_pods() -> None:
    spec = demo_spec()
    workloads, services, labels = cluster_state(spec, layout(spec, "zt00beef"))
    by_name = {w.name: w for w in workloads}
    client, echo2, legacy = by_name["client"], by_name["echo-2"], by_name["legacy-client"]
    assert client.uid == "Kubernetes//Pod/demo/client"
    assert client.protocol is TunnelProtocol.HBONE and legacy.protocol is TunnelProtocol.TCP
    assert client.workload_ips == (IPv4Address("10.244.1.2"),)
    assert str(client.identity) == "spiffe://cluster.local/ns/demo/sa/client"
    assert echo2.node == "node2"
    assert echo2.services == {"demo/echo.demo.svc.cluster.local": {80: 8080}}
    assert client.services == {}
    svc = services[0]
    assert svc.key == "demo/echo.demo.svc.cluster.local"
    assert [str(v) for v in svc.vips] == ["/10.96.0.10"]
    assert labels["Kubernetes//Pod/demo/echo-1"] == {"app": "echo"}


def test_snapshot_is_this_nodes_pods_and_the_whole_mesh() -> None:
    snap, warnings = snapshot(demo_spec(), "zt00beef", "node2")
    assert warnings == []
    assert snap.source == "ztunnel/cluster/demo.yaml"
    assert [p.key for p in snap.pods] == [
        "demo/echo-2",
        "demo/other",
        "legacy/legacy-client",
        "demo/waypoint",
        "demo/web-v2",
    ]
    echo2 = snap.pod("demo/echo-2")
    assert echo2 is not None
    assert echo2.uid == "Kubernetes//Pod/demo/echo-2"
    assert echo2.netns == NetnsRef("/var/run/netns/zt00beef-pod-demo-echo-2")
    assert echo2.ips == (IPv4Address("10.244.2.2"),)
    assert echo2.service_account == "echo" and echo2.node == "node2"
    # The waypoint pod is never captured (dataplane-mode none); it speaks HBONE itself.
    assert [p.in_mesh for p in snap.pods] == [True, True, False, False, True]
    # The state is the whole cluster's (node1's pods are destinations too), with policies.
    assert snap.state is not None
    assert len(snap.state.workloads) == 8
    by_name = {w.name: w for w in snap.state.workloads}
    assert by_name["echo-1"].authorization_policies == ("demo/echo-allow-client",)
    assert by_name["client"].authorization_policies == ()
    # The web pods are behind the waypoint: istiod's implicit allow of its identity (the
    # demo file sets PILOT_AUTO_ALLOW_WAYPOINT_POLICY); L7 policies stay the waypoint's.
    implicit = "demo/istio_allow_waypoint_demo_waypoint"
    assert by_name["web-v1"].authorization_policies == (implicit,)
    assert [p.key for p in snap.state.policies] == ["demo/echo-allow-client", implicit]


def test_pod_level_labels_decide_over_the_namespace() -> None:
    spec = loads_spec(
        MINIMAL
        + """
  - {name: q, namespace: a, node: n1, labels: {istio.io/dataplane-mode: none}}
  - {name: s, namespace: b, node: n1, labels: {istio.io/dataplane-mode: ambient}}
"""
    )
    snap, _ = snapshot(spec, "zt000000", "n1")
    assert {p.name: p.in_mesh for p in snap.pods} == {"p": True, "q": False, "s": True}
    assert snap.state is not None
    hbone = {w.name for w in snap.state.workloads if w.protocol is TunnelProtocol.HBONE}
    assert hbone == {"p", "s"}


def test_a_bad_policy_in_the_file_names_the_file_and_the_field() -> None:
    spec = loads_spec(
        MINIMAL + "policies:\n  - apiVersion: security.istio.io/v1\n    kind: AuthorizationPolicy\n"
        "    metadata: {name: x, namespace: a}\n    spec: {action: NOPE}\n",
        "c.yaml",
    )
    with pytest.raises(ConfigError) as info:
        snapshot(spec, "zt000000", "n1")
    assert info.value.source == "c.yaml: AuthorizationPolicy a/x"
    assert info.value.field == "spec.action"
