"""ztunnel local-config YAML: the reference example, every field, and path-named errors."""

from __future__ import annotations

import json
from ipaddress import ip_address, ip_network
from pathlib import Path

import pytest
import yaml

from ztunnel.errors import ConfigError
from ztunnel.model.authorization import (
    Action,
    MatchKind,
    Scope,
    ServiceAccountMatch,
    StringMatch,
)
from ztunnel.model.workload import (
    AppTunnelProtocol,
    GatewayAddress,
    HealthPolicy,
    HealthStatus,
    LoadBalancerMode,
    Locality,
    NamespacedHostname,
    NetworkAddress,
    NetworkMode,
    TunnelProtocol,
    Visibility,
    WorkloadType,
)
from ztunnel.sources.dump import (
    local_config_to_dump,
    policy_to_dump,
    service_to_dump,
    workload_to_dump,
)
from ztunnel.sources.localconfig import LocalConfig, load_local_config, load_local_config_file

EXAMPLE = Path(__file__).parent.parent / "examples" / "localhost.yaml"

FULL = """
workloads:
- uid: c1//v1/Pod/ns1/a
  name: a
  namespace: ns1
  workloadIps: ["10.0.0.1", "fd00::1"]
  serviceAccount: sa-a
  trustDomain: td.example
  network: net1
  protocol: HBONE
  networkMode: HostNetwork
  node: node-1
  hostname: a.example
  waypoint: {destination: "ns1/wp.ns1.svc.cluster.local", hboneMtlsPort: 15008}
  networkGateway: {destination: "net2/10.9.9.9", hboneMtlsPort: 15009}
  nativeTunnel: true
  applicationTunnel: {protocol: PROXY, port: 15088}
  authorizationPolicies: [ns1/p1]
  status: Unhealthy
  clusterId: c1
  locality: {region: r, zone: z, subzone: s}
  canonicalName: app-a
  canonicalRevision: v2
  workloadName: a-deploy
  workloadType: Pod
  capacity: 3
  services:
    ns1/svc.ns1.svc.cluster.local: {80: 8080, 443: 0}
services:
- name: svc
  namespace: ns1
  hostname: svc.ns1.svc.cluster.local
  vips: [/10.96.0.1, "net1/fd00::96"]
  ports: {80: 8080, 443: 0}
  subjectAltNames: [spiffe://td.example/ns/ns1/sa/svc]
  waypoint: {destination: "/10.0.0.50", hboneMtlsPort: 15008}
  loadBalancer: {routingPreferences: [Network, Zone], mode: Failover, healthPolicy: AllowAll}
  ipFamilies: IPv4
  canonical: true
  visibility: Namespace
policies:
- name: p1
  namespace: ns1
  scope: WorkloadSelector
  action: Deny
  dryRun: true
  rules:
  - - - namespaces: [!Exact ns2]
        notNamespaces: [!Prefix kube-]
        principals: [!Suffix /sa/bad, !Presence []]
        notPrincipals:
        - !Presence
        serviceAccounts: [{namespace: ns2, serviceAccount: sa2}]
        notServiceAccounts: [{namespace: ns3, serviceAccount: sa3}]
        sourceIps: ["10.0.0.0/8", "192.168.1.7"]
        notSourceIps: ["10.1.0.0/16"]
        destinationIps: ["fd00::/64"]
        notDestinationIps: ["10.0.0.9"]
        destinationPorts: [80, 443]
        notDestinationPorts: [9999]
    - []
"""


def load(text: str) -> LocalConfig:
    return load_local_config(text, "test.yaml")


def error_of(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(text)
    assert info.value.source == "test.yaml"
    return info.value


# --- the reference example -----------------------------------------------------------------


def test_reference_example_loads_unchanged() -> None:
    cfg = load_local_config_file(EXAMPLE)
    local, tcp = cfg.workloads
    assert local.uid == "cluster1//v1/Pod/default/local"
    assert local.workload_ips == (ip_address("127.0.0.1"),)
    assert local.protocol is TunnelProtocol.HBONE
    assert tcp.protocol is TunnelProtocol.TCP
    assert local.services == {"default/example.com": {80: 8080}, "default/example2.com": {80: 8080}}
    svc, remote = cfg.services
    assert svc.vips == (NetworkAddress("", ip_address("127.10.0.1")),)
    assert remote.vips == (NetworkAddress("remote", ip_address("127.10.0.2")),)
    assert svc.ports == {80: 8080}
    assert set(svc.endpoints) == {local.uid, tcp.uid}
    assert svc.endpoints[tcp.uid].port == {80: 8080}
    (policy,) = cfg.policies
    assert (policy.key, policy.scope, policy.action) == (
        "default/deny-9999",
        Scope.NAMESPACE,
        Action.ALLOW,
    )
    assert policy.rules[0][0][0].not_destination_ports == (9999,)
    assert cfg.raw["policies"] == yaml.safe_load(EXAMPLE.read_text())["policies"]


def test_raw_document_is_json_serialisable_with_tags_rendered() -> None:
    raw = load(FULL).raw
    rendered = json.loads(json.dumps(raw))
    match = rendered["policies"][0]["rules"][0][0][0]
    assert match["namespaces"] == [{"Exact": "ns2"}]
    assert match["notPrincipals"] == [{"Presence": []}]


# --- every field -----------------------------------------------------------------------------


def test_every_workload_field_maps_to_the_model() -> None:
    (w,) = load(FULL).workloads
    assert w.workload_ips == (ip_address("10.0.0.1"), ip_address("fd00::1"))
    assert (w.service_account, w.trust_domain, w.network) == ("sa-a", "td.example", "net1")
    assert w.network_mode is NetworkMode.HOST_NETWORK
    assert (w.node, w.hostname, w.native_tunnel) == ("node-1", "a.example", True)
    assert w.waypoint == GatewayAddress(NamespacedHostname("ns1", "wp.ns1.svc.cluster.local"))
    assert w.network_gateway == GatewayAddress(
        NetworkAddress("net2", ip_address("10.9.9.9")), 15009
    )
    assert w.application_tunnel is not None
    assert (w.application_tunnel.protocol, w.application_tunnel.port) == (
        AppTunnelProtocol.PROXY,
        15088,
    )
    assert w.authorization_policies == ("ns1/p1",)
    assert w.status is HealthStatus.UNHEALTHY
    assert w.locality == Locality("r", "z", "s")
    assert (w.canonical_name, w.canonical_revision, w.workload_name) == ("app-a", "v2", "a-deploy")
    assert (w.workload_type, w.capacity, w.cluster_id) == (WorkloadType.POD, 3, "c1")
    assert w.services == {"ns1/svc.ns1.svc.cluster.local": {80: 8080, 443: 0}}


def test_every_service_field_maps_to_the_model_and_endpoints_come_from_workloads() -> None:
    cfg = load(FULL)
    (s,) = cfg.services
    assert s.key == "ns1/svc.ns1.svc.cluster.local"
    assert s.vips == (
        NetworkAddress("", ip_address("10.96.0.1")),
        NetworkAddress("net1", ip_address("fd00::96")),
    )
    assert s.ports == {80: 8080, 443: 0}
    assert s.subject_alt_names == ("spiffe://td.example/ns/ns1/sa/svc",)
    assert s.waypoint == GatewayAddress(NetworkAddress("", ip_address("10.0.0.50")))
    assert s.load_balancer is not None
    assert s.load_balancer.routing_preferences == ("Network", "Zone")
    assert s.load_balancer.mode is LoadBalancerMode.FAILOVER
    assert s.load_balancer.health_policy is HealthPolicy.ALLOW_ALL
    assert (s.ip_families, s.canonical, s.visibility) == ("IPv4", True, Visibility.NAMESPACE)
    ep = s.endpoints["c1//v1/Pod/ns1/a"]
    assert (ep.port, ep.status) == ({80: 8080, 443: 0}, HealthStatus.UNHEALTHY)


def test_every_match_key_maps_to_the_model() -> None:
    (p,) = load(FULL).policies
    assert (p.scope, p.action, p.dry_run) == (Scope.WORKLOAD_SELECTOR, Action.DENY, True)
    ((first, empty_clause),) = p.rules
    assert empty_clause == ()
    (m,) = first
    assert m.namespaces == (StringMatch(MatchKind.EXACT, "ns2"),)
    assert m.not_namespaces == (StringMatch(MatchKind.PREFIX, "kube-"),)
    assert m.principals == (
        StringMatch(MatchKind.SUFFIX, "/sa/bad"),
        StringMatch(MatchKind.PRESENCE),
    )
    assert m.not_principals == (StringMatch(MatchKind.PRESENCE),)
    assert m.service_accounts == (ServiceAccountMatch("ns2", "sa2"),)
    assert m.not_service_accounts == (ServiceAccountMatch("ns3", "sa3"),)
    assert m.source_ips == (ip_network("10.0.0.0/8"), ip_network("192.168.1.7/32"))
    assert m.not_source_ips == (ip_network("10.1.0.0/16"),)
    assert m.destination_ips == (ip_network("fd00::/64"),)
    assert m.not_destination_ips == (ip_network("10.0.0.9/32"),)
    assert (m.destination_ports, m.not_destination_ports) == ((80, 443), (9999,))


def test_defaults_uid_trust_domain_and_service_account() -> None:
    text = "workloads: [{name: web, namespace: shop, workloadIps: [], trustDomain: '', "
    (w,) = load(text + "serviceAccount: ''}]").workloads
    assert w.uid == "Kubernetes//v1/Pod/shop/web"
    assert (w.trust_domain, w.service_account) == ("cluster.local", "default")
    assert str(w.identity) == "spiffe://cluster.local/ns/shop/sa/default"
    assert (w.protocol, w.status, w.capacity, w.services) == (
        TunnelProtocol.TCP,
        HealthStatus.HEALTHY,
        1,
        {},
    )


@pytest.mark.parametrize("text", ["", "# only a comment\n", "{}"])
def test_empty_documents_are_an_empty_config(text: str) -> None:
    assert load(text) == LocalConfig(raw=load(text).raw)
    assert load(text).workloads == ()


# --- errors ----------------------------------------------------------------------------------

W = "workloads:\n- {{uid: u, namespace: ns, workloadIps: [10.0.0.1], {extra}}}\n"
WL = "workloads:\n- {uid: u, namespace: ns, workloadIps: [10.0.0.1]}\n"
P = "policies:\n- {{name: p, namespace: n, scope: Global, action: Allow, rules: [[[{match}]]]}}\n"
S = "services: [{{name: n, namespace: n, hostname: h, {extra}}}]"


@pytest.mark.parametrize(
    ("text", "field", "problem"),
    [
        (
            W.format(extra="bogus: 1"),
            "workloads[0].bogus",
            "unknown field 'bogus'; expected one of: uid,",
        ),
        (
            "workloads: [{uid: u, workloadIps: []}]",
            "workloads[0].namespace",
            "missing required field",
        ),
        (
            "workloads: [{uid: u, namespace: n}]",
            "workloads[0].workloadIps",
            "missing required field",
        ),
        ("workloads: [{namespace: n, workloadIps: []}]", "workloads[0].uid", "'name' to derive"),
        (
            WL + "- {uid: v, namespace: ns, workloadIps: [10.0.0.1, 10.0.0.300]}",
            "workloads[1].workloadIps[1]",
            "expected an IP address, got '10.0.0.300'",
        ),
        (W.format(extra="protocol: QUIC"), "workloads[0].protocol", "expected one of: TCP, HBONE"),
        (
            W.format(extra="status: Dead"),
            "workloads[0].status",
            "expected one of: Healthy, Unhealthy",
        ),
        (W.format(extra="networkMode: x"), "workloads[0].networkMode", "Standard, HostNetwork"),
        (
            W.format(extra="applicationTunnel: {protocol: X}"),
            "workloads[0].applicationTunnel.protocol",
            "NONE, PROXY",
        ),
        (
            W.format(extra="applicationTunnel: {port: 1}"),
            "workloads[0].applicationTunnel.protocol",
            "missing",
        ),
        (
            W.format(extra="workloadType: daemonset"),
            "workloads[0].workloadType",
            "deployment, cronjob, pod, job",
        ),
        (W.format(extra="capacity: -1"), "workloads[0].capacity", "in 0..4294967295"),
        (
            W.format(extra="nativeTunnel: 'yes'"),
            "workloads[0].nativeTunnel",
            "expected true or false",
        ),
        (W.format(extra="name: 7"), "workloads[0].name", "expected a string, got int 7"),
        (
            W.format(extra="services: {nohost: {80: 80}}"),
            "workloads[0].services['nohost']",
            "namespace/hostname",
        ),
        (
            W.format(extra="services: {ns/h: {0: 80}}"),
            "workloads[0].services['ns/h'][0]",
            "port in 1..65535",
        ),
        (
            W.format(extra="services: {ns/h: {80: 70000}}"),
            "workloads[0].services['ns/h'][80]",
            "0..65535",
        ),
        (
            W.format(extra="waypoint: {destination: nohost}"),
            "workloads[0].waypoint.destination",
            "network/IP",
        ),
        (
            W.format(extra="waypoint: {destination: a/b, port: 1}"),
            "workloads[0].waypoint.port",
            "unknown field",
        ),
        (
            W.format(extra="waypoint: {destination: a/b, hboneMtlsPort: 0}"),
            "workloads[0].waypoint.hboneMtlsPort",
            "1..65535",
        ),
        ("services: [{namespace: n, hostname: h}]", "services[0].name", "missing required field"),
        ("services: [{name: n, hostname: h}]", "services[0].namespace", "missing required field"),
        ("services: [{name: n, namespace: n}]", "services[0].hostname", "missing required field"),
        (
            "services: [{name: n, namespace: n, hostname: h, vips: [10.0.0.1]}]",
            "services[0].vips[0]",
            "'network/IP'",
        ),
        (
            "services: [{name: n, namespace: n, hostname: h, vips: [/nope]}]",
            "services[0].vips[0]",
            "valid IP",
        ),
        (
            "services: [{name: n, namespace: n, hostname: h, loadBalancer: {mode: Random}}]",
            "services[0].loadBalancer.mode",
            "Standard, UnspecifiedMode, Strict, Failover, Passthrough",
        ),
        (
            S.format(extra="loadBalancer: {routingPreferences: [Rack]}"),
            "services[0].loadBalancer.routingPreferences[0]",
            "Region, Zone",
        ),
        (
            "services: [{name: n, namespace: n, hostname: h, weightedWaypoints: []}]",
            "services[0].weightedWaypoints",
            "not supported",
        ),
        (
            "services: [{name: n, namespace: n, hostname: h, ipFamilies: V4}]",
            "services[0].ipFamilies",
            "Dual, IPv4, IPv6",
        ),
        (
            "policies: [{name: p, namespace: n, scope: Cluster, action: Allow}]",
            "policies[0].scope",
            "Global, Namespace, WorkloadSelector",
        ),
        (
            "policies: [{name: p, namespace: n, scope: Global, action: Audit}]",
            "policies[0].action",
            "Allow, Deny",
        ),
        (
            "policies: [{namespace: n, scope: Global, action: Allow}]",
            "policies[0].name",
            "missing required field",
        ),
        (
            P.format(match="sourceIps: [10.0.0.0/33]"),
            "policies[0].rules[0][0][0].sourceIps[0]",
            "expected a CIDR",
        ),
        (
            P.format(match="destinationPorts: [0]"),
            "policies[0].rules[0][0][0].destinationPorts[0]",
            "1..65535",
        ),
        (
            P.format(match="principals: [plain]"),
            "policies[0].rules[0][0][0].principals[0]",
            "!Exact x",
        ),
        (
            P.format(match="principals: [{Regex: x}]"),
            "policies[0].rules[0][0][0].principals[0]",
            "Exact, Prefix, Suffix, Presence",
        ),
        (
            P.format(match="serviceAccounts: [{namespace: a}]"),
            "policies[0].rules[0][0][0].serviceAccounts[0].serviceAccount",
            "missing",
        ),
        (
            P.format(match="notDestinationPort: [1]"),
            "policies[0].rules[0][0][0].notDestinationPort",
            "unknown field",
        ),
        ("workload: []", "workload", "expected one of: workloads, policies, services"),
        ("workloads: {a: 1}", "workloads", "expected a list"),
        ("- 1\n", "", "expected a mapping"),
    ],
)
def test_bad_config_names_the_field_and_the_expectation(
    text: str, field: str, problem: str
) -> None:
    err = error_of(text)
    assert err.field == field
    assert problem in err.problem
    assert field in str(err) and "test.yaml" in str(err)


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("workloads:\n  - uid: a\n   namespace: b\n", 3),
        ("policies:\n- rules: [[[{principals: [!Regex x]}]]]\n", 2),
        ("workloads: []\nworkloads: []\n", 2),
        ("policies: [{principals: [!Exact [a]]}]\n", 1),
    ],
)
def test_yaml_errors_report_the_line(text: str, line: int) -> None:
    err = error_of(text)
    assert err.field == ""
    assert f"line {line}," in err.problem


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="cannot read file") as info:
        load_local_config_file(missing)
    assert info.value.source == str(missing)


# --- dump round trip -------------------------------------------------------------------------


@pytest.mark.parametrize("source", [FULL, EXAMPLE.read_text()], ids=["full", "example"])
@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_dump_then_load_gives_equal_objects(source: str, fmt: str) -> None:
    cfg = load(source)
    doc = local_config_to_dump(cfg.workloads, cfg.services, cfg.policies)
    text = yaml.safe_dump(doc) if fmt == "yaml" else json.dumps(doc)
    again = load(text)
    assert (again.workloads, again.services, again.policies) == (
        cfg.workloads,
        cfg.services,
        cfg.policies,
    )


def test_dump_shapes_match_ztunnel_config_dump() -> None:
    cfg = load(FULL)
    w = workload_to_dump(cfg.workloads[0])
    assert w["workloadIps"] == ["10.0.0.1", "fd00::1"]
    assert w["waypoint"] == {"destination": "ns1/wp.ns1.svc.cluster.local", "hboneMtlsPort": 15008}
    assert (
        w["protocol"] == "HBONE"
        and w["networkMode"] == "HostNetwork"
        and w["status"] == "Unhealthy"
    )
    s = service_to_dump(cfg.services[0])
    assert s["vips"] == ["/10.96.0.1", "net1/fd00::96"]
    assert s["endpoints"] == {
        "c1//v1/Pod/ns1/a": {
            "workloadUid": "c1//v1/Pod/ns1/a",
            "port": {"80": 8080, "443": 0},
            "status": "Unhealthy",
        }
    }
    assert s["loadBalancer"] == {
        "routingPreferences": ["Network", "Zone"],
        "mode": "Failover",
        "healthPolicy": "AllowAll",
    }
    p = policy_to_dump(cfg.policies[0])
    assert (p["scope"], p["action"], p["dryRun"]) == ("WorkloadSelector", "Deny", True)
    m = p["rules"][0][0][0]  # type: ignore[index]
    assert m["namespaces"] == [{"Exact": "ns2"}]
    assert m["notPrincipals"] == [{"Presence": []}]
    assert m["sourceIps"] == ["10.0.0.0/8", "192.168.1.7/32"]
    assert m["serviceAccounts"] == [{"namespace": "ns2", "serviceAccount": "sa2"}]
    json.dumps([w, s, p])  # all JSON-ready


def test_workload_services_in_config_dump_list_form_are_accepted() -> None:
    (w,) = load(
        "workloads: [{uid: u, namespace: n, workloadIps: [], services: [n/h.example]}]"
    ).workloads
    assert w.services == {"n/h.example": {}}
