"""StateStore: indexes, endpoint consistency, policy lookup, versions and subscribers."""

from __future__ import annotations

from ipaddress import ip_address

from ztunnel.model.authorization import Action, Authorization, Scope
from ztunnel.model.workload import (
    Endpoint,
    HealthStatus,
    NamespacedHostname,
    NetworkAddress,
    NetworkMode,
    Service,
    TunnelProtocol,
    Visibility,
    Workload,
)
from ztunnel.state.store import Kind, StateStore

SVC_KEY = "ns/web.ns.svc.cluster.local"


def wl(name: str, ip: str, **kw: object) -> Workload:
    fields: dict[str, object] = {
        "uid": f"c//Pod/ns/{name}",
        "name": name,
        "namespace": "ns",
        "workload_ips": (ip_address(ip),),
        "protocol": TunnelProtocol.HBONE,
    }
    fields.update(kw)
    return Workload(**fields)  # type: ignore[arg-type]


def svc(name: str = "web", ns: str = "ns", vip: str = "10.96.0.1", **kw: object) -> Service:
    fields: dict[str, object] = {
        "name": name,
        "namespace": ns,
        "hostname": f"{name}.ns.svc.cluster.local",
        "vips": (NetworkAddress("", ip_address(vip)),),
        "ports": {80: 8080},
    }
    fields.update(kw)
    return Service(**fields)  # type: ignore[arg-type]


def policy(name: str, scope: Scope, ns: str = "ns") -> Authorization:
    return Authorization(name, ns, scope, Action.ALLOW)


def test_workload_indexes_by_ip_uid_and_name() -> None:
    store = StateStore()
    a = wl("a", "10.0.0.1", service_account="sa-a")
    other_net = wl("b", "10.0.0.1", network="net2")
    store.replace_all([a, other_net], [], [])
    assert store.workload_by_ip("10.0.0.1") == a
    assert store.workload_by_ip(ip_address("10.0.0.1"), "net2") == other_net
    assert store.workload_by_ip("::ffff:10.0.0.1") == a  # v4-mapped is canonicalised
    assert store.workload_by_ip("10.0.0.2") is None
    assert store.workload_by_uid(a.uid) == a
    assert store.find_workload("ns", "a") == a
    assert store.find_workload("ns", "a", service_account="sa-a") == a
    assert store.find_workload("ns", "a", service_account="other") is None


def test_upsert_replaces_old_indexes_and_remove_clears_them() -> None:
    store = StateStore()
    store.upsert_workload(wl("a", "10.0.0.1"))
    store.upsert_workload(wl("a", "10.0.0.2"))
    assert store.workload_by_ip("10.0.0.1") is None
    assert store.workload_by_ip("10.0.0.2") is not None
    assert store.remove_workload("c//Pod/ns/a") is True
    assert store.workload_by_ip("10.0.0.2") is None
    assert store.find_workload("ns", "a") is None
    assert store.remove_workload("c//Pod/ns/a") is False


def test_host_network_workloads_are_not_found_by_ip() -> None:
    store = StateStore()
    host = wl("node-agent", "192.168.0.10", network_mode=NetworkMode.HOST_NETWORK)
    store.upsert_workload(host)
    assert store.workload_by_ip("192.168.0.10") is None
    assert store.find_address("192.168.0.10") is None
    assert store.workload_by_uid(host.uid) == host


def test_shared_address_prefers_pod_then_hbone() -> None:
    store = StateStore()
    vm = wl("vm", "10.0.0.5", uid="c//WorkloadEntry/ns/vm")
    pod_tcp = wl("tcp", "10.0.0.5", protocol=TunnelProtocol.TCP)
    pod_hbone = wl("hbone", "10.0.0.5")
    store.replace_all([vm, pod_tcp], [], [])
    assert store.workload_by_ip("10.0.0.5") == pod_tcp
    store.upsert_workload(pod_hbone)
    assert store.workload_by_ip("10.0.0.5") == pod_hbone
    store.remove_workload(pod_hbone.uid)
    assert store.workload_by_ip("10.0.0.5") == pod_tcp


def test_endpoints_follow_workloads_both_ways() -> None:
    store = StateStore()
    a = wl("a", "10.0.0.1", services={SVC_KEY: {80: 8081}})
    store.upsert_workload(a)  # service not known yet: endpoint is staged
    assert store.staged_endpoints()[SVC_KEY][a.uid].port == {80: 8081}
    store.upsert_service(svc())
    assert set(store.service_by_vip("10.96.0.1").endpoints) == {a.uid}  # type: ignore[union-attr]
    assert store.staged_endpoints() == {}
    b = wl("b", "10.0.0.2", services={SVC_KEY: {}}, status=HealthStatus.UNHEALTHY)
    store.upsert_workload(b)
    endpoints = store.service_by_key(SVC_KEY).endpoints  # type: ignore[union-attr]
    assert endpoints[b.uid].status is HealthStatus.UNHEALTHY
    store.upsert_workload(wl("a", "10.0.0.1"))  # a leaves the service
    store.remove_workload(b.uid)
    assert store.service_by_key(SVC_KEY).endpoints == {}  # type: ignore[union-attr]


def test_service_upsert_ignores_given_endpoints_and_keeps_derived_ones() -> None:
    store = StateStore()
    a = wl("a", "10.0.0.1", services={SVC_KEY: {80: 8081}})
    stale = svc(endpoints={"ghost": Endpoint("ghost")})
    store.replace_all([a], [stale], [])
    assert set(store.service_by_key(SVC_KEY).endpoints) == {a.uid}  # type: ignore[union-attr]
    store.upsert_service(svc(ports={80: 9090}))
    got = store.service_by_key(SVC_KEY)
    assert got is not None and got.ports == {80: 9090} and set(got.endpoints) == {a.uid}


def test_service_lookup_by_vip_and_hostname_prefers_namespace_then_canonical() -> None:
    store = StateStore()
    mine = svc("web", ns="mine", canonical=False)
    canonical = svc("web", ns="zzz", canonical=True)
    plain = svc("web", ns="aaa", canonical=False)
    store.replace_all([], [plain, canonical, mine], [])
    host = "web.ns.svc.cluster.local"
    assert store.service_by_vip("10.96.0.1", prefer_namespace="mine") == store.service_by_key(
        f"mine/{host}"
    )
    assert store.service_by_vip("10.96.0.1") == store.service_by_key(f"zzz/{host}")
    assert store.service_by_hostname(host, prefer_namespace="mine") == store.service_by_key(
        f"mine/{host}"
    )
    assert store.service_by_vip("10.96.0.1", network="other") is None
    store.remove_service(f"zzz/{host}")
    assert store.service_by_vip("10.96.0.1") == store.service_by_key(f"aaa/{host}")


def test_namespace_visibility_hides_service_from_other_namespaces() -> None:
    store = StateStore()
    store.upsert_service(svc(visibility=Visibility.NAMESPACE))
    assert store.service_by_vip("10.96.0.1", prefer_namespace="other") is None
    assert store.service_by_vip("10.96.0.1", prefer_namespace="ns") is not None


def test_find_address_tries_workload_before_service() -> None:
    store = StateStore()
    a = wl("a", "10.0.0.1")
    store.replace_all([a], [svc(vip="10.0.0.1"), svc("other", vip="10.96.0.9")], [])
    assert store.find_address("10.0.0.1") == a
    found = store.find_address("10.96.0.9")
    assert isinstance(found, Service) and found.name == "other"
    assert store.find_address("10.9.9.9") is None


def test_find_hostname_tries_service_then_workload() -> None:
    store = StateStore()
    a = wl("a", "10.0.0.1", hostname="a.vm.example")
    store.replace_all([a], [svc()], [])
    assert store.find_hostname(NamespacedHostname("ns", "web.ns.svc.cluster.local")) == (
        store.service_by_key(SVC_KEY)
    )
    assert store.find_hostname(NamespacedHostname("ns", "a.vm.example")) == a
    assert store.find_hostname(NamespacedHostname("other", "a.vm.example")) is None


def test_policies_for_combines_namespace_global_and_selected() -> None:
    store = StateStore()
    ns_pol = policy("ns-wide", Scope.NAMESPACE)
    other_ns = policy("elsewhere", Scope.NAMESPACE, ns="other")
    glob = policy("mesh", Scope.GLOBAL, ns="istio-system")
    selected = policy("selected", Scope.WORKLOAD_SELECTOR)
    unselected = policy("unselected", Scope.WORKLOAD_SELECTOR)
    store.replace_all([], [], [ns_pol, other_ns, glob, selected, unselected])
    a = wl("a", "10.0.0.1", authorization_policies=("ns/selected", "ns/missing"))
    assert store.policies_for(a) == [ns_pol, glob, selected]
    store.remove_policy("istio-system/mesh")
    store.upsert_policy(policy("ns-wide", Scope.WORKLOAD_SELECTOR))  # scope change re-indexes
    assert store.policies_for(a) == [selected]


def test_dumps_are_sorted() -> None:
    store = StateStore()
    store.replace_all(
        [wl("b", "10.0.0.2"), wl("a", "10.0.0.1")],
        [svc("z", vip="10.96.0.2"), svc("a")],
        [policy("z", Scope.NAMESPACE), policy("a", Scope.NAMESPACE)],
    )
    assert [w.name for w in store.workloads()] == ["a", "b"]
    assert [s.name for s in store.services()] == ["a", "z"]
    assert [p.name for p in store.policies()] == ["a", "z"]


def test_version_and_subscribers_see_each_change_once_consistent() -> None:
    store = StateStore()
    seen: list[tuple[frozenset[Kind], int, bool]] = []

    def on_change(kinds: frozenset[Kind]) -> None:
        # The store is already consistent when subscribers run.
        seen.append((kinds, store.version, store.service_by_key(SVC_KEY) is not None))

    unsubscribe = store.subscribe(on_change)
    store.replace_all([], [svc()], [])
    store.upsert_workload(wl("a", "10.0.0.1"))
    store.upsert_workload(wl("b", "10.0.0.2", services={SVC_KEY: {}}))
    store.upsert_policy(policy("p", Scope.NAMESPACE))
    assert store.remove_policy("ns/nope") is False
    store.remove_service(SVC_KEY)
    assert seen == [
        (frozenset(Kind), 1, True),
        (frozenset({Kind.WORKLOAD}), 2, True),
        (frozenset({Kind.WORKLOAD, Kind.SERVICE}), 3, True),
        (frozenset({Kind.POLICY}), 4, True),
        (frozenset({Kind.SERVICE}), 5, False),
    ]
    unsubscribe()
    store.upsert_policy(policy("q", Scope.NAMESPACE))
    assert len(seen) == 5 and store.version == 6
