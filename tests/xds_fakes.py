"""A fake istiod xDS server written with grpcio (an independent peer) and builders for
the workload/authorization protos the tests push through it."""

from __future__ import annotations

import contextlib
import ipaddress
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message

from tests.grpc_peers import ServerTLS, bidi, grpcio_server
from ztunnel.proto import authorization_pb2 as apb
from ztunnel.proto import workload_pb2 as wpb
from ztunnel.proto import xds_pb2
from ztunnel.sources.xds import DELTA_ADS
from ztunnel.sources.xds_convert import ADDRESS_TYPE, AUTHORIZATION_TYPE

END = object()


@dataclass
class FakeStream:
    """One DeltaAggregatedResources stream as the server sees it."""

    metadata: dict[str, str]
    requests: queue.Queue[xds_pb2.DeltaDiscoveryRequest | None] = field(default_factory=queue.Queue)
    outbound: queue.Queue[Any] = field(default_factory=queue.Queue)
    nonces: int = 0

    def push(
        self,
        type_url: str,
        resources: list[tuple[str, str, Message | bytes]] = (),  # type: ignore[assignment]
        removed: list[str] = (),  # type: ignore[assignment]
        any_type: str | None = None,
    ) -> str:
        """Send a response; returns its nonce."""
        self.nonces += 1
        nonce = f"n{self.nonces}"
        response = xds_pb2.DeltaDiscoveryResponse(
            type_url=type_url, nonce=nonce, removed_resources=list(removed)
        )
        for name, version, body in resources:
            raw = body if isinstance(body, bytes) else body.SerializeToString()
            response.resources.add(
                name=name,
                version=version,
                resource=any_pb2.Any(type_url=any_type or type_url, value=raw),
            )
        self.outbound.put(response)
        return nonce

    def end(self) -> None:
        self.outbound.put(END)

    def next_request(self, timeout: float = 10) -> xds_pb2.DeltaDiscoveryRequest:
        request = self.requests.get(timeout=timeout)
        assert request is not None, "client closed the stream"
        return request


class FakeXds:
    """Accepts DeltaAggregatedResources streams; the test drives each one."""

    def __init__(self) -> None:
        self.streams: queue.Queue[FakeStream] = queue.Queue()
        self.all: list[FakeStream] = []
        self.abort_next = 0  # refuse this many streams with UNAVAILABLE

    def handle(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        if self.abort_next > 0:
            self.abort_next -= 1
            context.abort(grpc.StatusCode.UNAVAILABLE, "try later")
        stream = FakeStream(dict(context.invocation_metadata()))
        self.all.append(stream)

        def read() -> None:
            with contextlib.suppress(grpc.RpcError):
                for raw in requests:
                    stream.requests.put(xds_pb2.DeltaDiscoveryRequest.FromString(raw))
            stream.requests.put(None)

        threading.Thread(target=read, daemon=True).start()
        self.streams.put(stream)
        while context.is_active():
            try:
                item = stream.outbound.get(timeout=0.1)
            except queue.Empty:
                continue
            if item is END:
                return
            yield item.SerializeToString()

    def next_stream(self, timeout: float = 10) -> FakeStream:
        return self.streams.get(timeout=timeout)

    def stop_all(self) -> None:
        for stream in self.all:
            stream.end()


@contextlib.contextmanager
def fake_xds_server(tls: ServerTLS | None = None) -> Iterator[tuple[FakeXds, int]]:
    fake = FakeXds()
    try:
        with grpcio_server({DELTA_ADS: bidi(fake.handle)}, tls) as port:
            yield fake, port
    finally:
        fake.stop_all()


# --- resource builders -------------------------------------------------------------------


def ip_bytes(ip: str) -> bytes:
    return ipaddress.ip_address(ip).packed


def workload(
    name: str, ip: str, *, ns: str = "default", sa: str = "default", node: str = "node1",
    services: dict[str, dict[int, int]] | None = None, policies: tuple[str, ...] = (),
) -> wpb.Address:  # fmt: skip
    w = wpb.Workload(
        uid=f"Kubernetes//Pod/{ns}/{name}",
        name=name,
        namespace=ns,
        addresses=[ip_bytes(ip)],
        tunnel_protocol=wpb.HBONE,
        service_account=sa,
        node=node,
        authorization_policies=list(policies),
    )
    for key, ports in (services or {}).items():
        w.services[key].ports.extend(
            wpb.Port(service_port=s, target_port=t) for s, t in ports.items()
        )
    return wpb.Address(workload=w)


def service(
    name: str, vip: str, *, ns: str = "default", ports: dict[int, int] | None = None
) -> wpb.Address:
    s = wpb.Service(
        name=name,
        namespace=ns,
        hostname=f"{name}.{ns}.svc.cluster.local",
        addresses=[wpb.NetworkAddress(address=ip_bytes(vip))],
        ports=[wpb.Port(service_port=a, target_port=b) for a, b in (ports or {80: 8080}).items()],
    )
    return wpb.Address(service=s)


def deny_port(name: str, port: int, *, ns: str = "default") -> apb.Authorization:
    return apb.Authorization(
        name=name,
        namespace=ns,
        scope=apb.NAMESPACE,
        action=apb.DENY,
        rules=[apb.Rule(clauses=[apb.Clause(matches=[apb.Match(destination_ports=[port])])])],
    )


__all__ = ["ADDRESS_TYPE", "AUTHORIZATION_TYPE"]
