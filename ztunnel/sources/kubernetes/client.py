"""The one boundary between the HTTP client and the Kubernetes source.

Every httpx2 failure becomes a ``KubeUnavailable``; every non-2xx answer a
``KubeApiError`` (``KubeGone``, ``KubeNotFound``) carrying the server's Status; every
malformed body a ``KubeProtocolError``. Nothing else leaves this module.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import aclosing, asynccontextmanager
from typing import Any

import httpx2

from ztunnel.sources.kubernetes.errors import KubeProtocolError, KubeUnavailable
from ztunnel.sources.kubernetes.protocol import (
    JSON,
    MERGE_PATCH,
    LineSplitter,
    ListPage,
    ResourceKind,
    WatchEvent,
    error_response,
    parse_list,
    parse_watch_line,
)


class ApiClient:
    """List, watch and patch over one ``httpx2.AsyncClient`` (which it owns)."""

    def __init__(self, http: httpx2.AsyncClient) -> None:
        self.http = http

    async def aclose(self) -> None:
        await self.http.aclose()

    async def list_page(self, kind: ResourceKind, params: Mapping[str, str]) -> ListPage:
        try:
            response = await self.http.get(kind.collection_path(), params=dict(params))
        except httpx2.RequestError as exc:
            raise KubeUnavailable(f"list {kind}: {exc!r}") from exc
        if response.status_code != 200:
            raise error_response(response.status_code, response.content)
        return parse_list(response.content)

    @asynccontextmanager
    async def watch(
        self, kind: ResourceKind, params: Mapping[str, str], *, read_timeout: float
    ) -> AsyncIterator[AsyncGenerator[WatchEvent, None]]:
        """A watch stream; iterating it yields events until the server ends the watch.

        ``read_timeout`` bounds the silence between two chunks: with bookmarks and a
        server-side ``timeoutSeconds``, a longer silence means a dead connection.
        """
        timeout = httpx2.Timeout(60.0, read=read_timeout)
        request = self.http.build_request(
            "GET", kind.collection_path(), params=dict(params), timeout=timeout
        )
        try:
            response = await self.http.send(request, stream=True)
        except httpx2.RequestError as exc:
            raise KubeUnavailable(f"watch {kind}: {exc!r}") from exc
        try:
            if response.status_code != 200:
                body = await self._read(response, kind)
                raise error_response(response.status_code, body)
            events = self._events(response, kind)
            try:
                yield events
            finally:
                await events.aclose()  # an abandoned generator must not wait for the GC
        finally:
            await response.aclose()

    async def _read(self, response: httpx2.Response, kind: ResourceKind) -> bytes:
        try:
            return await response.aread()
        except httpx2.RequestError as exc:
            raise KubeUnavailable(f"watch {kind}: {exc!r}") from exc

    async def _events(
        self, response: httpx2.Response, kind: ResourceKind
    ) -> AsyncGenerator[WatchEvent, None]:
        splitter = LineSplitter()
        async with aclosing(response.aiter_bytes()) as chunks:
            while True:
                try:
                    chunk = await anext(chunks)
                except StopAsyncIteration:
                    break
                except httpx2.RequestError as exc:
                    raise KubeUnavailable(f"watch {kind} broke: {exc!r}") from exc
                for line in splitter.feed(chunk):
                    yield parse_watch_line(line)
        if splitter.pending:
            raise KubeProtocolError(f"watch {kind} ended inside an event")

    async def patch(
        self,
        kind: ResourceKind,
        namespace: str,
        name: str,
        body: Mapping[str, Any],
        *,
        subresource: str = "",
        content_type: str = MERGE_PATCH,
    ) -> JSON:
        path = kind.object_path(namespace, name, subresource)
        try:
            response = await self.http.patch(
                path, content=json.dumps(body).encode(), headers={"Content-Type": content_type}
            )
        except httpx2.RequestError as exc:
            raise KubeUnavailable(f"patch {kind} {namespace}/{name}: {exc!r}") from exc
        if response.status_code != 200:
            raise error_response(response.status_code, response.content)
        try:
            doc = json.loads(response.content)
        except (ValueError, UnicodeDecodeError) as exc:
            raise KubeProtocolError(f"patch {kind} {namespace}/{name}: not JSON") from exc
        if not isinstance(doc, dict):
            raise KubeProtocolError(f"patch {kind} {namespace}/{name}: not an object")
        return doc
