"""Who may open one more connection or stream: limits per peer and per pod, and a penalty.

Why: the per-connection budgets (``hbone/limits.py``) bound what one connection costs,
but not what one peer costs: a flooder that gets GOAWAY(ENHANCE_YOUR_CALM) reconnects
and takes a fresh budget (and a TLS handshake of our CPU) each time, and a peer may
open many connections or streams at once. This module counts, agent-wide, the
connections still in their TLS handshake per source IP, the HBONE connections and
CONNECT streams per verified peer identity, and, per proxied pod, its inbound and
outbound connections; past a limit the newest is refused. A peer whose connection was
closed for a flood is refused (by identity and by source IP) for ``penalty`` seconds.

Each refusal names the limit (``Limit``, for ``ztunnel_limit_hits_total``) and says
whether to log it: once per key while the key stays at its limit, so a refused flood
never becomes a log flood.

Sans-IO: counters and a clock passed in (``time.monotonic`` in the agent, a fake in
tests); no trio here. Keys are removed when their count returns to zero and expired
penalties are pruned, so the memory is bounded by what is open now.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, replace

from ztunnel.config import Config
from ztunnel.errors import ConfigError
from ztunnel.hbone.limits import Limit


class PeerLimit:
    """Names of the limits of this module in logs and ``ztunnel_limit_hits_total``."""

    HANDSHAKES_PER_IP = "handshakes_per_ip"
    CONNECTIONS_PER_IDENTITY = "connections_per_identity"
    STREAMS_PER_IDENTITY = "streams_per_identity"
    POD_INBOUND_CONNECTIONS = "pod_inbound_connections"
    POD_OUTBOUND_CONNECTIONS = "pod_outbound_connections"
    PENALTY = "penalty"


# The flood budgets after which the HBONE server sends GOAWAY(ENHANCE_YOUR_CALM): the
# peer flooded on purpose (a ztunnel peer stays far below them), so it earns the penalty.
# Not the header-block cap: one oversized block is not a flood (its memory is capped per
# connection already), and it would lock out every client behind the same address.
PENALIZED = frozenset(
    {
        Limit.RESETS,
        Limit.PINGS,
        Limit.SETTINGS,
        Limit.WINDOW_UPDATES,
        Limit.EMPTY_FRAMES,
        Limit.REFUSED_STREAMS,
        Limit.STREAM_ERRORS,
    }
)

_MAX_PENALTIES = 65_536  # penalised keys remembered at once; the oldest go first

_COUNTED = (  # the PeerLimits fields that count open things (a worker gets a share)
    "handshakes_per_ip",
    "connections_per_identity",
    "streams_per_identity",
    "pod_inbound_connections",
    "pod_outbound_connections",
)


@dataclass(frozen=True, slots=True)
class PeerLimits:
    """Defaults leave room for a busy ztunnel peer (one pooled connection per source
    identity, destination identity and address, 100 streams each) and stop one
    certificate or address from taking the agent."""

    handshakes_per_ip: int = 256
    """Connections from one source IP still in their TLS handshake
    (``HBONE_MAX_HANDSHAKES_PER_IP``)."""
    connections_per_identity: int = 1024
    """Open HBONE connections of one peer identity (``HBONE_MAX_CONNECTIONS_PER_PEER``)."""
    streams_per_identity: int = 20_000
    """Open CONNECT streams of one peer identity (``HBONE_MAX_STREAMS_PER_PEER``)."""
    pod_inbound_connections: int = 16_384
    """Open inbound connections (HBONE and plaintext) of one pod
    (``POD_MAX_INBOUND_CONNECTIONS``)."""
    pod_outbound_connections: int = 16_384
    """Open outbound connections (captured and SOCKS5) of one pod
    (``POD_MAX_OUTBOUND_CONNECTIONS``)."""
    penalty: float = 10.0
    """Seconds a peer closed with ENHANCE_YOUR_CALM is refused (``HBONE_FLOOD_PENALTY``;
    0: none)."""

    @classmethod
    def from_config(cls, config: Config) -> PeerLimits:
        return cls(
            handshakes_per_ip=config.hbone_max_handshakes_per_ip,
            connections_per_identity=config.hbone_max_connections_per_peer,
            streams_per_identity=config.hbone_max_streams_per_peer,
            pod_inbound_connections=config.pod_max_inbound_connections,
            pod_outbound_connections=config.pod_max_outbound_connections,
            penalty=config.hbone_flood_penalty,
        )

    def share(self, workers: int) -> PeerLimits:
        """What one of ``workers`` data-plane processes may admit: each count divided
        by the worker count (at least 1), so the processes together never admit more
        than the limit. The penalty is not divided: it is broadcast to every worker.

        Why a share and not one count in the control process: asking it costs a round
        trip per handshake, connection, stream and pod connection (measured in
        ``bench/admission_micro.py``), on the accept path, and stalls every worker while
        the control process is busy. The price of a share: the kernel spreads a peer's
        connections over the workers by 4-tuple hash, so a peer can be refused a little
        before the whole limit (when its share in one worker is used up first), never
        after it (unless the limit is below the worker count: each admits at least one)."""
        if workers <= 1:
            return self
        return replace(
            self,
            **{name: max(1, getattr(self, name) // workers) for name in _COUNTED},
        )

    def __post_init__(self) -> None:
        for name in _COUNTED:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError("peer limits", name, f"must be an integer >= 1, got {value!r}")
        penalty = self.penalty
        if isinstance(penalty, bool) or not isinstance(penalty, int | float) or not penalty >= 0:
            raise ConfigError("peer limits", "penalty", f"must be seconds >= 0, got {penalty!r}")


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why one more was refused: the limit's name, and whether this is the first
    refusal of ``key`` since it was last below its limit (log it then, only then)."""

    limit: str
    log: bool


class Counted:
    """Open things per key, at most ``maximum`` each."""

    __slots__ = ("_counts", "_limit", "_logged", "maximum")

    def __init__(self, limit: str, maximum: int) -> None:
        self._limit = limit
        self.maximum = maximum
        self._counts: dict[Hashable, int] = {}
        self._logged: set[Hashable] = set()  # keys refused since they were last below

    def acquire(self, key: Hashable) -> Refusal | None:
        """Count one more for ``key``; a Refusal (nothing counted) at the limit."""
        count = self._counts.get(key, 0)
        if count >= self.maximum:
            first = key not in self._logged
            self._logged.add(key)
            return Refusal(self._limit, first)
        self._counts[key] = count + 1
        return None

    def release(self, key: Hashable) -> None:
        count = self._counts.get(key, 0) - 1
        if count <= 0:
            self._counts.pop(key, None)
        else:
            self._counts[key] = count
        if count < self.maximum:
            self._logged.discard(key)

    def count(self, key: Hashable) -> int:
        return self._counts.get(key, 0)

    def __len__(self) -> int:
        return len(self._counts)


class Penalties:
    """Keys refused until a deadline."""

    __slots__ = ("_clock", "_logged", "_until", "seconds")

    def __init__(self, seconds: float, clock: Callable[[], float]) -> None:
        self.seconds = seconds
        self._clock = clock
        self._until: dict[Hashable, float] = {}
        self._logged: set[Hashable] = set()

    def add(self, *keys: Hashable) -> None:
        if self.seconds <= 0:
            return
        until = self._clock() + self.seconds
        for key in keys:
            self._until.pop(key, None)  # re-insert: insertion order is expiry order
            self._until[key] = until
            self._logged.discard(key)
        if len(self._until) > _MAX_PENALTIES:
            self._prune()

    def check(self, key: Hashable) -> Refusal | None:
        until = self._until.get(key)
        if until is None:
            return None
        if self._clock() >= until:
            del self._until[key]
            self._logged.discard(key)
            return None
        first = key not in self._logged
        self._logged.add(key)
        return Refusal(PeerLimit.PENALTY, first)

    def _prune(self) -> None:
        now = self._clock()
        for key in [k for k, until in self._until.items() if until <= now]:
            del self._until[key]
            self._logged.discard(key)
        while len(self._until) > _MAX_PENALTIES:  # all still running: forget the oldest
            key = next(iter(self._until))
            del self._until[key]
            self._logged.discard(key)

    def __len__(self) -> int:
        return len(self._until)


class PeerAdmission:
    """The agent-wide counters of peers: handshakes per source IP, connections and
    streams per identity, and the flood penalty. One per agent (``ProxyContext``)."""

    def __init__(
        self, limits: PeerLimits | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limits = limits = limits or PeerLimits()
        self.handshakes = Counted(PeerLimit.HANDSHAKES_PER_IP, limits.handshakes_per_ip)
        self.connections = Counted(
            PeerLimit.CONNECTIONS_PER_IDENTITY, limits.connections_per_identity
        )
        self.streams = Counted(PeerLimit.STREAMS_PER_IDENTITY, limits.streams_per_identity)
        self.penalties = Penalties(limits.penalty, clock)
        # Called with the keys of each new penalty: a worker process tells the others
        # (through the control process), so a flooder's reconnects that the kernel
        # hands to another worker are refused as well.
        self.on_penalty: Callable[[tuple[Hashable, ...]], None] | None = None

    def begin_handshake(self, ip: Hashable) -> Refusal | None:
        """A connection from ``ip`` arrived: refused while ``ip`` is penalised or has
        ``handshakes_per_ip`` handshakes running; else counted until ``end_handshake``."""
        return self.penalties.check(("ip", ip)) or self.handshakes.acquire(ip)

    def end_handshake(self, ip: Hashable) -> None:
        self.handshakes.release(ip)

    def admit_connection(self, identity: Hashable) -> Refusal | None:
        """A verified connection of ``identity``: refused while it is penalised or has
        ``connections_per_identity`` open; else counted until ``release_connection``."""
        return self.penalties.check(("id", identity)) or self.connections.acquire(identity)

    def release_connection(self, identity: Hashable) -> None:
        self.connections.release(identity)

    def admit_stream(self, identity: Hashable) -> Refusal | None:
        return self.streams.acquire(identity)

    def release_stream(self, identity: Hashable) -> None:
        self.streams.release(identity)

    def limit_hit(self, limit: str, identity: Hashable, ip: Hashable) -> bool:
        """A connection of ``identity`` from ``ip`` hit ``limit``; True when that earns the
        penalty (a flood the server answered with ENHANCE_YOUR_CALM)."""
        if limit not in PENALIZED or self.penalties.seconds <= 0:
            return False
        keys = (("id", identity), ("ip", ip))
        self.penalties.add(*keys)
        if self.on_penalty is not None:
            self.on_penalty(keys)
        return True

    def penalize(self, keys: tuple[Hashable, ...]) -> None:
        """A penalty another worker process gave (``on_penalty`` there): from now on."""
        self.penalties.add(*keys)


class PodConnections:
    """One pod's open connections per direction (``WorkloadProxy``)."""

    def __init__(self, limits: PeerLimits | None = None) -> None:
        limits = limits or PeerLimits()
        self._counted = {
            "inbound": Counted(PeerLimit.POD_INBOUND_CONNECTIONS, limits.pod_inbound_connections),
            "outbound": Counted(
                PeerLimit.POD_OUTBOUND_CONNECTIONS, limits.pod_outbound_connections
            ),
        }

    def acquire(self, direction: str) -> Refusal | None:
        return self._counted[direction].acquire(direction)

    def release(self, direction: str) -> None:
        self._counted[direction].release(direction)

    def count(self, direction: str) -> int:
        return self._counted[direction].count(direction)

    def maximum(self, direction: str) -> int:
        return self._counted[direction].maximum
