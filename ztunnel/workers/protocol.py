"""What the control process and its workers say to each other, and how it is framed (sans-IO).

One unix stream socket per worker (a socketpair made when the worker is spawned). A
frame is a 6-byte header (payload length, number of file descriptors that travel with
it) and a pickled message; descriptors (a pod's netns) ride as SCM_RIGHTS on the frame's
first byte. Pickle is safe here because both ends are this program: the socket is a
private socketpair between a parent and the child it spawned, never a listener.

Control -> worker: ``Hello`` (once), ``StateSnapshot`` then ``StateDelta``s, ``StartProxy``,
``DrainProxy``, ``CertificateUpdate``, ``CertificateReply``, ``ForgetCertificate``,
``SetLogFilter``, ``Penalty`` (another worker's), ``Shutdown`` (last).
Worker -> control: ``Ready`` (once), ``Started``, ``Drained``, ``CertificateRequest``,
``Telemetry`` (a batch of connection events, see ``workers/telemetry.py``), ``Penalty``.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import struct
from collections import deque
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ztunnel.config import Address, Config, WorkloadInfo
from ztunnel.model.address import Authority, SocketAddr
from ztunnel.model.authorization import Authorization
from ztunnel.model.identity import Identity
from ztunnel.model.outcome import Failure
from ztunnel.model.workload import Service, Workload
from ztunnel.proxy.workload_proxy import ProxyAddresses
from ztunnel.telemetry.connections import ConnectionInfo, Direction

HEADER = struct.Struct("!IH")
MAX_FRAME = 256 * 1024 * 1024  # a whole mesh snapshot fits; anything bigger is a bug
MAX_FDS = 16


class ProtocolError(Exception):
    """The peer sent something that is not a frame of this protocol."""


# -- control -> worker -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    config: Config
    index: int
    workers: int = 1  # how many there are: each admits its share of the per-peer limits


@dataclass(frozen=True, slots=True)
class StateSnapshot:
    workloads: tuple[Workload, ...]
    services: tuple[Service, ...]
    policies: tuple[Authorization, ...]


@dataclass(frozen=True, slots=True)
class StateDelta:
    workloads: tuple[Workload, ...] = ()
    services: tuple[Service, ...] = ()
    policies: tuple[Authorization, ...] = ()
    removed_workloads: tuple[str, ...] = ()
    removed_services: tuple[str, ...] = ()
    removed_policies: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return any(getattr(self, name) for name in self.__slots__)


@dataclass(frozen=True, slots=True)
class StartProxy:
    """Run a workload proxy; with one fd, in that netns (its path is for messages only)."""

    request: int
    uid: str
    info: WorkloadInfo
    addresses: ProxyAddresses
    orig_src: bool | None
    netns_path: str | None = None
    agent_services: tuple[int, ...] = ()  # ports no flow may reach (WorkloadProxy's)


@dataclass(frozen=True, slots=True)
class DrainProxy:
    request: int
    uid: str
    deadline: float


@dataclass(frozen=True, slots=True)
class CertificateMaterial:
    """A workload certificate as bytes: PKCS#8 key, leaf + intermediates, roots (PEM)."""

    identity: Identity
    key_pem: bytes
    chain_pem: bytes
    roots_pem: bytes


@dataclass(frozen=True, slots=True)
class CertificateUpdate:
    material: CertificateMaterial


@dataclass(frozen=True, slots=True)
class CertificateReply:
    request: int
    material: CertificateMaterial | None
    error: str = ""


@dataclass(frozen=True, slots=True)
class ForgetCertificate:
    identity: Identity


@dataclass(frozen=True, slots=True)
class SetLogFilter:
    spec: str


@dataclass(frozen=True, slots=True)
class Penalty:
    """A flooder's identity and source IP, refused for the flood penalty
    (``PeerAdmission.limit_hit``): from the worker that closed its connection to the
    control process, which passes it to every other worker."""

    keys: tuple[Hashable, ...]


@dataclass(frozen=True, slots=True)
class Shutdown:
    """Stop every proxy, report the last connection events, close the channel, exit."""


# -- worker -> control -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ready:
    pid: int


@dataclass(frozen=True, slots=True)
class Started:
    request: int
    bound: dict[str, Address] = field(default_factory=dict)
    transparent: bool = False
    error: str = ""
    errno: int = 0


@dataclass(frozen=True, slots=True)
class Drained:
    request: int


@dataclass(frozen=True, slots=True)
class CertificateRequest:
    request: int
    identity: Identity


class Opened(NamedTuple):
    conn: int
    info: ConnectionInfo
    start: float  # time.monotonic() in the worker (the clock is system wide)
    started_at: float  # wall clock


class Moved(NamedTuple):
    conn: int
    sent: int  # totals so far
    received: int


class Closed(NamedTuple):
    conn: int
    sent: int
    received: int
    failure: Failure | None


class Refused(NamedTuple):
    """``ConnectionTracker.connection_failed``: refused before a connection was opened."""

    src: SocketAddr
    dst: Authority
    direction: Direction
    failure: Failure


class LimitHit(NamedTuple):
    """``Metrics.limit_hit``: a peer or pod hit one of the agent's protective limits."""

    limit: str


Event = Opened | Moved | Closed | Refused | LimitHit


@dataclass(frozen=True, slots=True)
class Telemetry:
    events: tuple[Event, ...]


# -- framing ------------------------------------------------------------------------------


def encode(message: object, nfds: int = 0) -> bytes:
    """One frame; its ``nfds`` descriptors must go out with its first byte."""
    if nfds > MAX_FDS:
        raise ValueError(f"{nfds} descriptors in one frame (at most {MAX_FDS})")
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    if len(payload) > MAX_FRAME:
        raise ValueError(f"message of {len(payload)} bytes is larger than {MAX_FRAME}")
    return HEADER.pack(len(payload), nfds) + payload


class FrameDecoder:
    """Bytes and received descriptors in, (message, descriptors) out, in order.

    Descriptors arrive with the bytes of the frame that carries them (the kernel never
    hands out a frame's first byte without them), so a FIFO matches them to frames.
    Descriptors not handed out (a frame still incomplete at ``close``) are closed.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._fds: deque[int] = deque()

    def feed(self, data: bytes, fds: Iterable[int] = ()) -> None:
        self._buf += data
        self._fds.extend(fds)

    def frames(self) -> list[tuple[Any, list[int]]]:
        """Every complete frame buffered so far; raises ProtocolError on garbage."""
        out: list[tuple[Any, list[int]]] = []
        while len(self._buf) >= HEADER.size:
            length, nfds = HEADER.unpack_from(self._buf)
            if length > MAX_FRAME or nfds > MAX_FDS:
                raise ProtocolError(f"bad frame header: {length} bytes, {nfds} fds")
            end = HEADER.size + length
            if len(self._buf) < end:
                break
            if len(self._fds) < nfds:
                raise ProtocolError(f"frame announces {nfds} fds, {len(self._fds)} arrived")
            payload = bytes(self._buf[HEADER.size : end])
            del self._buf[:end]
            fds = [self._fds.popleft() for _ in range(nfds)]
            try:
                message = pickle.loads(payload)
            except Exception as exc:  # unpickling can raise nearly anything on bad bytes
                _close_all(fds)
                raise ProtocolError(f"undecodable frame: {exc!r}") from exc
            out.append((message, fds))
        return out

    def close(self) -> None:
        _close_all(self._fds)
        self._fds.clear()


def _close_all(fds: Sequence[int] | Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
