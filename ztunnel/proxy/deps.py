"""What a proxy flow needs, and nothing more: ``FlowDeps``, built once per workload proxy.

The flows (outbound, inbound, inbound plaintext, authorize, SOCKS5) take a
``FlowDeps`` instead of the whole ``WorkloadProxy``: the state, the connection
tracker, a few settings, and the I/O they perform as small callables (dial a
TCP upstream, open an HBONE stream through the pool, fetch a certificate, serve
HBONE on an accepted TLS connection, find the proxied workload). The proxy wires
the real ones; tests pass in-memory fakes and drive a flow end to end.
"""

from __future__ import annotations

import errno
import random
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import trio

from ztunnel.config import WorkloadInfo
from ztunnel.errors import ZtunnelError
from ztunnel.hbone.connection import Handler, OnLimit
from ztunnel.hbone.pool import PoolKey
from ztunnel.identity.certificate import WorkloadCertificate
from ztunnel.model.address import IPAddress, SocketAddr
from ztunnel.model.identity import Identity
from ztunnel.model.ports import AgentPorts
from ztunnel.model.workload import Workload
from ztunnel.proxy.admission import PeerAdmission
from ztunnel.state.store import StateStore
from ztunnel.telemetry.connections import ConnectionTracker

WORKLOAD_WAIT = 5.0  # ztunnel waits this long for the local workload to appear in xDS
CONNECT_TIMEOUT = 10.0
TLS_HANDSHAKE_TIMEOUT = 10.0
SOCKS5_HANDSHAKE_TIMEOUT = 10.0


class UnknownSourceWorkload(ZtunnelError, LookupError):
    """The proxied workload is not in the state (ztunnel's UnknownSourceWorkload)."""


class Dial(Protocol):
    """Connect a TCP socket (where the proxy lives) to ``dst``; raises OSError.

    ``src_ip`` binds the source first; ``transparent`` lets it be a non-local address
    (the original client's). The flow applies the connect timeout.
    """

    async def __call__(
        self, dst: SocketAddr, *, src_ip: IPAddress | None = None, transparent: bool = False
    ) -> trio.abc.HalfCloseableStream: ...


class OpenHbone(Protocol):
    """A CONNECT stream through the HBONE pool (``HbonePool.open_stream``)."""

    async def __call__(
        self, key: PoolKey, authority: str, headers: Iterable[tuple[str, str]] = ()
    ) -> trio.abc.HalfCloseableStream: ...


class ServeHbone(Protocol):
    """Serve HBONE on an accepted, verified TLS connection until it ends (hbone.serve_hbone
    with the proxy's HTTP/2 settings and drain bookkeeping); ``on_limit(name)`` hears each
    limit this connection's peer hits (the proxy counts them in the metrics already)."""

    async def __call__(
        self, tls: trio.abc.Stream, handler: Handler, *, on_limit: OnLimit | None = None
    ) -> None: ...


FetchCertificate = Callable[[Identity], Awaitable[WorkloadCertificate]]
# The proxied workload, waiting briefly for the state to name it; raises UnknownSourceWorkload.
LocalWorkload = Callable[[], Awaitable[Workload]]


@dataclass(frozen=True, slots=True)
class FlowSettings:
    proxy_uid: str  # the proxied pod's uid (connections are attributed to it)
    cluster_id: str = "Kubernetes"
    ports: AgentPorts = field(default_factory=AgentPorts)
    # Dial the app from the client's IP (IP_TRANSPARENT took on the inbound listeners).
    transparent: bool = False
    connect_timeout: float = CONNECT_TIMEOUT
    tls_handshake_timeout: float = TLS_HANDSHAKE_TIMEOUT
    socks5_handshake_timeout: float = SOCKS5_HANDSHAKE_TIMEOUT


def _nothing_local(ip: IPAddress) -> bool:
    return False


@dataclass(frozen=True, slots=True)
class FlowDeps:
    store: StateStore
    tracker: ConnectionTracker
    settings: FlowSettings
    local_workload: LocalWorkload
    dial: Dial
    open_hbone: OpenHbone
    certificate: FetchCertificate
    serve_hbone: ServeHbone
    rng: random.Random
    # Whether an IP is an address of the netns the proxy dials from (the self-call check);
    # loopback and unspecified addresses always are.
    is_local: Callable[[IPAddress], bool] = _nothing_local
    # The agent-wide per-peer limits and flood penalty (admission.py).
    peers: PeerAdmission = field(default_factory=PeerAdmission)


async def wait_for_workload(
    store: StateStore, info: WorkloadInfo, patience: float = WORKLOAD_WAIT
) -> Workload:
    """The workload ``info`` names, waiting up to ``patience`` s for the state to know it."""

    def find() -> Workload | None:
        return store.find_workload(info.namespace, info.name, info.service_account)

    workload = find()
    if workload is not None:
        return workload
    changed = trio.Event()

    def wake(_kinds: object) -> None:
        changed.set()

    unsubscribe = store.subscribe(wake)
    try:
        with trio.move_on_after(patience):
            while (workload := find()) is None:
                await changed.wait()
                changed = trio.Event()
            return workload
    finally:
        unsubscribe()
    raise UnknownSourceWorkload(
        f"unknown source workload {info.namespace}/{info.name} "
        f"(sa {info.service_account}) after {patience:.0f}s"
    )


async def dial(
    deps: FlowDeps,
    dst: SocketAddr,
    *,
    src_ip: IPAddress | None = None,
    transparent: bool = False,
) -> trio.abc.HalfCloseableStream:
    """``deps.dial`` within the connect timeout; raises OSError (TimeoutError when slow)."""
    with trio.move_on_after(deps.settings.connect_timeout):
        return await deps.dial(dst, src_ip=src_ip, transparent=transparent)
    raise TimeoutError(errno.ETIMEDOUT, f"connect to {dst} timed out")
