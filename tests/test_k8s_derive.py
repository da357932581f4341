"""Kubernetes objects → the mesh model, as istiod derives it. Every core object used here
is first validated against the Kubernetes OpenAPI schema (kubernetes-validate, strict)."""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import ip_address
from typing import Any

import kubernetes_validate
import pytest

from ztunnel.model.pod import NetnsRef, PodPhase
from ztunnel.model.workload import (
    GatewayAddress,
    HealthStatus,
    LoadBalancerMode,
    NamespacedHostname,
    NetworkMode,
    TunnelProtocol,
    WorkloadType,
)
from ztunnel.sources.kubernetes.derive import (
    ClusterObjects,
    Settings,
    canonical_service,
    mesh_state,
    node_pods,
    workload_name_and_type,
)
from ztunnel.testing import k8s_fake as k
from ztunnel.testing.k8s_fake import endpoint_slice, namespace, pod, service, slice_endpoint

K8S_VERSION = "1.35.0"  # a current minor; kubernetes-validate ships its schemas offline
SETTINGS = Settings(node_name="node1")
AMBIENT = {"istio.io/dataplane-mode": "ambient"}


def valid(obj: dict[str, Any]) -> dict[str, Any]:
    if obj["apiVersion"] in ("v1", "apps/v1", "discovery.k8s.io/v1"):
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    return obj


def objects(items: Iterable[dict[str, Any]]) -> ClusterObjects:
    buckets: dict[str, dict[str, Any]] = {
        "Pod": {},
        "Namespace": {},
        "Service": {},
        "EndpointSlice": {},
        "Gateway": {},
    }
    for obj in items:
        valid(obj)
        meta = obj["metadata"]
        key = f"{meta['namespace']}/{meta['name']}" if "namespace" in meta else meta["name"]
        buckets[obj["kind"]][key] = obj
    return ClusterObjects(
        pods=buckets["Pod"],
        namespaces=buckets["Namespace"],
        services=buckets["Service"],
        endpoint_slices=buckets["EndpointSlice"],
        gateways=buckets["Gateway"],
    )


def test_the_builders_make_schema_valid_objects() -> None:
    for obj in (
        namespace("ns", AMBIENT),
        pod(
            "p",
            ports=[("http", 8080)],
            owner=("ReplicaSet", "web-5d8f7c"),
            generate_name="web-5d8f7c-",
        ),
        service("s", selector={"app": "a"}, ports=[("http", 80, "http"), ("grpc", 90, 9090)]),
        endpoint_slice("s-abc", "default", "s", [slice_endpoint("10.0.0.1", pod_name="p")]),
    ):
        valid(obj)
    bad = pod("p")
    bad["spec"]["containers"][0]["bogus"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        valid(bad)


def test_pod_workload_fields() -> None:
    p = pod(
        "web-5d8f7c-x2",
        "shop",
        ip="10.244.1.5",
        service_account="web-sa",
        labels={"app": "web", "version": "v2", "pod-template-hash": "5d8f7c"},
        annotations={"ambient.istio.io/redirection": "enabled"},
        owner=("ReplicaSet", "web-5d8f7c"),
        generate_name="web-5d8f7c-",
    )
    state, labels = mesh_state(objects([namespace("shop"), p]), SETTINGS)
    (wl,) = state.workloads
    assert wl.uid == "Kubernetes//Pod/shop/web-5d8f7c-x2"  # istiod's generatePodUID
    assert (wl.name, wl.namespace, wl.service_account, wl.node) == (
        "web-5d8f7c-x2",
        "shop",
        "web-sa",
        "node1",
    )
    assert wl.workload_ips == (ip_address("10.244.1.5"),)
    assert wl.protocol is TunnelProtocol.HBONE and wl.status is HealthStatus.HEALTHY
    assert (wl.workload_name, wl.workload_type) == ("web", WorkloadType.DEPLOYMENT)
    assert (wl.canonical_name, wl.canonical_revision) == ("web", "v2")
    assert labels[wl.uid]["app"] == "web"


def test_tunnel_protocol_follows_the_enrollment_annotation() -> None:
    plain = pod("a", ip="10.244.1.5")
    native = pod("b", ip="10.244.1.6", labels={"networking.istio.io/tunnel": "http"})
    state, _ = mesh_state(objects([namespace("default", AMBIENT), plain, native]), SETTINGS)
    by_name = {w.name: w for w in state.workloads}
    # In an ambient namespace but not (yet) enrolled by its node agent: peers use plain TCP.
    assert by_name["a"].protocol is TunnelProtocol.TCP
    assert by_name["b"].protocol is TunnelProtocol.HBONE and by_name["b"].native_tunnel


def test_unready_terminal_and_ipless_pods() -> None:
    items = [
        namespace("default"),
        pod("unready", ip="10.244.1.1", ready=False),
        pod("done", ip="10.244.1.2", phase="Succeeded"),
        pod("pending", ip=None, phase="Pending"),
        pod("hostnet", ip="192.0.2.10", host_network=True),
    ]
    deleting = pod("deleting", ip="10.244.1.3")
    deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    state, _ = mesh_state(objects([*items, deleting]), SETTINGS)
    by_name = {w.name: w for w in state.workloads}
    assert set(by_name) == {"unready", "hostnet", "deleting"}
    assert by_name["unready"].status is HealthStatus.UNHEALTHY
    assert by_name["deleting"].status is HealthStatus.UNHEALTHY
    assert by_name["hostnet"].network_mode is NetworkMode.HOST_NETWORK


@pytest.mark.parametrize(
    ("owner", "generate", "hash_label", "expected"),
    [
        (("ReplicaSet", "web-5d8f7c"), "web-5d8f7c-", "5d8f7c", ("web", WorkloadType.DEPLOYMENT)),
        (("ReplicaSet", "rs-plain"), "rs-plain-", None, ("p", WorkloadType.POD)),
        (("Job", "backup-28912345"), "backup-28912345-", None, ("backup", WorkloadType.CRONJOB)),
        (("Job", "migrate"), "migrate-", None, ("migrate", WorkloadType.JOB)),
        (("StatefulSet", "db"), "db-", None, ("p", WorkloadType.POD)),
        (None, None, None, ("p", WorkloadType.POD)),
    ],
)
def test_workload_name_and_type(
    owner: tuple[str, str] | None,
    generate: str | None,
    hash_label: str | None,
    expected: tuple[str, WorkloadType],
) -> None:
    labels = {"pod-template-hash": hash_label} if hash_label else {}
    obj = valid(pod("p", owner=owner, generate_name=generate, labels=labels))
    assert workload_name_and_type(obj) == expected


def test_canonical_service_label_precedence() -> None:
    assert canonical_service({}, "wl") == ("wl", "latest")
    assert canonical_service({"app": "a", "version": "1"}, "wl") == ("a", "1")
    assert canonical_service(
        {"app": "a", "app.kubernetes.io/name": "b", "app.kubernetes.io/version": "2"}, "wl"
    ) == ("b", "2")
    both = {
        "app": "a",
        "service.istio.io/canonical-name": "c",
        "service.istio.io/canonical-revision": "3",
    }
    assert canonical_service(both, "wl") == ("c", "3")


def test_services_vips_ports_and_named_target_ports() -> None:
    with_port = pod("a", ip="10.244.1.1", labels={"app": "web"}, ports=[("web", 8080)])
    without = pod("b", ip="10.244.1.2", labels={"app": "web"})
    other_ns = pod("c", "other", ip="10.244.1.3", labels={"app": "web"}, ports=[("web", 8080)])
    svc = service(
        "web", selector={"app": "web"}, ports=[("http", 80, "web"), ("admin", 9000, 9001)]
    )
    svc["spec"]["clusterIPs"] = ["10.96.0.10", "fd00::10"]
    svc["spec"]["ipFamilies"] = ["IPv4", "IPv6"]
    svc["spec"]["ipFamilyPolicy"] = "RequireDualStack"
    headless = service("db", selector={"app": "db"}, cluster_ip="None")
    items = [namespace("default"), namespace("other"), with_port, without, other_ns, svc, headless]
    state, _ = mesh_state(objects(items), SETTINGS)
    services = {s.name: s for s in state.services}
    web = services["web"]
    assert web.hostname == "web.default.svc.cluster.local"
    assert [str(v) for v in web.vips] == ["/10.96.0.10", "/fd00::10"]
    assert web.ports == {80: 0, 9000: 9001}  # a named target port is resolved per pod
    assert services["db"].vips == ()
    by_name = {w.name: w for w in state.workloads}
    key = "default/web.default.svc.cluster.local"
    assert by_name["a"].services == {key: {80: 8080, 9000: 9001}}
    assert by_name["b"].services == {key: {9000: 9001}}  # no "web" container port
    assert by_name["c"].services == {}  # a selector only selects in its own namespace


def test_services_without_selector_take_pods_and_ips_from_endpoint_slices() -> None:
    p = pod("a", ip="10.244.1.1")
    svc = service("ext", selector=None, ports=[("http", 80, 8080)])
    es = endpoint_slice(
        "ext-1",
        "default",
        "ext",
        [
            slice_endpoint("10.244.1.1", pod_name="a"),
            slice_endpoint("203.0.113.7", ready=False),
            slice_endpoint("203.0.113.8", ready=None),
        ],
        ports=[("http", 8080)],
    )
    state, _ = mesh_state(objects([namespace("default"), p, svc, es]), SETTINGS)
    by_uid = {w.uid: w for w in state.workloads}
    key = "default/ext.default.svc.cluster.local"
    assert by_uid["Kubernetes//Pod/default/a"].services == {key: {80: 8080}}
    ext = by_uid["Kubernetes/discovery.k8s.io/EndpointSlice/default/ext-1/203.0.113.7"]
    assert ext.network_mode is NetworkMode.HOST_NETWORK and ext.services == {key: {80: 8080}}
    assert ext.status is HealthStatus.UNHEALTHY  # conditions.ready=false
    no_condition = by_uid["Kubernetes/discovery.k8s.io/EndpointSlice/default/ext-1/203.0.113.8"]
    assert no_condition.status is HealthStatus.HEALTHY  # ready unset means ready


def test_load_balancing_from_the_service_spec() -> None:
    local = service("l", cluster_ip="10.96.0.11")
    local["spec"]["internalTrafficPolicy"] = "Local"
    close = service("c", cluster_ip="10.96.0.12")
    close["spec"]["trafficDistribution"] = "PreferClose"
    state, _ = mesh_state(objects([namespace("default"), local, close]), SETTINGS)
    lbs = {s.name: s.load_balancer for s in state.services}
    assert lbs["l"] is not None and lbs["l"].routing_preferences == ("Node",)
    assert lbs["l"].mode is LoadBalancerMode.STRICT
    assert lbs["c"] is not None and lbs["c"].mode is LoadBalancerMode.FAILOVER


def _waypoint_world(ns_labels: dict[str, str], **gw: Any) -> list[dict[str, Any]]:
    return [
        namespace("default", ns_labels),
        k.waypoint_gateway("wp", "default", address="wp.default.svc.cluster.local", **gw),
        service("web", selector={"app": "web"}),
        service("opt-out", selector={"app": "x"}, labels={"istio.io/use-waypoint": "none"}),
        pod("a", ip="10.244.1.1", labels={"app": "web"}),
    ]


def test_use_waypoint_on_the_namespace_applies_to_services_by_default() -> None:
    state, _ = mesh_state(objects(_waypoint_world({"istio.io/use-waypoint": "wp"})), SETTINGS)
    services = {s.name: s for s in state.services}
    wp = GatewayAddress(NamespacedHostname("default", "wp.default.svc.cluster.local"))
    assert services["web"].waypoint == wp
    assert services["opt-out"].waypoint is None  # "none" on the service wins
    (wl,) = state.workloads
    assert wl.waypoint is None  # the waypoint serves service traffic only (the default)


def test_workload_waypoints_need_the_traffic_type() -> None:
    items = _waypoint_world({"istio.io/use-waypoint": "wp"}, traffic="all")
    state, _ = mesh_state(objects(items), SETTINGS)
    (wl,) = state.workloads
    assert wl.waypoint == GatewayAddress(
        NamespacedHostname("default", "wp.default.svc.cluster.local")
    )


def test_waypoints_not_ready_or_not_admitting_the_namespace_are_not_used() -> None:
    not_ready = [
        namespace("default", {"istio.io/use-waypoint": "wp"}),
        k.waypoint_gateway("wp", "default", address=None),
        service("web"),
    ]
    state, _ = mesh_state(objects(not_ready), SETTINGS)
    assert state.services[0].waypoint is None
    foreign = [
        namespace("default"),
        namespace("infra"),
        k.waypoint_gateway("wp", "infra", address="wp.infra.svc.cluster.local"),
        service(
            "web",
            labels={"istio.io/use-waypoint": "wp", "istio.io/use-waypoint-namespace": "infra"},
        ),
    ]
    state, _ = mesh_state(objects(foreign), SETTINGS)
    assert state.services[0].waypoint is None  # the listener admits only its own namespace
    foreign[2] = k.waypoint_gateway(
        "wp", "infra", address="wp.infra.svc.cluster.local", from_namespaces="All"
    )
    state, _ = mesh_state(objects(foreign), SETTINGS)
    assert state.services[0].waypoint == GatewayAddress(
        NamespacedHostname("infra", "wp.infra.svc.cluster.local")
    )


def test_a_selector_listener_admits_only_namespaces_with_its_labels() -> None:
    gw = k.waypoint_gateway("wp", "infra", address="wp.infra.svc.cluster.local")
    gw["spec"]["listeners"][0]["allowedRoutes"]["namespaces"] = {
        "from": "Selector",
        "selector": {"matchLabels": {"mesh/waypoint": "infra"}},
    }
    use = {"istio.io/use-waypoint": "wp", "istio.io/use-waypoint-namespace": "infra"}
    for ns_labels, bound in (({"mesh/waypoint": "infra"}, True), ({"mesh/waypoint": "x"}, False)):
        items = [namespace("default", {**use, **ns_labels}), namespace("infra"), gw, service("web")]
        state, _ = mesh_state(objects(items), SETTINGS)
        expected = GatewayAddress(NamespacedHostname("infra", "wp.infra.svc.cluster.local"))
        assert state.services[0].waypoint == (expected if bound else None)


def test_node_pods_and_enrollment_rule() -> None:
    settings = Settings(node_name="node1", self_pod=("istio-system", "ztunnel-py-abc"))
    items = [
        namespace("mesh", AMBIENT),
        namespace("plain"),
        namespace("istio-system", AMBIENT),
        pod("in", "mesh", uid="11111111-2222-3333-4444-555555555555"),
        pod("opt-out", "mesh", labels={"istio.io/dataplane-mode": "none"}),
        pod("sidecar", "mesh", annotations={"sidecar.istio.io/status": "{}"}),
        pod("hostnet", "mesh", host_network=True),
        pod("pod-level", "plain", labels={"istio.io/dataplane-mode": "ambient"}),
        pod("out", "plain"),
        pod("elsewhere", "mesh", node="node2"),
        pod("ztunnel-py-abc", "istio-system"),
        pod("ztunnel-x", "istio-system", labels={"app": "ztunnel"}),
    ]
    netns = {"11111111-2222-3333-4444-555555555555": NetnsRef("/proc/42/ns/net")}
    pods = {p.key: p for p in node_pods(objects(items), settings, netns)}
    assert "mesh/elsewhere" not in pods
    in_mesh = {key for key, p in pods.items() if p.in_mesh}
    assert in_mesh == {"mesh/in", "plain/pod-level"}
    p = pods["mesh/in"]
    assert (
        p.uid == "Kubernetes//Pod/mesh/in" and p.k8s_uid == "11111111-2222-3333-4444-555555555555"
    )
    assert p.netns == NetnsRef("/proc/42/ns/net") and p.phase is PodPhase.RUNNING
    assert pods["mesh/opt-out"].netns is None
