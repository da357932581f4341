"""The enrollment annotation as enrollment goes (``Annotator``), against the fake API server:
one patch per change, none for pods that already show it or are gone, retries with
backoff that never hold enrollment up, and the newest wish winning over a stale view."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx2
import trio
from structlog.testing import capture_logs

from ztunnel.model.pod import REDIRECTION_ANNOTATION, Pod
from ztunnel.sources.kubernetes.annotate import Annotator
from ztunnel.sources.kubernetes.client import ApiClient
from ztunnel.sources.kubernetes.protocol import JSON, PODS
from ztunnel.sources.kubernetes.reflector import Backoff
from ztunnel.testing.k8s_fake import FakeApiServer, pod, running

UID = "0a0a0a0a-0000-4000-8000-00000000000a"
STATUS_PATH = "/api/v1/namespaces/mesh/pods/a/status"


class View:
    """The pods as the source last saw them: the server's, unless a test freezes it."""

    def __init__(self, server: FakeApiServer) -> None:
        self.server = server
        self.frozen: dict[str, JSON | None] | None = None

    def lookup(self, namespace: str, name: str) -> JSON | None:
        if self.frozen is not None:
            return self.frozen.get(f"{namespace}/{name}")
        return self.server.get(PODS, namespace, name)


@asynccontextmanager
async def annotator_for(
    server: FakeApiServer, retry: float = 0.05
) -> AsyncIterator[tuple[Annotator, View]]:
    # The client closes after the nursery exits: closed inside it, an already runnable
    # task could send on a closed client before its cancellation is delivered.
    async with (
        running(server),
        httpx2.AsyncClient(base_url=server.url) as http,
        trio.open_nursery() as nursery,
    ):
        client = ApiClient(http)
        view = View(server)
        backoff = Backoff(initial=retry, cap=4 * retry, rng=random.Random(3))
        annotator = Annotator(client, view.lookup, backoff=backoff)
        await nursery.start(annotator.run)
        try:
            yield annotator, view
        finally:
            nursery.cancel_scope.cancel()


def mesh_pod(**fields: Any) -> Pod:
    return Pod("Kubernetes//Pod/mesh/a", "a", "mesh", in_mesh=True, k8s_uid=UID, **fields)


def annotation(server: FakeApiServer) -> str | None:
    obj = server.get(PODS, "mesh", "a")
    assert obj is not None
    value = (obj["metadata"].get("annotations") or {}).get(REDIRECTION_ANNOTATION)
    return None if value is None else str(value)


def patches(server: FakeApiServer) -> list[str]:
    return [r.path for r in server.requests if r.method == "PATCH"]


async def settle(annotator: Annotator) -> None:
    """Until every wish is written (or dropped)."""
    with trio.fail_after(10):
        while annotator.dump()["pending"]:  # noqa: ASYNC110 - polling the service's state
            await trio.sleep(0.01)


async def test_enrolled_then_left_patches_the_status_subresource_once_each() -> None:
    server = FakeApiServer()
    server.apply(pod("a", "mesh", uid=UID))
    async with annotator_for(server) as (annotator, _):
        annotator.enrolled(mesh_pod(), None)
        await settle(annotator)
        assert annotation(server) == "enabled"
        assert patches(server) == [STATUS_PATH]
        (request,) = [r for r in server.requests if r.method == "PATCH"]
        assert request.headers["content-type"] == "application/merge-patch+json"
        # Enrolled again (a recreated sandbox): the pod shows it already.
        annotator.enrolled(mesh_pod(), None)
        await settle(annotator)
        assert patches(server) == [STATUS_PATH]
        annotator.left(mesh_pod())
        await settle(annotator)
        assert annotation(server) is None
        assert patches(server) == [STATUS_PATH, STATUS_PATH]
        assert annotator.dump()["writes"] == 2


async def test_failed_starts_write_nothing() -> None:
    server = FakeApiServer()
    server.apply(pod("a", "mesh", uid=UID))
    async with annotator_for(server) as (annotator, _):
        annotator.enrolled(mesh_pod(), "failure to start proxy: bind failed")
        await trio.sleep(0.2)
        assert patches(server) == [] and annotation(server) is None


async def test_an_agent_restart_rewrites_nothing_the_pods_already_show() -> None:
    server = FakeApiServer()
    server.apply(pod("a", "mesh", uid=UID, annotations={REDIRECTION_ANNOTATION: "enabled"}))
    async with annotator_for(server) as (annotator, _):
        annotator.enrolled(mesh_pod(), None)
        await settle(annotator)
        assert patches(server) == []


async def test_gone_pods_and_namesakes_are_left_alone() -> None:
    server = FakeApiServer()
    async with annotator_for(server) as (annotator, _):
        annotator.left(mesh_pod())  # deleted: un-enrolled because it is gone
        annotator.enrolled(mesh_pod(), None)
        await settle(annotator)
        # A new pod under the same name (a StatefulSet's): not the one enrollment saw.
        server.apply(pod("a", "mesh", uid="0b0b0b0b-0000-4000-8000-00000000000b"))
        annotator.enrolled(mesh_pod(), None)
        await settle(annotator)
        assert patches(server) == []


async def test_a_pod_deleted_while_the_patch_is_on_its_way_is_no_error() -> None:
    server = FakeApiServer()
    async with annotator_for(server) as (annotator, view):
        view.frozen = {"mesh/a": pod("a", "mesh", uid=UID)}  # the source has not seen it go
        with capture_logs() as logs:
            annotator.enrolled(mesh_pod(), None)
            await settle(annotator)
        assert patches(server) == [STATUS_PATH]  # answered 404
        assert annotator.dump()["failures"] == 0
        assert not [e for e in logs if e["log_level"] == "warning"]


async def test_api_errors_are_retried_with_backoff() -> None:
    server = FakeApiServer()
    server.apply(pod("a", "mesh", uid=UID))
    server.fail_next(STATUS_PATH, 500)
    server.fail_next(STATUS_PATH, 403, "Forbidden")
    async with annotator_for(server) as (annotator, _):
        with capture_logs() as logs:
            annotator.enrolled(mesh_pod(), None)
            await settle(annotator)
        assert annotation(server) == "enabled"
        assert patches(server) == [STATUS_PATH] * 3
        warned = [e for e in logs if e["event"].startswith("cannot write the enrollment")]
        assert [e["error"].split(":")[0] for e in warned] == ["500 InternalError", "403 Forbidden"]
        assert annotator.dump()["failures"] == 2


async def test_an_unreachable_api_server_holds_the_wish_until_it_is_back() -> None:
    server = FakeApiServer()
    server.apply(pod("a", "mesh", uid=UID))
    async with annotator_for(server) as (annotator, _):
        await server.stop()
        annotator.enrolled(mesh_pod(), None)
        await trio.sleep(0.5)
        dump = annotator.dump()
        assert dump["pending"] == {"mesh/a": "enabled"} and dump["failures"] >= 2
        assert "ConnectError" in (dump["lastError"] or "")
        await server.start()
        await settle(annotator)
        assert annotation(server) == "enabled"


async def test_the_newest_wish_wins_over_a_stale_view() -> None:
    server = FakeApiServer()
    server.apply(pod("a", "mesh", uid=UID))
    async with annotator_for(server) as (annotator, view):
        annotator.enrolled(mesh_pod(), None)
        await settle(annotator)
        annotator.left(mesh_pod())
        await settle(annotator)
        assert annotation(server) is None
        # Back in the mesh before the source saw the removal: its view still shows the
        # annotation, but our own last write removed it, so it is written again.
        view.frozen = {
            "mesh/a": pod("a", "mesh", uid=UID, annotations={REDIRECTION_ANNOTATION: "enabled"})
        }
        annotator.enrolled(mesh_pod(), None)
        await settle(annotator)
        assert annotation(server) == "enabled"
        assert len(patches(server)) == 3


async def test_a_wish_that_changes_during_a_failing_write_is_written_at_once() -> None:
    server = FakeApiServer()
    server.apply(pod("a", "mesh", uid=UID, annotations={REDIRECTION_ANNOTATION: "enabled"}))
    server.delay = 0.3
    server.fail_next(STATUS_PATH, 500)
    async with annotator_for(server, retry=60.0) as (annotator, _):
        annotator.left(mesh_pod())
        await trio.sleep(0.1)  # the removal is on its way (and will fail)
        annotator.enrolled(mesh_pod(), None)
        await settle(annotator)
        # The failed removal is not retried: the pod is enrolled again, and shows it.
        assert annotation(server) == "enabled"
        assert patches(server) == [STATUS_PATH]
