"""The Kubernetes list/watch protocol, sans I/O: resource paths, query parameters, list
pages, watch events and error Statuses (API conventions, "Efficient detection of changes").

- A list answers ``{"kind": "<Kind>List", "metadata": {"resourceVersion", "continue"},
  "items": [...]}``; ``limit``/``continue`` page through it at one consistent version.
- A watch (``watch=1&resourceVersion=<rv>``) streams one JSON object per line:
  ``{"type": "ADDED"|"MODIFIED"|"DELETED"|"BOOKMARK"|"ERROR", "object": {...}}``. A
  BOOKMARK carries only ``metadata.resourceVersion``; an ERROR carries a ``Status`` (410
  Expired when the version is too old to resume from).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ztunnel.sources.kubernetes.errors import KubeApiError, KubeProtocolError, api_error

JSON = dict[str, Any]

MERGE_PATCH = "application/merge-patch+json"
EVENT_TYPES = frozenset({"ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR"})


@dataclass(frozen=True, slots=True)
class ResourceKind:
    """One served resource: enough to build its URLs and to name it in logs."""

    group: str  # "" for the core API
    version: str
    plural: str
    kind: str
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def collection_path(self, namespace: str | None = None) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if namespace is not None and self.namespaced:
            return f"{base}/namespaces/{namespace}/{self.plural}"
        return f"{base}/{self.plural}"

    def object_path(self, namespace: str | None, name: str, subresource: str = "") -> str:
        path = f"{self.collection_path(namespace)}/{name}"
        return f"{path}/{subresource}" if subresource else path

    def __str__(self) -> str:
        return f"{self.plural}.{self.api_version}"


PODS = ResourceKind("", "v1", "pods", "Pod")
NAMESPACES = ResourceKind("", "v1", "namespaces", "Namespace", namespaced=False)
SERVICES = ResourceKind("", "v1", "services", "Service")
ENDPOINT_SLICES = ResourceKind("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice")
# Both served versions of Istio's security CRDs (v1 since Istio 1.22); one is watched.
AUTHORIZATION_POLICIES = (
    ResourceKind("security.istio.io", "v1", "authorizationpolicies", "AuthorizationPolicy"),
    ResourceKind("security.istio.io", "v1beta1", "authorizationpolicies", "AuthorizationPolicy"),
)
PEER_AUTHENTICATIONS = (
    ResourceKind("security.istio.io", "v1", "peerauthentications", "PeerAuthentication"),
    ResourceKind("security.istio.io", "v1beta1", "peerauthentications", "PeerAuthentication"),
)
# Waypoints are Gateway API Gateways (v1; v1beta1 on older clusters).
GATEWAYS = (
    ResourceKind("gateway.networking.k8s.io", "v1", "gateways", "Gateway"),
    ResourceKind("gateway.networking.k8s.io", "v1beta1", "gateways", "Gateway"),
)


@dataclass(frozen=True, slots=True)
class ListPage:
    items: tuple[JSON, ...]
    resource_version: str
    continue_token: str


@dataclass(frozen=True, slots=True)
class WatchEvent:
    type: str  # ADDED, MODIFIED, DELETED or BOOKMARK (ERROR is raised, never returned)
    object: JSON

    @property
    def resource_version(self) -> str:
        return str(self.object.get("metadata", {}).get("resourceVersion", ""))


def list_params(
    *,
    limit: int,
    continue_token: str = "",
    field_selector: str = "",
    label_selector: str = "",
) -> dict[str, str]:
    """A consistent list (no resourceVersion: the newest, read from etcd), paged by ``limit``."""
    params = {"limit": str(limit)}
    if continue_token:
        params["continue"] = continue_token
    _selectors(params, field_selector, label_selector)
    return params


def watch_params(
    *,
    resource_version: str,
    timeout_seconds: int,
    field_selector: str = "",
    label_selector: str = "",
) -> dict[str, str]:
    """A watch that resumes after ``resource_version`` and asks for bookmarks, so the
    version keeps moving while nothing we watch changes (a later resume is then cheap)."""
    params = {
        "watch": "1",
        "resourceVersion": resource_version,
        "allowWatchBookmarks": "true",
        "timeoutSeconds": str(timeout_seconds),
    }
    _selectors(params, field_selector, label_selector)
    return params


def _selectors(params: dict[str, str], field_selector: str, label_selector: str) -> None:
    if field_selector:
        params["fieldSelector"] = field_selector
    if label_selector:
        params["labelSelector"] = label_selector


def _load(data: bytes, what: str) -> JSON:
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise KubeProtocolError(f"{what}: not JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise KubeProtocolError(f"{what}: expected a JSON object, got {type(value).__name__}")
    return value


def parse_list(body: bytes) -> ListPage:
    doc = _load(body, "list response")
    if doc.get("kind") == "Status":
        raise status_to_error(doc, 0)
    items, metadata = doc.get("items"), doc.get("metadata")
    if items is None:
        items = []  # an empty list may be serialised as "items": null
    if not isinstance(items, list) or not isinstance(metadata, dict):
        raise KubeProtocolError("list response without items or metadata")
    if not all(isinstance(i, dict) for i in items):
        raise KubeProtocolError("list response: an item is not an object")
    rv = metadata.get("resourceVersion")
    if not isinstance(rv, str) or not rv:
        raise KubeProtocolError("list response without metadata.resourceVersion")
    token = metadata.get("continue") or ""
    return ListPage(tuple(items), rv, str(token))


def parse_watch_line(line: bytes) -> WatchEvent:
    """One line of a watch stream; an ERROR event raises its Status as a ``KubeApiError``."""
    doc = _load(line, "watch event")
    kind, obj = doc.get("type"), doc.get("object")
    if kind not in EVENT_TYPES or not isinstance(obj, dict):
        raise KubeProtocolError(f"watch event with type {kind!r} and no object")
    if kind == "ERROR":
        raise status_to_error(obj, 500)
    event = WatchEvent(str(kind), obj)
    if not event.resource_version:
        raise KubeProtocolError(f"{kind} event without metadata.resourceVersion")
    return event


def status_to_error(status: Mapping[str, Any], http_status: int) -> KubeApiError:
    """A ``Status`` object (or whatever an error response held) as an error."""
    code = status.get("code")
    if not isinstance(code, int) or not 100 <= code <= 599:
        code = http_status or 500
    return api_error(code, str(status.get("reason") or ""), str(status.get("message") or ""))


def error_response(http_status: int, body: bytes) -> KubeApiError:
    """The error for a non-2xx response: its Status when it sent one, else the bare code."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        doc = None
    if isinstance(doc, dict) and doc.get("kind") == "Status":
        return status_to_error(doc, http_status)
    text = body[:200].decode("utf-8", "replace").strip()
    return api_error(http_status, "", text)


def object_key(obj: Mapping[str, Any]) -> str:
    """``namespace/name`` (``name`` for cluster-scoped objects): the store key."""
    meta = obj.get("metadata") or {}
    namespace, name = meta.get("namespace") or "", meta.get("name") or ""
    return f"{namespace}/{name}" if namespace else str(name)


class LineSplitter:
    """Splits a watch stream into lines; a line longer than ``limit`` is a protocol error
    (an API object is at most ~1.5 MiB in etcd, so a runaway line means a broken stream)."""

    def __init__(self, limit: int = 16 * 1024 * 1024) -> None:
        self._buf = bytearray()
        self._limit = limit

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        lines = []
        start = 0
        while (end := self._buf.find(b"\n", start)) >= 0:
            line = bytes(self._buf[start:end]).strip()
            if line:
                lines.append(line)
            start = end + 1
        del self._buf[:start]
        if len(self._buf) > self._limit:
            raise KubeProtocolError(f"watch line longer than {self._limit} bytes")
        return lines

    @property
    def pending(self) -> bool:
        """Bytes of an unfinished line are left (a stream that ends here was cut short)."""
        return bool(self._buf.strip())
