"""Per-connection budgets for the frames a peer may send without doing useful work.

Why: every frame costs us CPU, and some cost nothing to send but make us work or
reply (HEADERS+RST_STREAM "rapid reset", PING, SETTINGS, WINDOW_UPDATE, empty
DATA, streams we must refuse, frames on closed streams we must answer with
RST_STREAM). A peer that sends them faster than its budget gets
GOAWAY(ENHANCE_YOUR_CALM) and loses its connection; the other connections keep
their share of the agent. The approach is Go's and Envoy's (a budget per
connection, refilled over time) with Rust h2's "pending-accept reset" notion for
rapid reset: only resets of streams we have not answered yet are counted.

Sans-IO: time comes from the caller (an injectable clock), no trio here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields

from ztunnel.errors import ConfigError


class Limit:
    """The names of limits as they appear in logs and in ``ztunnel_limit_hits_total``."""

    RESETS = "rst_stream"
    PINGS = "ping"
    SETTINGS = "settings"
    WINDOW_UPDATES = "window_update"
    EMPTY_FRAMES = "empty_frames"
    REFUSED_STREAMS = "refused_streams"
    STREAM_ERRORS = "stream_errors"
    HEADER_LIST_SIZE = "header_list_size"
    CONCURRENT_STREAMS = "concurrent_streams"
    PENDING_CONNECTS = "pending_connects"
    UNSENT_BYTES = "unsent_bytes"
    IDLE_TIMEOUT = "idle_timeout"
    HANDSHAKE_TIMEOUT = "handshake_timeout"


@dataclass(frozen=True, slots=True)
class Budget:
    """A token bucket: ``burst`` frames at once, refilled at ``per_second``."""

    burst: int
    per_second: float

    def __post_init__(self) -> None:
        burst = self.burst
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ConfigError("hbone budget", "burst", f"must be an integer >= 1, got {burst!r}")
        rate = self.per_second
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not rate >= 0:
            raise ConfigError("hbone budget", "per_second", f"must be >= 0, got {rate!r}")
        if math.isinf(rate):
            raise ConfigError("hbone budget", "per_second", "must be finite")


@dataclass(frozen=True, slots=True)
class FloodLimits:
    """The budgets of one connection. Defaults leave a ztunnel peer (a PING every 10 s,
    a WINDOW_UPDATE per half window of data, the odd cancelled CONNECT) far below them."""

    resets: Budget = field(default_factory=lambda: Budget(200, 20.0))
    """RST_STREAM for a stream we have not answered yet, or for no open stream at all."""
    pings: Budget = field(default_factory=lambda: Budget(100, 10.0))
    """PING frames (ACKs included: unsolicited ACKs cost as much)."""
    settings: Budget = field(default_factory=lambda: Budget(100, 10.0))
    """SETTINGS frames (ACKs included)."""
    window_updates: Budget = field(default_factory=lambda: Budget(1000, 100.0))
    """WINDOW_UPDATE frames; each DATA frame we send earns one more."""
    empty_frames: Budget = field(default_factory=lambda: Budget(100, 10.0))
    """Frames that carry nothing: empty DATA without END_STREAM, PRIORITY, unknown types."""
    refused_streams: Budget = field(default_factory=lambda: Budget(100, 10.0))
    """Streams we refuse (REFUSED_STREAM: over the stream or pending-connect limit, draining)."""
    stream_errors: Budget = field(default_factory=lambda: Budget(1000, 100.0))
    """Frames on streams that are closed, which we answer with RST_STREAM ("made you reset").
    Generous: the in-flight DATA of a stream we cancelled lands here legitimately."""

    def __post_init__(self) -> None:
        for f in fields(self):
            if not isinstance(getattr(self, f.name), Budget):
                raise ConfigError("hbone flood limits", f.name, "must be a Budget")


class LimitExceeded(Exception):
    """A peer went over one of its budgets (carried out of h2 inside an h2 exception)."""

    def __init__(self, limit: str, detail: str) -> None:
        super().__init__(detail)
        self.limit = limit


class TokenBucket:
    """``take()`` spends one token; refills continuously from the clock."""

    __slots__ = ("_clock", "_last", "_rate", "_tokens", "burst")

    def __init__(self, budget: Budget, clock: Callable[[], float]) -> None:
        self.burst = float(budget.burst)
        self._rate = budget.per_second
        self._clock = clock
        self._tokens = self.burst
        self._last = clock()

    def take(self) -> bool:
        """Spend one token; False (and nothing spent) when the bucket is empty."""
        if self._tokens < 1.0:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self._rate)
            self._last = now
            if self._tokens < 1.0:
                return False
        self._tokens -= 1.0
        return True

    def credit(self, n: float) -> None:
        """Add ``n`` tokens (useful work earns budget), never above the burst."""
        self._tokens = min(self.burst, self._tokens + n)


class FloodGuard:
    """The budgets of one connection; ``charge`` raises LimitExceeded when one runs out.

    Buckets are made on first use: a well-behaved connection only ever creates the
    one or two it touches (a PING every 10 s), which keeps per-connection memory small.
    """

    __slots__ = ("_buckets", "_clock", "_limits")

    _FIELDS = {
        Limit.RESETS: "resets",
        Limit.PINGS: "pings",
        Limit.SETTINGS: "settings",
        Limit.WINDOW_UPDATES: "window_updates",
        Limit.EMPTY_FRAMES: "empty_frames",
        Limit.REFUSED_STREAMS: "refused_streams",
        Limit.STREAM_ERRORS: "stream_errors",
    }

    def __init__(self, limits: FloodLimits, clock: Callable[[], float]) -> None:
        self._limits = limits
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}

    def _bucket(self, limit: str) -> TokenBucket:
        bucket = self._buckets.get(limit)
        if bucket is None:
            budget: Budget = getattr(self._limits, self._FIELDS[limit])
            bucket = self._buckets[limit] = TokenBucket(budget, self._clock)
        return bucket

    def charge(self, limit: str) -> None:
        """One more frame of kind ``limit``; raises LimitExceeded past its budget."""
        if not self._bucket(limit).take():
            budget: Budget = getattr(self._limits, self._FIELDS[limit])
            raise LimitExceeded(
                limit,
                f"{limit} budget exceeded ({budget.burst} at once, {budget.per_second:g}/s)",
            )

    def credit(self, limit: str, n: float = 1.0) -> None:
        if limit in self._buckets:  # a bucket never made is full anyway
            self._buckets[limit].credit(n)
