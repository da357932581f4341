"""An in-process Kubernetes API server (trio + h11) that speaks the list/watch protocol.

Enough of the real thing to test a client against its formats, never a cluster:

- one global resourceVersion (etcd's revision) shared by every resource; each write
  bumps it; objects carry ``metadata.resourceVersion``, ``uid``, ``creationTimestamp``;
- ``GET`` lists (``limit``/``continue`` pages served from one snapshot; an expired token
  is 410), ``fieldSelector`` (``spec.nodeName``, ``metadata.name``, ``metadata.namespace``),
  ``labelSelector`` (equality);
- watches: chunked JSON lines from ``resourceVersion`` on (synthetic ADDED events when it
  is unset or "0"), an object leaving a selector is DELETED, entering it ADDED;
  ``allowWatchBookmarks`` → BOOKMARK events every ``bookmark_interval``; ``timeoutSeconds``
  ends the watch cleanly; a version older than the last ``compact()`` → ERROR 410 Expired;
- ``PATCH`` of an object or its ``/status`` with a JSON merge patch (RFC 7386);
- unserved resources (a CRD not installed) → 404; a bearer token or a client certificate
  can be required (401 otherwise); TLS optional;
- faults: ``drop_watches()`` (connections cut mid-stream), ``stop()``/``start()`` (the
  server is down: connection refused, then back on the same port), ``delay`` (slow
  answers), ``fail_next(path, status)`` (injected error Statuses).

Builders (``pod``, ``namespace``, ``service``, ``endpoint_slice``, ...) make objects in the
shapes the API returns; the tests validate them against the Kubernetes OpenAPI schemas.
"""

from __future__ import annotations

import base64
import copy
import itertools
import json
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
import trio
import trio.lowlevel
import yaml

from ztunnel.sources.kubernetes.protocol import (
    AUTHORIZATION_POLICIES,
    ENDPOINT_SLICES,
    GATEWAYS,
    NAMESPACES,
    PEER_AUTHENTICATIONS,
    PODS,
    SERVICES,
    ResourceKind,
)

JSON = dict[str, Any]
CORE_RESOURCES = (PODS, NAMESPACES, SERVICES, ENDPOINT_SLICES)
ISTIO_RESOURCES = (*AUTHORIZATION_POLICIES, *PEER_AUTHENTICATIONS)
ALL_RESOURCES = (*CORE_RESOURCES, *ISTIO_RESOURCES, *GATEWAYS)
_CREATED = "2026-01-01T00:00:00Z"


@dataclass
class _Event:
    rv: int
    resource: str  # group/plural: one storage for every version of a resource
    type: str
    obj: JSON
    prev: JSON | None  # the object before (selectors: moved in or out)


@dataclass
class RequestRecord:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    client_cert: dict[str, Any] | None


# Opens the server's listening sockets on (host, port); port 0 picks one.
Listen = Callable[[str, int], Awaitable[list[trio.SocketListener]]]


async def _open_tcp(host: str, port: int) -> list[trio.SocketListener]:
    return await trio.open_tcp_listeners(port, host=host)


def _storage(kind: ResourceKind) -> str:
    return f"{kind.group}/{kind.plural}"


def status(code: int, reason: str, message: str) -> JSON:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def _field(obj: Mapping[str, Any], path: str) -> str:
    cur: Any = obj
    for part in path.split("."):
        cur = cur.get(part) if isinstance(cur, Mapping) else None
    return "" if cur is None else str(cur)


def _parse_selector(text: str) -> list[tuple[str, str, bool]]:
    out = []
    for term in filter(None, (t.strip() for t in text.split(","))):
        if "!=" in term:
            k, v = term.split("!=", 1)
            out.append((k.strip(), v.strip(), False))
        else:
            k, v = term.replace("==", "=").split("=", 1)
            out.append((k.strip(), v.strip(), True))
    return out


class FakeApiServer:
    """See the module docstring. Mutations are synchronous and wake every watcher."""

    def __init__(
        self,
        *,
        resources: Iterable[ResourceKind] = ALL_RESOURCES,
        token: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        bookmark_interval: float = 1.0,
        host: str = "127.0.0.1",
        listen: Listen | None = None,
    ) -> None:
        self.served = {k.collection_path(): k for k in resources}
        self.listen = listen or _open_tcp  # another netns: k8s_cluster.listen_in
        self.token = token
        self.ssl_context = ssl_context
        self.bookmark_interval = bookmark_interval
        self.host = host
        self.port = 0
        self.rv = 100
        self.store: dict[str, dict[str, JSON]] = {}
        self.history: list[_Event] = []
        self.compacted = 0  # versions <= this cannot be watched from
        self.delay = 0.0
        self.requests: list[RequestRecord] = []
        self._failures: list[tuple[str, int, str]] = []
        self._changed = trio.Event()
        self._pages: dict[int, tuple[int, list[JSON]]] = {}
        self._page_ids = itertools.count(1)
        self._watch_scopes: set[trio.CancelScope] = set()
        self._serve_scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self.watches_opened = 0

    # --- objects -----------------------------------------------------------------------

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://{self.host}:{self.port}"

    def _kind_of(self, obj: Mapping[str, Any]) -> ResourceKind:
        api, kind = obj.get("apiVersion"), obj.get("kind")
        for k in ALL_RESOURCES:
            if k.api_version == api and k.kind == kind:
                return k
        raise ValueError(f"unknown kind {api}/{kind}")

    @staticmethod
    def _key(obj: Mapping[str, Any]) -> str:
        meta = obj["metadata"]
        return f"{meta.get('namespace', '')}/{meta['name']}"

    def _record(self, kind: ResourceKind, type_: str, obj: JSON, prev: JSON | None) -> None:
        self.history.append(_Event(self.rv, _storage(kind), type_, obj, prev))
        self._changed.set()
        self._changed = trio.Event()

    def apply(self, obj: Mapping[str, Any]) -> JSON:
        """Create or replace an object (kubectl apply, roughly); returns the stored copy."""
        kind = self._kind_of(obj)
        bucket = self.store.setdefault(_storage(kind), {})
        new = copy.deepcopy(dict(obj))
        meta = new.setdefault("metadata", {})
        key = self._key(new)
        prev = bucket.get(key)
        self.rv += 1
        meta["resourceVersion"] = str(self.rv)
        meta.setdefault("uid", (prev or {}).get("metadata", {}).get("uid") or str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", _CREATED)
        bucket[key] = new
        self._record(kind, "MODIFIED" if prev else "ADDED", new, prev)
        return copy.deepcopy(new)

    def delete(
        self, obj_or_kind: Mapping[str, Any] | ResourceKind, namespace: str = "", name: str = ""
    ) -> bool:
        if isinstance(obj_or_kind, ResourceKind):
            kind, key = obj_or_kind, f"{namespace}/{name}"
        else:
            kind, key = self._kind_of(obj_or_kind), self._key(obj_or_kind)
        prev = self.store.get(_storage(kind), {}).pop(key, None)
        if prev is None:
            return False
        self.rv += 1
        gone = copy.deepcopy(prev)
        gone["metadata"]["resourceVersion"] = str(self.rv)
        self._record(kind, "DELETED", gone, prev)
        return True

    def get(self, kind: ResourceKind, namespace: str, name: str) -> JSON | None:
        found = self.store.get(_storage(kind), {}).get(f"{namespace}/{name}")
        return copy.deepcopy(found) if found else None

    def compact(self) -> None:
        """Forget history (etcd compaction): watches from older versions get 410."""
        self.compacted = self.rv
        self.history.clear()
        self._pages.clear()

    def fail_next(self, path_prefix: str, code: int, reason: str = "InternalError") -> None:
        """The next request whose path starts with ``path_prefix`` gets this error Status."""
        self._failures.append((path_prefix, code, reason))

    # --- lifecycle ---------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self.start()
            task_status.started()
            await trio.sleep_forever()

    async def start(self) -> None:
        """(Re)open the listener on the same port."""
        assert self._nursery is not None, "serve() first"
        scope = trio.CancelScope()
        self._serve_scope = scope

        async def listen(task_status: trio.TaskStatus[int]) -> None:
            with scope:
                listeners = await self.listen(self.host, self.port)
                port = listeners[0].socket.getsockname()[1]
                async with trio.open_nursery() as conns:
                    await conns.start(trio.serve_listeners, self._handle, listeners)
                    task_status.started(port)

        self.port = await self._nursery.start(listen)

    async def stop(self) -> None:
        """The server goes away: listener closed (connection refused), connections cut."""
        if self._serve_scope is not None:
            self._serve_scope.cancel()
            self._serve_scope = None
        await trio.lowlevel.checkpoint()

    async def drop_watches(self) -> None:
        """Cut every open watch mid-stream (no terminating chunk)."""
        for scope in list(self._watch_scopes):
            scope.cancel()
        await trio.lowlevel.checkpoint()

    # --- HTTP --------------------------------------------------------------------------

    async def _handle(self, stream: trio.abc.Stream) -> None:
        cert = None
        if self.ssl_context is not None:
            tls = trio.SSLStream(stream, self.ssl_context, server_side=True)
            try:
                await tls.do_handshake()
            except (trio.BrokenResourceError, ssl.SSLError):
                await stream.aclose()
                return
            cert = tls.getpeercert()
            stream = tls
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request, body = await self._read_request(conn, stream)
                if request is None:
                    return
                keep = await self._dispatch(conn, stream, request, body, cert)
                if not keep or conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            return
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _read_request(
        self, conn: h11.Connection, stream: trio.abc.Stream
    ) -> tuple[h11.Request | None, bytes]:
        request, body = None, b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                conn.receive_data(bytes(data))
                if not data and request is None:
                    return None, b""
                continue
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return request, body
            elif isinstance(event, h11.ConnectionClosed):
                return None, b""

    async def _send_json(
        self, conn: h11.Connection, stream: trio.abc.Stream, code: int, doc: Mapping[str, Any]
    ) -> None:
        body = json.dumps(doc).encode()
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        await stream.send_all(conn.send(h11.Response(status_code=code, headers=headers)))
        await stream.send_all(conn.send(h11.Data(data=body)))
        await stream.send_all(conn.send(h11.EndOfMessage()))

    async def _dispatch(
        self,
        conn: h11.Connection,
        stream: trio.abc.Stream,
        request: h11.Request,
        body: bytes,
        cert: dict[str, Any] | None,
    ) -> bool:
        target = urlsplit(request.target.decode())
        query = {k: v[-1] for k, v in parse_qs(target.query).items()}
        headers = {k.decode().lower(): v.decode() for k, v in request.headers}
        method = request.method.decode()
        self.requests.append(RequestRecord(method, target.path, query, headers, cert))
        if self.delay:
            await trio.sleep(self.delay)
        error = self._check(target.path, headers)
        if error is not None:
            await self._send_json(conn, stream, error["code"], error)
            return True
        kind, namespace, name, sub = self._route(target.path)
        if kind is None:
            msg = "the server could not find the requested resource"
            await self._send_json(conn, stream, 404, status(404, "NotFound", msg))
            return True
        if method == "GET" and name is None and query.get("watch") in ("1", "true"):
            await self._watch(conn, stream, kind, namespace, query)
            return False
        if method == "GET" and name is None:
            code, doc = self._list(kind, namespace, query)
        elif method == "GET" and name is not None:
            found = self.get(kind, namespace or "", name)
            code, doc = (200, found) if found else (404, _not_found(kind, name))
        elif method == "PATCH" and name is not None and sub in ("", "status"):
            code, doc = self._patch(kind, namespace or "", name, headers, body)
        else:
            code, doc = 405, status(405, "MethodNotAllowed", f"{method} is not supported")
        await self._send_json(conn, stream, code, doc)
        return True

    def _check(self, path: str, headers: Mapping[str, str]) -> JSON | None:
        if self.token is not None and headers.get("authorization") != f"Bearer {self.token}":
            return status(401, "Unauthorized", "Unauthorized")
        for i, (prefix, code, reason) in enumerate(self._failures):
            if path.startswith(prefix):
                del self._failures[i]
                return status(code, reason, f"injected {code}")
        return None

    def _route(self, path: str) -> tuple[ResourceKind | None, str | None, str | None, str]:
        parts = path.strip("/").split("/")
        base = 2 if parts[:1] == ["api"] else 3
        head, rest = parts[:base], parts[base:]
        namespace = None
        if len(rest) >= 3 and rest[0] == "namespaces" and rest[2] != "":
            namespace, rest = rest[1], rest[2:]
        if not rest:
            return None, None, None, ""
        coll = "/" + "/".join([*head, rest[0]])
        kind = self.served.get(coll)
        if kind is None and rest[0] == "namespaces" and len(rest) >= 2:
            kind = self.served.get("/" + "/".join([*head, "namespaces"]))
        if kind is None:
            return None, None, None, ""
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else ""
        return kind, namespace, name, sub

    def _matches(self, obj: JSON | None, namespace: str | None, query: Mapping[str, str]) -> bool:
        if obj is None:
            return False
        meta = obj.get("metadata", {})
        if namespace is not None and meta.get("namespace") != namespace:
            return False
        for key, value, equal in _parse_selector(query.get("fieldSelector", "")):
            if (_field(obj, key) == value) != equal:
                return False
        labels = meta.get("labels") or {}
        for key, value, equal in _parse_selector(query.get("labelSelector", "")):
            if (labels.get(key) == value) != equal:
                return False
        return True

    def _view(self, kind: ResourceKind, obj: JSON) -> JSON:
        return {**copy.deepcopy(obj), "apiVersion": kind.api_version, "kind": kind.kind}

    def _list(
        self, kind: ResourceKind, namespace: str | None, query: Mapping[str, str]
    ) -> tuple[int, JSON]:
        token = query.get("continue")
        if token:
            try:
                page_id, offset = json.loads(base64.b64decode(token))
            except (ValueError, TypeError):
                return 400, status(400, "BadRequest", "invalid continue token")
            if page_id not in self._pages:
                return 410, status(410, "Expired", "The provided continue parameter is too old")
            rv, items = self._pages[page_id]
        else:
            rv = self.rv
            bucket = self.store.get(_storage(kind), {})
            items = [
                self._view(kind, o)
                for k, o in sorted(bucket.items())
                if self._matches(o, namespace, query)
            ]
            page_id, offset = next(self._page_ids), 0
            self._pages[page_id] = (rv, items)
        limit = int(query.get("limit") or 0) or len(items) or 1
        chunk = items[offset : offset + limit]
        meta: JSON = {"resourceVersion": str(rv)}
        if offset + limit < len(items):
            meta["continue"] = base64.b64encode(
                json.dumps([page_id, offset + limit]).encode()
            ).decode()
        for item in chunk:  # built-in lists omit the items' kind and apiVersion
            if kind.group in ("", "discovery.k8s.io"):
                item.pop("kind", None)
                item.pop("apiVersion", None)
        return 200, {
            "kind": f"{kind.kind}List",
            "apiVersion": kind.api_version,
            "metadata": meta,
            "items": chunk,
        }

    def _patch(
        self, kind: ResourceKind, namespace: str, name: str, headers: Mapping[str, str], body: bytes
    ) -> tuple[int, JSON]:
        ctype = headers.get("content-type", "")
        if ctype not in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
            return 415, status(415, "UnsupportedMediaType", f"unsupported patch type {ctype}")
        current = self.get(kind, namespace, name)
        if current is None:
            return 404, _not_found(kind, name)
        try:
            patch = json.loads(body)
        except ValueError:
            return 400, status(400, "BadRequest", "patch is not JSON")
        return 200, self._view(kind, self.apply(merge_patch(current, patch)))

    async def _watch(
        self,
        conn: h11.Connection,
        stream: trio.abc.Stream,
        kind: ResourceKind,
        namespace: str | None,
        query: Mapping[str, str],
    ) -> None:
        self.watches_opened += 1
        headers = [("Content-Type", "application/json"), ("Transfer-Encoding", "chunked")]
        await stream.send_all(conn.send(h11.Response(status_code=200, headers=headers)))

        async def send(type_: str, obj: JSON) -> None:
            line = json.dumps({"type": type_, "object": obj}).encode() + b"\n"
            await stream.send_all(conn.send(h11.Data(data=line)))

        start = query.get("resourceVersion", "")
        scope = trio.CancelScope(
            deadline=trio.current_time() + float(query.get("timeoutSeconds") or 1800)
        )
        self._watch_scopes.add(scope)
        clean = False
        try:
            with scope:
                if start in ("", "0"):
                    last = self.rv
                    for obj in self.store.get(_storage(kind), {}).values():
                        if self._matches(obj, namespace, query):
                            await send("ADDED", self._view(kind, obj))
                else:
                    last = int(start)
                    if last < self.compacted:
                        msg = f"too old resource version: {last} ({self.compacted})"
                        await send("ERROR", status(410, "Expired", msg))
                        await stream.send_all(conn.send(h11.EndOfMessage()))
                        return
                bookmarks = query.get("allowWatchBookmarks") == "true"
                await self._stream_events(kind, namespace, query, last, send, bookmarks)
            clean = scope.deadline <= trio.current_time()  # timeoutSeconds, not a drop
        finally:
            self._watch_scopes.discard(scope)
        if clean:
            await stream.send_all(conn.send(h11.EndOfMessage()))

    async def _stream_events(
        self,
        kind: ResourceKind,
        namespace: str | None,
        query: Mapping[str, str],
        last: int,
        send: Callable[[str, JSON], Awaitable[None]],
        bookmarks: bool,
    ) -> None:
        storage = _storage(kind)
        while True:
            for ev in [e for e in self.history if e.rv > last and e.resource == storage]:
                last = ev.rv
                now, before = (
                    self._matches(ev.obj, namespace, query),
                    self._matches(ev.prev, namespace, query),
                )
                if ev.type == "DELETED":
                    type_ = "DELETED" if before else None
                elif now and before:
                    type_ = "MODIFIED"
                elif now:
                    type_ = "ADDED"
                elif before:
                    type_ = "DELETED"
                else:
                    type_ = None
                if type_:
                    await send(type_, self._view(kind, ev.obj))
            changed = self._changed
            with trio.move_on_after(self.bookmark_interval) as waited:
                await changed.wait()
            if waited.cancelled_caught and bookmarks:
                last = max(last, self.rv)
                await send(
                    "BOOKMARK",
                    {
                        "kind": kind.kind,
                        "apiVersion": kind.api_version,
                        "metadata": {"resourceVersion": str(self.rv)},
                    },
                )

    # --- client configuration ----------------------------------------------------------

    def kubeconfig(self, *, token: str | None = None, ca_file: str | None = None) -> str:
        """A kubeconfig YAML that points at this server."""
        cluster: JSON = {"server": self.url}
        if ca_file:
            cluster["certificate-authority"] = ca_file
        user: JSON = {"token": token or self.token} if (token or self.token) else {}
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": cluster}],
            "users": [{"name": "fake", "user": user}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
            "current-context": "fake",
        }
        return yaml.safe_dump(doc)


def _not_found(kind: ResourceKind, name: str) -> JSON:
    return status(404, "NotFound", f'{kind.plural} "{name}" not found')


@asynccontextmanager
async def running(server: FakeApiServer) -> AsyncIterator[FakeApiServer]:
    """Serve until the block ends."""
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()


# --- object builders (the shapes the API serves) ---------------------------------------


def namespace(name: str, labels: Mapping[str, str] | None = None) -> JSON:
    meta: JSON = {"name": name, "labels": {"kubernetes.io/metadata.name": name, **(labels or {})}}
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": meta,
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    }


def pod(
    name: str,
    ns: str = "default",
    *,
    node: str = "node1",
    ip: str | None = "10.244.1.10",
    uid: str | None = None,
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
    service_account: str = "default",
    phase: str = "Running",
    ready: bool = True,
    ports: Iterable[tuple[str, int]] = (),
    host_network: bool = False,
    owner: tuple[str, str] | None = None,
    generate_name: str | None = None,
) -> JSON:
    meta: JSON = {
        "name": name,
        "namespace": ns,
        "uid": uid or str(uuid.uuid4()),
        "labels": dict(labels or {}),
    }
    if annotations:
        meta["annotations"] = dict(annotations)
    if owner:
        meta["ownerReferences"] = [
            {
                "apiVersion": "batch/v1" if owner[0] == "Job" else "apps/v1",
                "kind": owner[0],
                "name": owner[1],
                "uid": str(uuid.uuid4()),
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
    if generate_name:
        meta["generateName"] = generate_name
    container: JSON = {"name": "app", "image": "app:1"}
    if ports:
        container["ports"] = [{"name": n, "containerPort": p, "protocol": "TCP"} for n, p in ports]
    spec: JSON = {
        "nodeName": node,
        "serviceAccountName": service_account,
        "containers": [container],
    }
    if host_network:
        spec["hostNetwork"] = True
    status_: JSON = {"phase": phase}
    if ip:
        status_["podIP"] = ip
        status_["podIPs"] = [{"ip": ip}]
        status_["hostIP"] = "192.0.2.10"
    status_["conditions"] = [{"type": "Ready", "status": "True" if ready else "False"}]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec, "status": status_}


def service(
    name: str,
    ns: str = "default",
    *,
    selector: Mapping[str, str] | None = None,
    ports: Iterable[tuple[str, int, int | str]] = (("http", 80, 8080),),
    cluster_ip: str | None = "10.96.0.10",
    labels: Mapping[str, str] | None = None,
) -> JSON:
    spec: JSON = {
        "ports": [{"name": n, "port": p, "targetPort": t, "protocol": "TCP"} for n, p, t in ports],
        "type": "ClusterIP",
    }
    if selector is not None:
        spec["selector"] = dict(selector)
    if cluster_ip:
        spec["clusterIP"] = cluster_ip
        spec["clusterIPs"] = [cluster_ip]
    meta: JSON = {"name": name, "namespace": ns}
    if labels:
        meta["labels"] = dict(labels)
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec}


def endpoint_slice(
    name: str,
    ns: str,
    service_name: str,
    endpoints: Iterable[Mapping[str, Any]],
    ports: Iterable[tuple[str, int]] = (("http", 8080),),
) -> JSON:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": {"kubernetes.io/service-name": service_name},
        },
        "addressType": "IPv4",
        "endpoints": [dict(e) for e in endpoints],
        "ports": [{"name": n, "port": p, "protocol": "TCP"} for n, p in ports],
    }


def slice_endpoint(
    ip: str, *, pod_name: str | None = None, ns: str = "default", ready: bool | None = True
) -> JSON:
    ep: JSON = {"addresses": [ip]}
    if ready is not None:
        ep["conditions"] = {"ready": ready}
    if pod_name:
        ep["targetRef"] = {"kind": "Pod", "name": pod_name, "namespace": ns}
    return ep


def authorization_policy(name: str, ns: str, spec: Mapping[str, Any], version: str = "v1") -> JSON:
    return {
        "apiVersion": f"security.istio.io/{version}",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": dict(spec),
    }


def peer_authentication(name: str, ns: str, spec: Mapping[str, Any], version: str = "v1") -> JSON:
    return {
        "apiVersion": f"security.istio.io/{version}",
        "kind": "PeerAuthentication",
        "metadata": {"name": name, "namespace": ns},
        "spec": dict(spec),
    }


def waypoint_gateway(
    name: str,
    ns: str,
    *,
    address: str | None = None,
    traffic: str | None = None,
    from_namespaces: str = "Same",
) -> JSON:
    gw: JSON = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": {"istio.io/waypoint-for": traffic} if traffic else {},
        },
        "spec": {
            "gatewayClassName": "istio-waypoint",
            "listeners": [
                {
                    "name": "mesh",
                    "port": 15008,
                    "protocol": "HBONE",
                    "allowedRoutes": {"namespaces": {"from": from_namespaces}},
                }
            ],
        },
    }
    if address is not None:
        gw["status"] = {"addresses": [{"type": "Hostname", "value": address}]}
    return gw
