"""Delta ADS bookkeeping for ztunnel's two resource types (sans-IO, no trio).

Theory of operation (ZT src/xds/client.rs): the client subscribes to each type with
one initial ``DeltaDiscoveryRequest`` carrying the node and, after a reconnect, the
``initial_resource_versions`` of everything it holds, so istiod sends only what
changed. Each response is applied resource by resource: a resource that cannot be
decoded or converted is *rejected* (not applied, its previous version kept, its
version not recorded) while the others are applied; then exactly one request goes
back: an ACK (the nonce) or a NACK (the nonce and ``error_detail`` naming every
rejected resource). The first ACK of every type is the "first sync" that holds
readiness.

The state is written through ``XdsState``: six methods that ``StateStore`` has, so
the client can write straight into the agent's store.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog
from google.protobuf import struct_pb2

from ztunnel.grpc.status import StatusCode
from ztunnel.model.authorization import Authorization
from ztunnel.model.workload import Service, Workload
from ztunnel.proto import xds_pb2
from ztunnel.sources.xds_convert import (
    ADDRESS_TYPE,
    AUTHORIZATION_TYPE,
    ResourceError,
    decode_resource,
)

LOGGER = structlog.get_logger("ztunnel.xds")

TYPE_URLS = (ADDRESS_TYPE, AUTHORIZATION_TYPE)


class XdsState(Protocol):
    """Where xDS updates go (``ztunnel.state.store.StateStore`` fits as is)."""

    def upsert_workload(self, workload: Workload) -> None: ...

    def remove_workload(self, uid: str) -> bool: ...

    def upsert_service(self, service: Service) -> None: ...

    def remove_service(self, key: str) -> bool: ...

    def upsert_policy(self, policy: Authorization) -> None: ...

    def remove_policy(self, key: str) -> bool: ...


@dataclass(frozen=True, slots=True)
class Outcome:
    """What handling one response produced: the reply to send and what was rejected."""

    reply: xds_pb2.DeltaDiscoveryRequest
    applied: int
    removed: int
    rejected: tuple[tuple[str, str], ...] = ()

    @property
    def ack(self) -> bool:
        return not self.rejected


# What a resource name currently stands for in the state: ("workload", uid),
# ("service", "ns/hostname") or ("policy", "ns/name").
_Key = tuple[str, str]


@dataclass
class DeltaXds:
    """The client side of delta ADS, across reconnects."""

    node: xds_pb2.Node
    state: XdsState
    type_urls: tuple[str, ...] = TYPE_URLS
    # type -> name -> version of every resource we applied (sent on reconnect)
    versions: dict[str, dict[str, str]] = field(default_factory=dict)
    _keys: dict[tuple[str, str], _Key] = field(default_factory=dict)
    _unsynced: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._unsynced = set(self.type_urls)

    @property
    def synced(self) -> bool:
        """Every type was ACKed at least once (ztunnel's readiness condition)."""
        return not self._unsynced

    def initial_requests(self) -> list[xds_pb2.DeltaDiscoveryRequest]:
        """The subscriptions that open every stream (with versions after a reconnect)."""
        return [
            xds_pb2.DeltaDiscoveryRequest(
                node=self.node,
                type_url=type_url,
                initial_resource_versions=dict(self.versions.get(type_url, {})),
            )
            for type_url in self.type_urls
        ]

    def handle(self, response: xds_pb2.DeltaDiscoveryResponse) -> Outcome:
        type_url = response.type_url
        reply = xds_pb2.DeltaDiscoveryRequest(type_url=type_url, response_nonce=response.nonce)
        if type_url not in self.type_urls:
            LOGGER.error("xDS resources of unknown type ignored", type_url=type_url)
            return Outcome(reply, 0, 0)  # ztunnel ACKs a type it has no handler for
        rejected: list[tuple[str, str]] = []
        applied = 0
        for resource in response.resources:
            try:
                self._apply(type_url, resource)
                applied += 1
            except ResourceError as exc:
                rejected.append((resource.name, str(exc)))
        removed = self._remove(type_url, response.removed_resources)
        if rejected:
            detail = "; ".join(f"{name}: {problem}" for name, problem in rejected)
            reply.error_detail.code = StatusCode.INVALID_ARGUMENT
            reply.error_detail.message = detail
            LOGGER.error("xDS NACK", type_url=type_url, nonce=response.nonce, detail=detail)
        else:
            self._unsynced.discard(type_url)
        return Outcome(reply, applied, removed, tuple(rejected))

    def _apply(self, type_url: str, resource: xds_pb2.Resource) -> None:
        if not resource.name:
            raise ResourceError("resource without a name")
        if not resource.HasField("resource"):
            raise ResourceError("resource without a body")
        obj = decode_resource(type_url, resource.resource)
        key: _Key
        if isinstance(obj, Workload):
            key = ("workload", obj.uid)
        elif isinstance(obj, Service):
            key = ("service", obj.key)
        else:
            key = ("policy", obj.key)
        old = self._keys.get((type_url, resource.name))
        if old is not None and old != key:
            self._drop(old)  # the name now stands for something else
        if isinstance(obj, Workload):
            self.state.upsert_workload(obj)
        elif isinstance(obj, Service):
            self.state.upsert_service(obj)
        else:
            self.state.upsert_policy(obj)
        self._keys[(type_url, resource.name)] = key
        self.versions.setdefault(type_url, {})[resource.name] = resource.version

    def _remove(self, type_url: str, names: Iterable[str]) -> int:
        removed = 0
        for name in names:
            self.versions.get(type_url, {}).pop(name, None)
            key = self._keys.pop((type_url, name), None)
            if key is not None:
                removed += self._drop(key)
            elif type_url == ADDRESS_TYPE:  # not ours (e.g. before a restart): as ztunnel
                removed += self.state.remove_workload(name) or self.state.remove_service(name)
            else:
                removed += self.state.remove_policy(name)
        return removed

    def _drop(self, key: _Key) -> bool:
        kind, ident = key
        if kind == "workload":
            return self.state.remove_workload(ident)
        if kind == "service":
            return self.state.remove_service(ident)
        return self.state.remove_policy(ident)


# --- the node --------------------------------------------------------------------------


def build_node(
    *,
    instance_ip: str = "1.1.1.1",
    pod_name: str = "",
    pod_namespace: str = "",
    node_name: str = "",
    proxy_metadata: dict[str, str] | None = None,
    json_metadata: Mapping[str, Any] | None = None,
) -> xds_pb2.Node:
    """ztunnel's node: id ``ztunnel~<ip>~<pod>.<ns>~<ns>.svc.cluster.local`` and metadata
    NAME, NAMESPACE, INSTANCE_IPS, NODE_NAME, the proxy metadata, ISTIO_METAJSON_* values."""
    metadata = struct_pb2.Struct()
    metadata.update(
        {
            "NAME": pod_name,
            "NAMESPACE": pod_namespace,
            "INSTANCE_IPS": instance_ip,
            "NODE_NAME": node_name,
            **(proxy_metadata or {}),
        }
    )
    if json_metadata:
        metadata.update(json_metadata)
    return xds_pb2.Node(
        id=f"ztunnel~{instance_ip}~{pod_name}.{pod_namespace}~{pod_namespace}.svc.cluster.local",
        metadata=metadata,
    )
