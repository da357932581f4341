"""Waypoints in the mesh state the cluster file derives (istiod's rules), and what the agent
does with them: outbound to the waypoint, the waypoint's implicit L4 allow at the
destination, bypassing clients judged by the destination's L4 policy (no root)."""

from __future__ import annotations

import random
import textwrap
from ipaddress import ip_address

import pytest

from ztunnel.errors import ConfigError
from ztunnel.model.address import SocketAddr
from ztunnel.model.identity import Identity
from ztunnel.model.pod import MeshState
from ztunnel.model.workload import AppProtocol, GatewayAddress, NamespacedHostname, Workload
from ztunnel.policy.query import explain_connection
from ztunnel.sources import waypoints as wp
from ztunnel.sources.clusterfile.layout import layout
from ztunnel.sources.clusterfile.mesh import mesh_state
from ztunnel.sources.clusterfile.spec import loads_spec
from ztunnel.state.resolve import HboneUpstream, resolve_outbound
from ztunnel.state.store import StateStore

GATEWAY = textwrap.dedent(
    """\
    - apiVersion: gateway.networking.k8s.io/v1
      kind: Gateway
      metadata: {name: waypoint, namespace: shop, labels: LABELS}
      spec:
        gatewayClassName: istio-waypoint
        listeners: [{name: mesh, port: 15008, protocol: HBONE}]
    """
)


def cluster(
    *,
    ns_labels: str = "{istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}",
    svc_labels: str = "{}",
    pod_labels: str = "{app: web}",
    gateway_labels: str = "{}",
    web_policy: str = "",
    auto_allow: bool = True,
) -> str:
    gateway = GATEWAY.replace("LABELS", gateway_labels)
    flag = f"istiod: {{PILOT_AUTO_ALLOW_WAYPOINT_POLICY: {str(auto_allow).lower()}}}\n"
    return (
        flag
        + "policies:\n"
        + gateway
        + web_policy
        + textwrap.dedent(
            f"""\
        namespaces:
          shop: {{labels: {ns_labels}}}
          other: {{labels: {{istio.io/dataplane-mode: ambient}}}}
        nodes: [n1]
        pods:
          - {{name: client, namespace: shop, node: n1, serviceAccount: client}}
          - name: waypoint
            namespace: shop
            node: n1
            serviceAccount: waypoint
            labels: {{gateway.networking.k8s.io/gateway-name: waypoint,
                      istio.io/dataplane-mode: none, networking.istio.io/tunnel: http}}
          - {{name: web-1, namespace: shop, node: n1, serviceAccount: web, labels: {pod_labels}}}
          - {{name: db-1, namespace: other, node: n1, serviceAccount: db, labels: {{app: db}}}}
        services:
          - name: waypoint
            namespace: shop
            vip: 10.96.0.2
            ports: {{15008: 15008}}
            selector: {{gateway.networking.k8s.io/gateway-name: waypoint}}
          - name: web
            namespace: shop
            vip: 10.96.0.10
            labels: {svc_labels}
            selector: {{app: web}}
            ports:
              - {{port: 80, targetPort: 8080, name: http}}
              - {{port: 9000, name: api, appProtocol: grpc}}
              - {{port: 3306, name: db}}
          - {{name: db, namespace: other, vip: 10.96.0.20, ports: {{5432: 5432}},
             selector: {{app: db}}}}
        """
        )
    )


ADDRESS = GatewayAddress(NamespacedHostname("shop", "waypoint.shop.svc.cluster.local"), 15008)
ONLY_NOBODY = textwrap.indent(
    textwrap.dedent(
        """\
        - apiVersion: security.istio.io/v1
          kind: AuthorizationPolicy
          metadata: {name: web-only-nobody, namespace: shop}
          spec:
            selector: {matchLabels: {app: web}}
            rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/nobody]}}]}]
        """
    ),
    "",
)


def derive(text: str) -> tuple[MeshState, list[str]]:
    spec = loads_spec(text)
    return mesh_state(spec, layout(spec, "zt000000"))


def workload(state: MeshState, name: str) -> Workload:
    return next(w for w in state.workloads if w.name == name)


def store_of(state: MeshState) -> StateStore:
    store = StateStore()
    store.replace_all(state.workloads, state.services, state.policies)
    return store


def test_namespace_label_binds_its_services_to_the_waypoint_not_its_workloads() -> None:
    state, warnings = derive(cluster())
    web = next(s for s in state.services if s.name == "web")
    assert web.waypoint == ADDRESS
    # The waypoint's own Service and another namespace's Service stay unbound.
    assert {s.name: s.waypoint for s in state.services if s.name != "web"} == {
        "waypoint": None,
        "db": None,
    }
    # waypoint-for defaults to "service": pods inherit nothing from the namespace.
    assert workload(state, "web-1").waypoint is None
    assert warnings == []


def test_service_label_none_opts_out_and_pod_label_needs_a_workload_waypoint() -> None:
    state, _ = derive(cluster(svc_labels="{istio.io/use-waypoint: none}"))
    assert next(s for s in state.services if s.name == "web").waypoint is None

    pod = "{app: web, istio.io/use-waypoint: waypoint}"
    state, warnings = derive(cluster(pod_labels=pod))
    assert workload(state, "web-1").waypoint is None
    assert any("does not serve workload traffic" in w for w in warnings)

    state, _ = derive(cluster(pod_labels=pod, gateway_labels="{istio.io/waypoint-for: all}"))
    assert workload(state, "web-1").waypoint == ADDRESS
    assert workload(state, "waypoint").waypoint is None  # never its own waypoint


def test_only_the_objects_label_binds_when_the_namespace_has_none() -> None:
    ns = "{istio.io/dataplane-mode: ambient}"
    state, _ = derive(cluster(ns_labels=ns))
    assert next(s for s in state.services if s.name == "web").waypoint is None
    state, _ = derive(cluster(ns_labels=ns, svc_labels="{istio.io/use-waypoint: waypoint}"))
    assert next(s for s in state.services if s.name == "web").waypoint == ADDRESS


def test_a_missing_waypoint_binds_nothing_and_says_so() -> None:
    text = cluster(svc_labels="{istio.io/use-waypoint: nope}")
    state, warnings = derive(text)
    assert next(s for s in state.services if s.name == "web").waypoint is None
    assert any("waypoint shop/nope is not ready" in w for w in warnings)


def test_the_cluster_file_treats_a_selector_listener_as_same_namespace() -> None:
    listener = "{name: mesh, port: 15008, protocol: HBONE, allowedRoutes: {namespaces: FROM}}"
    for from_, admits_other in (("{from: All}", True), ("{from: Selector}", False)):
        text = cluster().replace(
            "[{name: mesh, port: 15008, protocol: HBONE}]",
            "[" + listener.replace("FROM", from_) + "]",
        )
        spec = loads_spec(text)
        index = wp.index_waypoints(spec.policies, [], [])
        (waypoint,) = index.waypoints.values()
        assert waypoint.admits("other", {}) is admits_other
        assert waypoint.admits("shop", {})


def test_port_protocols_follow_istio_protocol_selection() -> None:
    state, _ = derive(cluster())
    web = next(s for s in state.services if s.name == "web")
    assert dict(web.app_protocols) == {
        80: AppProtocol.HTTP11,  # name "http"
        9000: AppProtocol.GRPC,  # appProtocol wins over the name
        3306: AppProtocol.TCP,  # well-known port, unknown name
    }
    assert web.ports == {80: 8080, 9000: 9000, 3306: 3306}
    assert wp.app_protocol(8080, "http2-web", None) is AppProtocol.HTTP2
    assert wp.app_protocol(8080, "web", None) is AppProtocol.UNKNOWN
    assert wp.app_protocol(8080, "x", "kubernetes.io/h2c") is AppProtocol.HTTP2
    assert wp.app_protocol(8080, "grpc-web", None) is AppProtocol.UNKNOWN


def test_the_waypoint_pod_speaks_hbone_natively_and_gets_no_implicit_policy() -> None:
    state, _ = derive(cluster())
    w = workload(state, "waypoint")
    assert w.native_tunnel and w.protocol.value == "HBONE"
    assert w.authorization_policies == ()


def test_implicit_allow_is_listed_on_workloads_behind_the_waypoint() -> None:
    state, _ = derive(cluster())
    key = "shop/istio_allow_waypoint_shop_waypoint"
    assert workload(state, "web-1").authorization_policies == (key,)
    assert workload(state, "db-1").authorization_policies == ()
    policy = next(p for p in state.policies if p.key == key)
    assert policy.action.value == "Allow"
    (((match,),),) = policy.rules
    assert [m.value for m in match.principals] == ["cluster.local/ns/shop/sa/waypoint"]


def test_gateway_api_documents_never_reach_the_l4_translator() -> None:
    route = textwrap.indent(
        textwrap.dedent(
            """\
            - apiVersion: gateway.networking.k8s.io/v1
              kind: HTTPRoute
              metadata: {name: r, namespace: shop}
              spec: {parentRefs: [{kind: Service, group: "", name: web}]}
            - apiVersion: v1
              kind: Service
              metadata: {name: web, namespace: shop}
              spec: {ports: [{port: 80, name: http}]}
            """
        ),
        "",
    )
    _, warnings = derive(cluster(web_policy=route))
    assert warnings == []


def _outbound(state: MeshState, src: str, dst: str) -> HboneUpstream:
    store = store_of(state)
    source = workload(state, src)
    ip, port = dst.split(":")
    up = resolve_outbound(
        store, source, SocketAddr(ip_address(ip), int(port)), rng=random.Random(1)
    )
    assert isinstance(up, HboneUpstream)
    return up


def test_service_traffic_goes_to_the_waypoint_pod_traffic_goes_direct() -> None:
    state, _ = derive(cluster())
    waypoint_ip = workload(state, "waypoint").workload_ips[0]
    web_ip = workload(state, "web-1").workload_ips[0]
    up = _outbound(state, "client", "10.96.0.10:80")
    assert up.waypoint and up.address == SocketAddr(waypoint_ip, 15008)
    assert str(up.authority) == "10.96.0.10:80"
    assert up.expected_identities == (Identity("cluster.local", "shop", "waypoint"),)
    # Addressed to the pod IP, a service waypoint is not used (Istio's rule).
    direct = _outbound(state, "client", f"{web_ip}:8080")
    assert not direct.waypoint and direct.address == SocketAddr(web_ip, 15008)


@pytest.mark.parametrize(
    ("source", "allowed"),
    [
        ("spiffe://cluster.local/ns/shop/sa/waypoint", True),  # the implicit allow
        ("spiffe://cluster.local/ns/shop/sa/client", False),  # around the waypoint
    ],
)
def test_destination_allows_the_waypoint_and_judges_bypass_by_its_l4_policy(
    source: str, allowed: bool
) -> None:
    state, _ = derive(cluster(web_policy=ONLY_NOBODY))
    store = store_of(state)
    web_ip = workload(state, "web-1").workload_ips[0]
    result = explain_connection(store, source, f"{web_ip}:8080")
    (decision,) = result["results"]
    assert decision["decision"]["allowed"] is allowed, decision["explanation"]


@pytest.mark.parametrize(
    ("auto_allow", "client_allowed"),
    [(True, False), (False, True)],
)
def test_the_implicit_allow_refuses_bypass_only_with_istiods_flag(
    auto_allow: bool, client_allowed: bool
) -> None:
    # No user L4 policy on web: with PILOT_AUTO_ALLOW_WAYPOINT_POLICY the implicit ALLOW is
    # the only ALLOW, so a client dialling the pod around the waypoint is refused; without
    # it (Istio's default) nothing refuses it.
    state, _ = derive(cluster(auto_allow=auto_allow))
    store = store_of(state)
    web_ip = workload(state, "web-1").workload_ips[0]
    for source, allowed in (
        ("spiffe://cluster.local/ns/shop/sa/client", client_allowed),
        ("spiffe://cluster.local/ns/shop/sa/waypoint", True),
    ):
        result = explain_connection(store, source, f"{web_ip}:8080")
        assert result["results"][0]["decision"]["allowed"] is allowed, (source, result)
    keys = workload(state, "web-1").authorization_policies
    assert bool(keys) is auto_allow
    assert any(p.name.startswith("istio_allow_waypoint") for p in state.policies) is auto_allow


def test_istiod_flags_are_parsed_strictly() -> None:
    with pytest.raises(ConfigError, match=r"istiod\.PILOT_AUTO_ALLOW_WAYPOINT_POLICY"):
        loads_spec("nodes: [n1]\nistiod: {PILOT_AUTO_ALLOW_WAYPOINT_POLICY: 'yes'}\n")
    with pytest.raises(ConfigError, match=r"istiod\.OTHER"):
        loads_spec("nodes: [n1]\nistiod: {OTHER: true}\n")


def test_without_a_waypoint_no_implicit_allow_exists() -> None:
    ns = "{istio.io/dataplane-mode: ambient}"
    state, _ = derive(cluster(ns_labels=ns, web_policy=ONLY_NOBODY))
    store = store_of(state)
    web_ip = workload(state, "web-1").workload_ips[0]
    result = explain_connection(
        store, "spiffe://cluster.local/ns/shop/sa/waypoint", f"{web_ip}:8080"
    )
    assert result["results"][0]["decision"]["allowed"] is False


def test_targetref_policies_stay_out_of_the_agents_l4_enforcement() -> None:
    deny_all = textwrap.indent(
        textwrap.dedent(
            """\
            - apiVersion: security.istio.io/v1
              kind: AuthorizationPolicy
              metadata: {name: l7-deny, namespace: shop}
              spec:
                targetRefs: [{kind: Service, group: "", name: web}]
                action: DENY
                rules: [{to: [{operation: {paths: [/admin]}}]}]
            """
        ),
        "",
    )
    state, warnings = derive(cluster(web_policy=deny_all))
    # As istiod: a policy bound to a waypoint is never sent to ztunnel (and is no error).
    assert all(p.name != "l7-deny" for p in state.policies)
    assert warnings == []
