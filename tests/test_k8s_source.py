"""The Kubernetes pod source against the in-process API server: initial list, changes,
namespace label flips, 410 relists, dropped watches, restarts, slow answers, paging,
bookmarks, missing CRDs, policies, netns discovery and the enrollment annotation."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import httpx2
import pytest
import trio
from test_k8s_procfs import FakeProc, cg

from ztunnel.model.pod import PodSnapshot
from ztunnel.model.workload import TunnelProtocol
from ztunnel.sources.kubernetes import ApiClient, KubernetesPodSource, Settings
from ztunnel.sources.kubernetes.annotate import annotate_enrolled, annotate_unenrolled
from ztunnel.sources.kubernetes.errors import KubeNotFound
from ztunnel.sources.kubernetes.procfs import ProcNetnsFinder
from ztunnel.sources.kubernetes.protocol import AUTHORIZATION_POLICIES, NAMESPACES, PODS
from ztunnel.sources.kubernetes.reflector import Backoff
from ztunnel.testing import k8s_fake as k
from ztunnel.testing.k8s_fake import FakeApiServer, namespace, pod, running, service

AMBIENT = {"istio.io/dataplane-mode": "ambient"}
UID_A = "0a0a0a0a-0000-4000-8000-00000000000a"
FAST = {
    "backoff": Backoff(initial=0.05, cap=0.2, rng=random.Random(7)),
    "watch_timeout": (30, 30),
    "read_slack": 5.0,
    "absent_recheck": 0.3,
}


class Follower:
    """Collects every snapshot the source yields, so tests can check all of them."""

    def __init__(self, source: KubernetesPodSource) -> None:
        self.source = source
        self.seen: list[PodSnapshot] = []
        self._new = trio.Event()

    async def run(self) -> None:
        async for snap in self.source:
            self.seen.append(snap)
            self._new.set()
            self._new = trio.Event()

    async def until(self, check: Callable[[PodSnapshot], bool]) -> PodSnapshot:
        with trio.fail_after(10):
            while not (self.seen and check(self.seen[-1])):
                await self._new.wait()
        return self.seen[-1]


def in_mesh(snap: PodSnapshot) -> set[str]:
    return {p.key for p in snap.pods if p.in_mesh}


def keys(snap: PodSnapshot) -> set[str]:
    return {p.key for p in snap.pods}


@asynccontextmanager
async def source_for(
    server: FakeApiServer, **kw: Any
) -> AsyncIterator[tuple[KubernetesPodSource, Follower]]:
    options = {**FAST, **kw.pop("reflector_options", {})}
    # The HTTP client closes only once the nursery has exited (as the agent does): closed
    # inside the cancelled nursery, a reflector that was already runnable (say mid-relist)
    # would reach its next request before any checkpoint and fail "client has been closed".
    async with (
        running(server),
        httpx2.AsyncClient(base_url=server.url) as http,
        trio.open_nursery() as nursery,
    ):
        client = ApiClient(http)
        src = KubernetesPodSource(
            client, kw.pop("settings", Settings(node_name="node1")), reflector_options=options, **kw
        )
        await nursery.start(src.run)
        follower = Follower(src)
        nursery.start_soon(follower.run)
        try:
            yield src, follower
        finally:
            nursery.cancel_scope.cancel()


def base_cluster(server: FakeApiServer) -> None:
    server.apply(namespace("mesh", AMBIENT))
    server.apply(namespace("plain"))
    server.apply(pod("a", "mesh", uid=UID_A, ip="10.244.1.10", labels={"app": "a"}))
    server.apply(pod("b", "plain", ip="10.244.1.11", labels={"app": "b"}))
    server.apply(pod("remote", "mesh", node="node2", ip="10.244.2.10", labels={"app": "a"}))
    server.apply(service("a", "mesh", selector={"app": "a"}))


async def test_initial_snapshot() -> None:
    server = FakeApiServer()
    base_cluster(server)
    async with source_for(server) as (_, follower):
        snap = await follower.until(lambda s: True)
    assert keys(snap) == {"mesh/a", "plain/b"}  # this node's pods only
    assert in_mesh(snap) == {"mesh/a"}
    assert snap.source == "kubernetes" and snap.state is not None
    uids = {w.uid for w in snap.state.workloads}
    assert "Kubernetes//Pod/mesh/remote" in uids  # every pod of the cluster is a workload
    (svc,) = snap.state.services
    assert svc.hostname == "a.mesh.svc.cluster.local"
    a = snap.pod("mesh/a")
    assert a is not None and a.k8s_uid == UID_A and a.ips == (ip_address("10.244.1.10"),)


async def test_adds_updates_deletes_and_namespace_label_flips() -> None:
    server = FakeApiServer()
    base_cluster(server)
    async with source_for(server) as (_, follower):
        await follower.until(lambda s: in_mesh(s) == {"mesh/a"})
        server.apply(pod("c", "plain", ip="10.244.1.12"))
        await follower.until(lambda s: "plain/c" in keys(s))
        # The namespace gets labelled: its running pods join at once.
        server.apply(namespace("plain", AMBIENT))
        await follower.until(lambda s: in_mesh(s) == {"mesh/a", "plain/b", "plain/c"})
        # A pod opts out.
        server.apply(
            pod("c", "plain", ip="10.244.1.12", labels={"istio.io/dataplane-mode": "none"})
        )
        await follower.until(lambda s: in_mesh(s) == {"mesh/a", "plain/b"})
        # The label goes: they leave.
        server.apply(namespace("plain"))
        await follower.until(lambda s: in_mesh(s) == {"mesh/a"})
        server.delete(PODS, "mesh", "a")
        snap = await follower.until(lambda s: "mesh/a" not in keys(s))
        assert snap.state is not None
        assert "Kubernetes//Pod/mesh/a" not in {w.uid for w in snap.state.workloads}


async def test_relist_after_410_keeps_pods_that_still_exist() -> None:
    server = FakeApiServer()
    base_cluster(server)
    async with source_for(server) as (src, follower):
        await follower.until(lambda s: in_mesh(s) == {"mesh/a"})
        pods = src.reflectors["pods"]
        lists_before = pods.lists
        # History is compacted and the watches drop: resuming is impossible, so relist.
        server.compact()
        server.apply(pod("d", "mesh", ip="10.244.1.13"))  # happens while nobody watches
        server.compact()
        await server.drop_watches()
        snap = await follower.until(lambda s: "mesh/d" in keys(s))
        assert pods.lists > lists_before
        assert in_mesh(snap) == {"mesh/a", "mesh/d"}
    # No snapshot along the way ever lost the pod that kept existing.
    assert all("mesh/a" in in_mesh(s) for s in follower.seen)


async def test_dropped_watches_resume_from_the_last_version_without_relisting() -> None:
    server = FakeApiServer()
    base_cluster(server)
    async with source_for(server) as (src, follower):
        await follower.until(lambda s: "mesh/a" in keys(s))
        lists = {name: r.lists for name, r in src.reflectors.items()}
        await server.drop_watches()
        server.apply(pod("e", "mesh", ip="10.244.1.14"))
        await follower.until(lambda s: "mesh/e" in keys(s))
        assert {name: r.lists for name, r in src.reflectors.items()} == lists
        assert src.reflectors["pods"].errors >= 1  # the cut stream was noticed


async def test_api_server_restart_loses_nothing() -> None:
    server = FakeApiServer()
    base_cluster(server)
    async with source_for(server) as (src, follower):
        await follower.until(lambda s: in_mesh(s) == {"mesh/a"})
        await server.stop()  # connection refused from here on
        server.apply(pod("f", "mesh", ip="10.244.1.15"))  # changes while the server is away
        await trio.sleep(0.5)
        assert src.reflectors["pods"].errors >= 1
        assert "mesh/f" not in keys(follower.seen[-1])
        await server.start()
        await follower.until(lambda s: "mesh/f" in keys(s))
    assert all("mesh/a" in in_mesh(s) for s in follower.seen)


async def test_bookmarks_keep_the_version_fresh() -> None:
    server = FakeApiServer(bookmark_interval=0.1)
    base_cluster(server)
    async with source_for(server) as (src, follower):
        await follower.until(lambda s: True)
        pods = src.reflectors["pods"]
        server.apply(namespace("other"))  # moves the global version; no pod changes
        newest = server.rv
        with trio.fail_after(5):
            while int(pods.store.resource_version) < newest:  # noqa: ASYNC110 (polls a counter)
                await trio.sleep(0.05)
        lists = pods.lists
        # Everything up to now is compacted: a watch resumed from the bookmark still works.
        server.compact()
        await server.drop_watches()
        server.apply(pod("g", "mesh", ip="10.244.1.16"))
        await follower.until(lambda s: "mesh/g" in keys(s))
        assert pods.lists == lists


async def test_watch_timeouts_rewatch_without_relist_or_error() -> None:
    server = FakeApiServer()
    base_cluster(server)
    async with source_for(server, reflector_options={"watch_timeout": (1, 1)}) as (src, follower):
        await follower.until(lambda s: True)
        await trio.sleep(2.5)
        pods = src.reflectors["pods"]
        assert pods.watches >= 3 and pods.lists == 1 and pods.errors == 0
        watch = [r for r in server.requests if r.path == "/api/v1/pods" and r.query.get("watch")]
        assert all(r.query["allowWatchBookmarks"] == "true" for r in watch)
        assert all(r.query["timeoutSeconds"] == "1" for r in watch)


async def test_slow_server_and_injected_errors() -> None:
    server = FakeApiServer()
    base_cluster(server)
    server.delay = 0.2
    server.fail_next("/api/v1/pods", 500)
    server.fail_next("/api/v1/namespaces", 429, "TooManyRequests")
    async with source_for(server) as (src, follower):
        snap = await follower.until(lambda s: True)
        assert in_mesh(snap) == {"mesh/a"}
        assert src.reflectors["pods"].errors == 1


async def test_paged_lists() -> None:
    server = FakeApiServer()
    server.apply(namespace("mesh", AMBIENT))
    for i in range(7):
        server.apply(pod(f"p{i}", "mesh", ip=f"10.244.1.{20 + i}"))
    async with source_for(server, reflector_options={"page_size": 3}) as (_, follower):
        snap = await follower.until(lambda s: True)
    assert len(snap.pods) == 7
    lists = [r for r in server.requests if r.path == "/api/v1/pods" and not r.query.get("watch")]
    assert [r.query.get("continue") is not None for r in lists] == [False, True, True]


async def test_istio_crds_absent_or_only_v1beta1() -> None:
    server = FakeApiServer(resources=k.CORE_RESOURCES)
    base_cluster(server)
    async with source_for(server) as (src, follower):
        snap = await follower.until(lambda s: True)
        assert snap.state is not None and snap.state.policies == ()
        assert src.reflectors["authorization_policies"].absent
    old = FakeApiServer(resources=(*k.CORE_RESOURCES, AUTHORIZATION_POLICIES[1]))
    base_cluster(old)
    deny = {"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["9999"]}}]}]}
    old.apply(k.authorization_policy("deny", "mesh", deny, version="v1beta1"))
    async with source_for(old) as (src, follower):
        snap = await follower.until(lambda s: True)
        assert snap.state is not None and [p.name for p in snap.state.policies] == ["deny"]
        assert src.reflectors["authorization_policies"].kind == AUTHORIZATION_POLICIES[1]


async def test_policies_are_translated_and_a_bad_one_keeps_the_last_good_set() -> None:
    server = FakeApiServer()
    base_cluster(server)
    deny = {"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["9999"]}}]}]}
    allow = {"selector": {"matchLabels": {"app": "a"}}, "action": "ALLOW", "rules": [{}]}
    server.apply(k.authorization_policy("deny", "mesh", deny))
    server.apply(k.authorization_policy("allow-a", "mesh", allow))
    server.apply(k.peer_authentication("strict", "mesh", {"mtls": {"mode": "STRICT"}}))
    async with source_for(server) as (_, follower):
        snap = await follower.until(lambda s: True)
        assert snap.state is not None
        names = {p.name for p in snap.state.policies}
        assert {"deny", "allow-a"} <= names and len(names) > 2  # + PeerAuthentication's
        a = next(w for w in snap.state.workloads if w.uid == "Kubernetes//Pod/mesh/a")
        assert "mesh/allow-a" in a.authorization_policies
        server.apply(k.authorization_policy("broken", "mesh", {"action": "DENY", "rules": "x"}))
        server.apply(pod("h", "mesh", ip="10.244.1.17"))
        snap = await follower.until(lambda s: "mesh/h" in keys(s))
        assert snap.state is not None
        assert {p.name for p in snap.state.policies} == names  # the last good set


async def test_netns_discovery_for_pods_entering_the_mesh(tmp_path: Path) -> None:
    fake = FakeProc(tmp_path)
    server = FakeApiServer()
    base_cluster(server)
    uid_b = "0b0b0b0b-0000-4000-8000-00000000000b"
    server.apply(pod("b", "plain", uid=uid_b, ip="10.244.1.11"))
    fake.add(500, cg(UID_A), netns="pod-a", ips=["10.244.1.10"], start=50)
    finder = ProcNetnsFinder(str(tmp_path))
    async with source_for(server, netns_finder=finder, netns_retry=0.1) as (_, follower):
        snap = await follower.until(lambda s: True)
        a, b = snap.pod("mesh/a"), snap.pod("plain/b")
        assert a is not None and a.netns is not None and a.netns.path == f"{tmp_path}/500/ns/net"
        assert b is not None and b.netns is None  # not in the mesh: not looked up
        server.apply(namespace("plain", AMBIENT))
        snap = await follower.until(lambda s: "plain/b" in in_mesh(s))
        b = snap.pod("plain/b")
        assert b is not None and b.netns is None  # its sandbox is not found yet
        fake.add(600, cg(uid_b), netns="pod-b", ips=["10.244.1.11"], start=60)
        snap = await follower.until(
            lambda s: (p := s.pod("plain/b")) is not None and p.netns is not None
        )


async def test_enrollment_annotation_round_trip() -> None:
    server = FakeApiServer()
    base_cluster(server)
    async with source_for(server) as (src, follower):
        await follower.until(lambda s: True)
        await annotate_enrolled(src.client, "mesh", "a")
        patch = server.requests[-1]
        assert patch.method == "PATCH" and patch.path == "/api/v1/namespaces/mesh/pods/a/status"
        assert patch.headers["content-type"] == "application/merge-patch+json"
        stored = server.get(PODS, "mesh", "a")
        assert stored is not None
        assert stored["metadata"]["annotations"] == {"ambient.istio.io/redirection": "enabled"}
        assert stored["metadata"]["labels"] == {"app": "a"}  # a merge patch touches nothing else

        def protocol(s: PodSnapshot) -> TunnelProtocol | None:
            assert s.state is not None
            return next(w.protocol for w in s.state.workloads if w.name == "a")

        await follower.until(lambda s: protocol(s) is TunnelProtocol.HBONE)
        await annotate_unenrolled(src.client, "mesh", "a")
        await follower.until(lambda s: protocol(s) is TunnelProtocol.TCP)
        stored = server.get(PODS, "mesh", "a")
        assert stored is not None and "ambient.istio.io/redirection" not in stored["metadata"].get(
            "annotations", {}
        )
        await annotate_unenrolled(src.client, "mesh", "gone")  # no such pod: nothing to do
        with pytest.raises(KubeNotFound):
            await annotate_enrolled(src.client, "mesh", "gone")


async def test_first_snapshot_waits_for_every_resource() -> None:
    server = FakeApiServer()
    base_cluster(server)
    # Namespaces cannot be listed for a while: without them "mesh/a" would look un-enrolled.
    for _ in range(3):
        server.fail_next(NAMESPACES.collection_path(), 503, "ServiceUnavailable")
    async with source_for(server) as (_, follower):
        await follower.until(lambda s: True)
    assert all(in_mesh(s) == {"mesh/a"} for s in follower.seen)


async def test_no_snapshot_before_the_policies_can_be_read() -> None:
    server = FakeApiServer()
    base_cluster(server)
    server.apply(k.authorization_policy("broken", "mesh", {"action": "DENY", "rules": "x"}))
    async with running(server), trio.open_nursery() as nursery:
        client = ApiClient(httpx2.AsyncClient(base_url=server.url))
        src = KubernetesPodSource(client, Settings(node_name="node1"), reflector_options=FAST)
        nursery.start_soon(src.run)
        await trio.sleep(1.0)
        # Publishing without the DENY it cannot read would open what it closes.
        assert src.latest is None
        server.delete(AUTHORIZATION_POLICIES[0], "mesh", "broken")
        with trio.fail_after(10):
            while src.latest is None:  # noqa: ASYNC110 (polls the published value)
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    await client.aclose()
