"""The list/watch formats, sans I/O: paths, parameters, pages, events, error Statuses."""

from __future__ import annotations

import contextlib
import json
import random
from typing import Any, cast

import pytest
import trio
import trio.testing

from ztunnel.sources.kubernetes.client import ApiClient
from ztunnel.sources.kubernetes.errors import (
    KubeApiError,
    KubeGone,
    KubeNotFound,
    KubeProtocolError,
    KubeUnavailable,
)
from ztunnel.sources.kubernetes.protocol import (
    AUTHORIZATION_POLICIES,
    ENDPOINT_SLICES,
    NAMESPACES,
    PODS,
    LineSplitter,
    ListPage,
    error_response,
    list_params,
    object_key,
    parse_list,
    parse_watch_line,
    watch_params,
)
from ztunnel.sources.kubernetes.reflector import Backoff, Reflector, Store
from ztunnel.testing.k8s_fake import status


def test_paths_follow_the_api_layout() -> None:
    assert PODS.collection_path() == "/api/v1/pods"
    assert PODS.collection_path("ns1") == "/api/v1/namespaces/ns1/pods"
    assert PODS.object_path("ns1", "p", "status") == "/api/v1/namespaces/ns1/pods/p/status"
    assert NAMESPACES.collection_path("ignored") == "/api/v1/namespaces"
    assert ENDPOINT_SLICES.collection_path() == "/apis/discovery.k8s.io/v1/endpointslices"
    assert AUTHORIZATION_POLICIES[1].api_version == "security.istio.io/v1beta1"


def test_list_and_watch_parameters() -> None:
    assert list_params(limit=500) == {"limit": "500"}
    assert list_params(limit=5, continue_token="t", field_selector="spec.nodeName=n1") == {
        "limit": "5",
        "continue": "t",
        "fieldSelector": "spec.nodeName=n1",
    }
    assert watch_params(resource_version="42", timeout_seconds=300) == {
        "watch": "1",
        "resourceVersion": "42",
        "allowWatchBookmarks": "true",
        "timeoutSeconds": "300",
    }


def test_list_page() -> None:
    body = {
        "kind": "PodList",
        "apiVersion": "v1",
        "metadata": {"resourceVersion": "12", "continue": "abc"},
        "items": [{"metadata": {"name": "a", "namespace": "n"}}],
    }
    page = parse_list(json.dumps(body).encode())
    assert page.resource_version == "12" and page.continue_token == "abc"
    assert [object_key(i) for i in page.items] == ["n/a"]
    empty = parse_list(b'{"kind":"PodList","metadata":{"resourceVersion":"3"},"items":null}')
    assert empty.items == () and empty.continue_token == ""


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"metadata": {}}',
        b'{"items": [], "metadata": {}}',
        b'{"items": [1], "metadata": {"resourceVersion": "1"}}',
    ],
)
def test_malformed_lists_are_protocol_errors(body: bytes) -> None:
    with pytest.raises(KubeProtocolError):
        parse_list(body)


def test_watch_events() -> None:
    line = b'{"type":"ADDED","object":{"metadata":{"name":"a","resourceVersion":"7"}}}'
    event = parse_watch_line(line)
    assert (event.type, event.resource_version) == ("ADDED", "7")
    bookmark = parse_watch_line(
        b'{"type":"BOOKMARK","object":{"kind":"Pod","metadata":{"resourceVersion":"9"}}}'
    )
    assert bookmark.type == "BOOKMARK" and bookmark.resource_version == "9"


def test_watch_error_event_raises_its_status() -> None:
    gone = json.dumps(
        {"type": "ERROR", "object": status(410, "Expired", "too old resource version: 1 (5)")}
    )
    with pytest.raises(KubeGone) as info:
        parse_watch_line(gone.encode())
    assert info.value.code == 410 and info.value.reason == "Expired"
    other = json.dumps({"type": "ERROR", "object": status(500, "InternalError", "boom")})
    with pytest.raises(KubeApiError) as err:
        parse_watch_line(other.encode())
    assert not isinstance(err.value, KubeGone) and err.value.code == 500


@pytest.mark.parametrize(
    "line",
    [
        b"{",
        b'{"type":"SOMETHING","object":{}}',
        b'{"type":"ADDED"}',
        b'{"type":"ADDED","object":{"metadata":{}}}',
    ],
)
def test_malformed_watch_lines(line: bytes) -> None:
    with pytest.raises(KubeProtocolError):
        parse_watch_line(line)


def test_error_responses() -> None:
    assert isinstance(
        error_response(404, json.dumps(status(404, "NotFound", "x")).encode()), KubeNotFound
    )
    assert isinstance(error_response(410, b"gone"), KubeGone)
    plain = error_response(503, b"<html>unavailable</html>")
    assert plain.code == 503 and "unavailable" in plain.message


def test_line_splitter_reassembles_chunks_and_bounds_lines() -> None:
    s = LineSplitter(limit=64)
    assert s.feed(b'{"a":') == []
    assert s.feed(b'1}\n{"b":2}\n\n{"c"') == [b'{"a":1}', b'{"b":2}']
    assert s.pending
    assert s.feed(b":3}\n") == [b'{"c":3}'] and not s.pending
    with pytest.raises(KubeProtocolError):
        s.feed(b"x" * 65)


def test_store_applies_events_and_ignores_no_op_updates() -> None:
    store = Store(PODS)
    pod = {"metadata": {"name": "a", "namespace": "n", "resourceVersion": "1"}, "spec": {}}
    assert store.replace([pod], "1") and store.synced
    same = {**pod, "metadata": {**pod["metadata"], "resourceVersion": "2"}}
    assert not store.apply(
        parse_watch_line(json.dumps({"type": "MODIFIED", "object": same}).encode())
    )
    assert store.resource_version == "2"
    assert store.objects["n/a"]["kind"] == "Pod"  # list items lack kind; the store adds it
    gone = json.dumps(
        {
            "type": "DELETED",
            "object": {**same, "metadata": {**same["metadata"], "resourceVersion": "3"}},
        }
    )
    assert store.apply(parse_watch_line(gone.encode())) and store.objects == {}


def test_backoff_grows_with_jitter_and_resets() -> None:
    import random

    b = Backoff(initial=1.0, cap=8.0, factor=2.0, rng=random.Random(1))
    delays = [b.next() for _ in range(6)]
    for delay, nominal in zip(delays, [1, 2, 4, 8, 8, 8], strict=True):
        assert nominal / 2 <= delay <= nominal
    assert len(set(delays)) == len(delays)  # jittered
    b.reset()
    assert b.next() <= 1.0


class _FlakyServer:
    """An API client that refuses ``down`` lists, then lists fine; its first watch breaks
    before the stream is established, later ones stay open and empty."""

    def __init__(self, down: int) -> None:
        self.down = down
        self.watch_calls = 0

    async def list_page(self, kind: object, params: object) -> ListPage:
        if self.down:
            self.down -= 1
            raise KubeUnavailable("connection refused")
        return ListPage((), "1", "")

    @contextlib.asynccontextmanager
    async def watch(self, kind: object, params: object, *, read_timeout: float) -> Any:
        self.watch_calls += 1
        if self.watch_calls == 1:
            raise KubeUnavailable("connection reset")
        await trio.sleep_forever()
        yield


class _RecordingBackoff(Backoff):
    def __init__(self) -> None:
        super().__init__(initial=1.0, cap=32.0, factor=2.0, rng=random.Random(1))
        self.delays: list[float] = []

    def next(self) -> float:
        delay = super().next()
        self.delays.append(delay)
        return delay


async def test_a_failure_after_the_server_answered_again_waits_the_first_delay(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """After an outage at start-up grew the backoff, the first failure once the server is
    back must not wait the grown delay (the agent would miss changes for up to 30 s)."""
    backoff = _RecordingBackoff()
    server = _FlakyServer(down=5)
    reflector = Reflector(cast(ApiClient, server), [PODS], lambda: None, backoff=backoff)
    with trio.move_on_after(200):
        await reflector.run()
    assert len(backoff.delays) == 6 and server.watch_calls == 2
    assert backoff.delays[4] > 8  # grown during the outage
    assert backoff.delays[5] <= 1.0  # the watch failure after a good list: the first delay
