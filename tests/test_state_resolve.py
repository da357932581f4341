"""Outbound and inbound resolution: every branch, table-driven, with a seeded rng."""

from __future__ import annotations

import random
from collections import Counter
from ipaddress import ip_address
from pathlib import Path

import pytest

from ztunnel.model.address import Authority, SocketAddr, parse_authority
from ztunnel.model.identity import Identity
from ztunnel.model.ports import AgentPorts
from ztunnel.model.workload import (
    ApplicationTunnel,
    AppTunnelProtocol,
    GatewayAddress,
    HealthPolicy,
    HealthStatus,
    LoadBalancer,
    LoadBalancerMode,
    Locality,
    NamespacedHostname,
    NetworkAddress,
    Service,
    TunnelProtocol,
    Workload,
)
from ztunnel.sources.localconfig import load_local_config_file
from ztunnel.state.resolve import (
    HboneUpstream,
    IPMismatch,
    NoHealthyUpstream,
    NoHostname,
    NoPortForServices,
    NoValidDestination,
    Passthrough,
    ResolveError,
    SelfCall,
    TcpUpstream,
    UnknownServicePort,
    UnknownWaypoint,
    expected_identities,
    resolve_inbound,
    resolve_outbound,
)
from ztunnel.state.store import StateStore
from ztunnel.waypoint.backends import workload_endpoint

WEB = "ns/web.ns.svc.cluster.local"
WP_SVC = "ns/wp.ns.svc.cluster.local"
WP_HOST = GatewayAddress(NamespacedHostname("ns", "wp.ns.svc.cluster.local"))


def ip(text: str) -> object:
    return ip_address(text)


def sa(host: str, port: int) -> SocketAddr:
    return SocketAddr.of(host, port)


def inbound(store: StateStore, local: Workload, host: str, port: int, dst: str) -> object:
    """resolve_inbound for the authority ``host:port`` arriving on ``dst``."""
    authority: Authority = parse_authority(f"{host}:{port}")
    return resolve_inbound(store, local, authority, ip_address(dst), agent_ports=AgentPorts())


def wl(name: str, *ips: str, **kw: object) -> Workload:
    fields: dict[str, object] = {
        "uid": f"c//Pod/ns/{name}",
        "name": name,
        "namespace": "ns",
        "service_account": name,
        "workload_ips": tuple(ip_address(i) for i in ips),
        "protocol": TunnelProtocol.HBONE,
    }
    fields.update(kw)
    return Workload(**fields)  # type: ignore[arg-type]


def svc(name: str, *vips: str, **kw: object) -> Service:
    fields: dict[str, object] = {
        "name": name,
        "namespace": "ns",
        "hostname": f"{name}.ns.svc.cluster.local",
        "vips": tuple(NetworkAddress("", ip_address(v)) for v in vips),
        "ports": {80: 8080},
    }
    fields.update(kw)
    return Service(**fields)  # type: ignore[arg-type]


CLIENT = wl("client", "10.0.1.1")
WAYPOINT = wl("waypoint", "10.0.5.1", services={WP_SVC: {}})


def world(*extra_workloads: Workload, services: tuple[Service, ...] = ()) -> StateStore:
    store = StateStore()
    base = (
        CLIENT,
        WAYPOINT,
        wl("a", "10.0.0.1", services={WEB: {}}),
        wl("b", "10.0.0.2", "fd00::2", protocol=TunnelProtocol.TCP, services={WEB: {80: 9090}}),
        wl("walled", "10.0.0.7", waypoint=WP_HOST),
        wl("dual", "10.0.0.8", "fd00::8", services={"ns/dual.ns.svc.cluster.local": {}}),
    )
    store.replace_all(
        base + extra_workloads,
        (
            svc("web", "10.96.0.1"),
            svc(
                "wp",
                "10.96.0.5",
                ports={15008: 15008},
                subject_alt_names=("spiffe://cluster.local/ns/ns/sa/wp-svc",),
            ),
            svc("waypointed", "10.96.0.6", waypoint=WP_HOST),
            svc(
                "wp-by-ip",
                "10.96.0.7",
                waypoint=GatewayAddress(NetworkAddress("", ip_address("10.0.5.1")), 15019),
            ),
            svc(
                "wp-missing", "10.96.0.8", waypoint=GatewayAddress(NamespacedHostname("ns", "gone"))
            ),
            svc("pass", "10.96.0.9", load_balancer=LoadBalancer(mode=LoadBalancerMode.PASSTHROUGH)),
            svc("dual", "10.96.0.10", "fd00::10"),
            svc("v4only", "fd00::11", ip_families="IPv4"),
            *services,
        ),
        [],
    )
    return store


def out(
    store: StateStore, dst: str, port: int, source: Workload | None = CLIENT, seed: int = 0
) -> object:
    return resolve_outbound(store, source, sa(dst, port), rng=random.Random(seed))


def ident(sa: str) -> Identity:
    return Identity("cluster.local", "ns", sa)


# --- outbound: table of branches -------------------------------------------------------------


@pytest.mark.parametrize(
    ("dst", "port", "expected"),
    [
        pytest.param("10.9.9.9", 443, Passthrough(sa("10.9.9.9", 443)), id="unknown-address"),
        pytest.param("10.96.0.9", 80, Passthrough(sa("10.96.0.9", 80)), id="passthrough-service"),
        pytest.param(
            "10.0.0.1",
            8000,
            HboneUpstream(
                wl("a", "10.0.0.1", services={WEB: {}}),
                None,
                sa("10.0.0.1", 15008),
                sa("10.0.0.1", 8000),
                (ident("a"),),
            ),
            id="hbone-workload",
        ),
        pytest.param(
            "10.0.0.2",
            8000,
            TcpUpstream(
                wl(
                    "b",
                    "10.0.0.2",
                    "fd00::2",
                    protocol=TunnelProtocol.TCP,
                    services={WEB: {80: 9090}},
                ),
                None,
                sa("10.0.0.2", 8000),
            ),
            id="tcp-workload",
        ),
        pytest.param("fd00::2", 81, "fd00::2", id="addressed-ip-is-kept"),
    ],
)
def test_outbound_direct_branches(dst: str, port: int, expected: object) -> None:
    got = out(world(), dst, port)
    if isinstance(expected, str):
        assert isinstance(got, TcpUpstream) and got.address == sa(expected, port)
    else:
        assert got == expected


def test_service_vip_picks_endpoint_and_maps_target_port() -> None:
    store = world()
    picks = {out(store, "10.96.0.1", 80, seed=s).address for s in range(40)}  # type: ignore[attr-defined]
    # a (HBONE): dial 15008, port from service; b (TCP): endpoint port map wins (9090).
    assert picks == {sa("10.0.0.1", 15008), sa("10.0.0.2", 9090)}
    for seed in range(40):
        got = out(store, "10.96.0.1", 80, seed=seed)
        if isinstance(got, HboneUpstream):
            assert got.authority == sa("10.0.0.1", 8080)
            assert got.service is not None and got.service.key == WEB
            assert got.expected_identities == (ident("a"),)
            assert got.authority_header == "10.0.0.1:8080"


def test_weighted_selection_follows_capacity() -> None:
    store = StateStore()
    store.replace_all(
        [
            wl("light", "10.0.0.1", capacity=1, services={WEB: {}}),
            wl("heavy", "10.0.0.2", capacity=3, services={WEB: {}}),
        ],
        [svc("web", "10.96.0.1")],
        [],
    )
    rng = random.Random(42)
    counts = Counter(
        resolve_outbound(store, CLIENT, sa("10.96.0.1", 80), rng=rng).workload.name  # type: ignore[union-attr]
        for _ in range(4000)
    )
    assert 0.22 < counts["light"] / 4000 < 0.28
    assert 0.72 < counts["heavy"] / 4000 < 0.78


@pytest.mark.parametrize(
    ("health_policy", "expected"),
    [(HealthPolicy.ONLY_HEALTHY, {"a"}), (HealthPolicy.ALLOW_ALL, {"a", "sick"})],
)
def test_unhealthy_endpoints_are_excluded_unless_allow_all(
    health_policy: HealthPolicy, expected: set[str]
) -> None:
    store = StateStore()
    store.replace_all(
        [
            wl("a", "10.0.0.1", services={WEB: {}}),
            wl("sick", "10.0.0.2", status=HealthStatus.UNHEALTHY, services={WEB: {}}),
        ],
        [svc("web", "10.96.0.1", load_balancer=LoadBalancer(health_policy=health_policy))],
        [],
    )
    names = {out(store, "10.96.0.1", 80, seed=s).workload.name for s in range(60)}  # type: ignore[attr-defined]
    assert names == expected


@pytest.mark.parametrize(
    ("workloads", "service", "port", "error"),
    [
        pytest.param((), svc("web", "10.96.0.1"), 80, NoHealthyUpstream, id="no-endpoints"),
        pytest.param(
            (wl("sick", "10.0.0.1", status=HealthStatus.UNHEALTHY, services={WEB: {}}),),
            svc("web", "10.96.0.1"),
            80,
            NoHealthyUpstream,
            id="all-unhealthy",
        ),
        pytest.param(
            (wl("a", "10.0.0.1", services={WEB: {}}),),
            svc("web", "10.96.0.1"),
            81,
            UnknownServicePort,
            id="service-lacks-port",
        ),
        pytest.param(
            (wl("a", "10.0.0.1", services={WEB: {}}),),
            svc("web", "10.96.0.1", ports={80: 0}),
            80,
            NoHealthyUpstream,
            id="no-target-port-anywhere",
        ),
        pytest.param(
            (wl("noip", services={WEB: {}}),),
            svc("web", "10.96.0.1"),
            80,
            NoHealthyUpstream,
            id="endpoint-without-ip",
        ),
        pytest.param(
            (wl("far", "10.0.0.1", network="net2", services={WEB: {}}),),
            svc("web", "10.96.0.1"),
            80,
            NoValidDestination,
            id="other-network",
        ),
        pytest.param(
            (wl("zero", "10.0.0.1", capacity=0, services={WEB: {}}),),
            svc("web", "10.96.0.1"),
            80,
            NoHealthyUpstream,
            id="zero-capacity",
        ),
    ],
)
def test_service_resolution_errors(
    workloads: tuple[Workload, ...], service: Service, port: int, error: type[ResolveError]
) -> None:
    store = StateStore()
    store.replace_all(workloads, [service], [])
    with pytest.raises(error) as info:
        out(store, "10.96.0.1", port)
    assert info.value.reason == error.__name__ and info.value.status == 503


def test_endpoint_port_map_is_used_when_service_target_port_is_zero() -> None:
    store = StateStore()
    store.replace_all(
        [wl("a", "10.0.0.1", services={WEB: {80: 7070}})],
        [svc("web", "10.96.0.1", ports={80: 0})],
        [],
    )
    got = out(store, "10.96.0.1", 80)
    assert isinstance(got, HboneUpstream) and got.authority == sa("10.0.0.1", 7070)


@pytest.mark.parametrize(
    ("vip", "expected_ip"),
    [("10.96.0.10", "10.0.0.8"), ("fd00::10", "fd00::8"), ("fd00::11", "10.0.0.8")],
    ids=["v4-vip-v4-ip", "v6-vip-v6-ip", "ipv4-only-service"],
)
def test_ip_family_choice(vip: str, expected_ip: str) -> None:
    extra = wl(
        "dual2",
        "10.0.0.8",
        "fd00::8",
        uid="c//Pod/ns/dual",
        services={"ns/dual.ns.svc.cluster.local": {}, "ns/v4only.ns.svc.cluster.local": {}},
    )
    got = out(world(extra), vip, 80)
    assert isinstance(got, HboneUpstream) and got.address == sa(expected_ip, 15008)


# --- waypoints -------------------------------------------------------------------------------


def test_service_waypoint_by_hostname() -> None:
    got = out(world(), "10.96.0.6", 80)
    assert isinstance(got, HboneUpstream) and got.waypoint
    assert got.workload.name == "waypoint"
    assert got.address == sa("10.0.5.1", 15008)
    assert got.authority == sa("10.96.0.6", 80)  # the original VIP:port
    assert got.service is not None and got.service.name == "waypointed"
    assert got.expected_identities == (
        Identity.parse("spiffe://cluster.local/ns/ns/sa/wp-svc"),
        ident("waypoint"),
    )


def test_service_waypoint_by_address_uses_its_hbone_port() -> None:
    got = out(world(), "10.96.0.7", 80)
    assert isinstance(got, HboneUpstream) and got.waypoint
    assert got.address == sa("10.0.5.1", 15019)
    assert got.expected_identities == (ident("waypoint"),)


def test_unresolvable_waypoint_is_an_error() -> None:
    with pytest.raises(UnknownWaypoint):
        out(world(), "10.96.0.8", 80)


def test_workload_waypoint_applies_unless_source_is_the_waypoint() -> None:
    store = world()
    via = out(store, "10.0.0.7", 8080)
    assert isinstance(via, HboneUpstream) and via.waypoint and via.authority == sa("10.0.0.7", 8080)
    assert via.service is None
    direct = out(store, "10.0.0.7", 8080, source=WAYPOINT)
    assert isinstance(direct, HboneUpstream) and not direct.waypoint
    assert direct.address == sa("10.0.0.7", 15008)


def test_workload_waypoint_is_skipped_when_service_addressed() -> None:
    walled = wl(
        "walled", "10.0.0.7", waypoint=WP_HOST, services={"ns/walled.ns.svc.cluster.local": {}}
    )
    store = world(walled, services=(svc("walled", "10.96.0.20"),))
    got = out(store, "10.96.0.20", 80)
    assert isinstance(got, HboneUpstream) and not got.waypoint and got.workload.name == "walled"


# --- locality --------------------------------------------------------------------------------


def _zoned(mode: LoadBalancerMode) -> StateStore:
    store = StateStore()
    near = wl("near", "10.0.0.1", locality=Locality("r", "z1"), services={WEB: {}})
    far = wl("far", "10.0.0.2", locality=Locality("r", "z2"), services={WEB: {}})
    lb = LoadBalancer(("Region", "Zone"), mode)
    store.replace_all([near, far], [svc("web", "10.96.0.1", load_balancer=lb)], [])
    return store


@pytest.mark.parametrize(
    ("mode", "zone", "expected"),
    [
        (LoadBalancerMode.FAILOVER, "z1", {"near"}),
        (LoadBalancerMode.FAILOVER, "z9", {"near", "far"}),
        (LoadBalancerMode.STRICT, "z2", {"far"}),
        (LoadBalancerMode.UNSPECIFIED, "z1", {"near", "far"}),
    ],
)
def test_locality_ranking(mode: LoadBalancerMode, zone: str, expected: set[str]) -> None:
    src = wl("client", "10.0.1.1", locality=Locality("r", zone))
    names = {
        out(_zoned(mode), "10.96.0.1", 80, source=src, seed=s).workload.name for s in range(40)
    }  # type: ignore[attr-defined]
    assert names == expected


def test_strict_locality_without_a_match_has_no_upstream() -> None:
    src = wl("client", "10.0.1.1", locality=Locality("other", "z1"))
    with pytest.raises(NoHealthyUpstream):
        out(_zoned(LoadBalancerMode.STRICT), "10.96.0.1", 80, source=src)


# --- the reference example -------------------------------------------------------------------


def test_localhost_example_service_reaches_hbone_or_tcp_on_8080() -> None:
    cfg = load_local_config_file(Path(__file__).parent.parent / "examples" / "localhost.yaml")
    store = StateStore()
    store.replace_all(cfg.workloads, cfg.services, cfg.policies)
    source = store.find_workload("default", "local")
    rng = random.Random(7)
    seen = set()
    for _ in range(50):
        got = resolve_outbound(store, source, sa("127.10.0.1", 80), rng=rng)
        if isinstance(got, HboneUpstream):
            assert (got.address, got.authority) == (
                sa("127.0.0.1", 15008),
                sa("127.0.0.1", 8080),
            )
            assert (
                Identity.parse("spiffe://cluster.local/ns/default/sa/local")
                in got.expected_identities
            )
            seen.add("hbone")
        else:
            assert isinstance(got, TcpUpstream) and got.address == sa("127.0.0.2", 8080)
            seen.add("tcp")
    assert seen == {"hbone", "tcp"}


# --- inbound ---------------------------------------------------------------------------------

POD_A = wl("a", "10.0.0.1", services={WEB: {}})
POD_B = wl("b", "10.0.0.2", "fd00::2", protocol=TunnelProtocol.TCP, services={WEB: {80: 9090}})


@pytest.mark.parametrize(
    ("local", "host", "port", "dst", "expected_port", "service"),
    [
        pytest.param(POD_A, "10.0.0.1", 8080, "10.0.0.1", 8080, None, id="ip-authority"),
        pytest.param(POD_B, "[fd00::2]", 8080, "fd00::2", 8080, None, id="ipv6-authority"),
        pytest.param(
            POD_A, "web.ns.svc.cluster.local", 80, "10.0.0.1", 8080, WEB, id="host-service-port"
        ),
        pytest.param(
            POD_B, "web.ns.svc.cluster.local", 80, "10.0.0.2", 9090, WEB, id="host-endpoint-port"
        ),
    ],
)
def test_inbound_targets(
    local: Workload, host: str, port: int, dst: str, expected_port: int, service: str | None
) -> None:
    got = inbound(world(), local, host, port, dst)
    assert got.port == got.connect_port == expected_port
    assert (got.service.key if got.service else None) == service


@pytest.mark.parametrize(
    ("host", "port", "dst", "error", "status"),
    [
        pytest.param("10.0.0.9", 8080, "10.0.0.1", IPMismatch, 400, id="ip-mismatch"),
        pytest.param("nowhere.example", 80, "10.0.0.1", NoHostname, 503, id="unknown-host"),
        pytest.param(
            "web.ns.svc.cluster.local", 81, "10.0.0.1", NoPortForServices, 503, id="no-port"
        ),
        pytest.param("10.0.0.1", 15008, "10.0.0.1", SelfCall, 503, id="self-call-ip"),
        pytest.param("10.0.0.1", 15001, "10.0.0.1", SelfCall, 503, id="self-call-outbound-port"),
    ],
)
def test_inbound_errors_carry_http_status(
    host: str, port: int, dst: str, error: type[ResolveError], status: int
) -> None:
    with pytest.raises(error) as info:
        inbound(world(), POD_A, host, port, dst)
    assert info.value.status == status


def test_inbound_hostname_resolving_to_an_illegal_port_is_a_self_call() -> None:
    store = world(services=(svc("loop", ports={80: 15006}),))
    with pytest.raises(SelfCall):
        inbound(store, POD_A, "loop.ns.svc.cluster.local", 80, "10.0.0.1")


def test_inbound_ip_mismatch_allowed_for_app_tunnel_and_uses_its_port() -> None:
    tunnel = ApplicationTunnel(AppTunnelProtocol.PROXY, 15088)
    waypoint = wl("waypoint", "10.0.5.1", application_tunnel=tunnel)
    got = inbound(world(), waypoint, "10.96.0.6", 80, "10.0.5.1")
    assert (got.port, got.connect_port, got.application_tunnel) == (80, 15088, tunnel)


def test_inbound_ip_mismatch_allowed_when_target_uses_us_as_waypoint() -> None:
    store = world()
    got = inbound(store, WAYPOINT, "10.0.0.7", 8080, "10.0.5.1")  # walled -> waypoint
    assert got.port == 8080
    with pytest.raises(IPMismatch):  # a's waypoint is not us
        inbound(store, WAYPOINT, "10.0.0.1", 8080, "10.0.5.1")


def test_expected_identities_are_valid_sans_then_the_workload_for_agent_and_waypoint() -> None:
    w = wl("web-1", "10.0.0.9")
    sans = (
        "spiffe://cluster.local/ns/ns/sa/web",
        "not-a-spiffe-id",
        "spiffe://cluster.local/ns/ns/sa/web-1",
    )
    expected = (Identity("cluster.local", "ns", "web"), w.identity)
    assert w.identity == Identity("cluster.local", "ns", "web-1")  # listed once although also a SAN
    assert expected_identities(w, sans) == expected
    endpoint = workload_endpoint(w, 8080, sans)  # the waypoint's upstream check
    assert endpoint is not None and endpoint.identities == expected
