"""Every HBONE / HTTP/2 setting in one value, built once from ``Config``.

Why one object: the sizes and timeouts used to travel as loose scalars from the
config through the proxy, the pool and the connection into the engine, each layer
with its own defaults. ``HboneSettings`` is validated when it is made, so a value
that cannot work (a frame size HTTP/2 forbids, a zero timeout) is refused at
startup with a ``ConfigError`` naming the setting instead of failing per
connection later. Defaults are ztunnel's (reference §1.5, §1.6).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ztunnel.config import Config
from ztunnel.errors import ConfigError
from ztunnel.hbone.limits import FloodLimits

KIB = 1024
MIB = 1024 * KIB

# RFC 9113 §6.5.2 / §6.9.1 limits.
MIN_FRAME_SIZE = 16_384
MAX_FRAME_SIZE = 16_777_215
MAX_WINDOW = 2**31 - 1
DEFAULT_CONNECTION_WINDOW = 65_535  # a connection window can only grow from here


@dataclass(frozen=True, slots=True)
class HboneSettings:
    """HTTP/2 settings of both roles plus the pool's and the connections' timers."""

    stream_window: int = 4 * MIB
    """SETTINGS_INITIAL_WINDOW_SIZE we advertise (``HTTP2_STREAM_WINDOW_SIZE``)."""
    connection_window: int = 16 * MIB
    """Our receive window for the whole connection (``HTTP2_CONNECTION_WINDOW_SIZE``)."""
    max_frame_size: int = 1 * MIB
    """SETTINGS_MAX_FRAME_SIZE we advertise (``HTTP2_FRAME_SIZE``)."""
    client_max_header_list_size: int = 16 * KIB
    """SETTINGS_MAX_HEADER_LIST_SIZE a client advertises (bounds response headers)."""
    server_max_header_list_size: int = 64 * KIB
    """SETTINGS_MAX_HEADER_LIST_SIZE a server advertises (bounds CONNECT headers)."""
    max_concurrent_streams: int = 200
    """SETTINGS_MAX_CONCURRENT_STREAMS a server advertises (and the handlers it runs)."""
    pool_max_streams: int = 100
    """Streams per pooled client connection (``POOL_MAX_STREAMS_PER_CONNECTION``)."""
    pool_idle_timeout: float = 300.0
    """An unused pooled connection closes after this (``POOL_UNUSED_RELEASE_TIMEOUT``)."""
    ping_interval: float | None = 10.0
    """Seconds between keepalive PINGs; None disables them (tests, benchmarks)."""
    ping_timeout: float = 20.0
    """A connection whose PING is not answered within this is dropped."""
    connect_response_timeout: float = 10.0
    """How long a client waits for the answer to its CONNECT."""
    drain_timeout: float = 30.0
    """A draining server connection closes after this even with open streams."""
    tls_handshake_timeout: float = 10.0
    """Bound of one TLS handshake (dial and accept)."""
    # -- limits against hostile or broken peers (docs/reliability.md) -------------------
    max_pending_connects: int = 100
    """CONNECTs a server connection has not answered yet (resolve, policy, app connect
    in progress); more are refused with REFUSED_STREAM. A ztunnel pool sends at most
    ``POOL_MAX_STREAMS_PER_CONNECTION`` (100) at once."""
    idle_timeout: float | None = 600.0
    """A server connection with no stream for this long gets GOAWAY and is closed
    (``HBONE_IDLE_TIMEOUT``; None: never). Twice the client pool's 5 min release, so a
    ztunnel client always lets go first and only parked connections meet it."""
    max_unsent_bytes: int = 1 * MIB
    """Replies to the peer's own frames (PING/SETTINGS ACKs, RST_STREAMs, 400s) allowed
    to pile up while the peer does not read; past it the connection is dropped."""
    frames_per_turn: int = 100
    """Frames one connection's reader handles before it lets every other task run once:
    a peer's burst of small frames cannot hold the event loop."""
    flood: FloodLimits = field(default_factory=FloodLimits)
    """Per-connection budgets of frames that do no useful work (limits.py)."""

    def __post_init__(self) -> None:
        _check_int(self, "stream_window", 1, MAX_WINDOW)
        _check_int(self, "connection_window", DEFAULT_CONNECTION_WINDOW, MAX_WINDOW)
        _check_int(self, "max_frame_size", MIN_FRAME_SIZE, MAX_FRAME_SIZE)
        _check_int(self, "client_max_header_list_size", 1, MAX_WINDOW)
        _check_int(self, "server_max_header_list_size", 1, MAX_WINDOW)
        _check_int(self, "max_concurrent_streams", 1, MAX_WINDOW)
        _check_int(self, "pool_max_streams", 1, MAX_WINDOW)
        _check_seconds(self, "pool_idle_timeout", allow_zero=True)
        if self.ping_interval is not None:
            _check_seconds(self, "ping_interval")
        _check_seconds(self, "ping_timeout")
        _check_seconds(self, "connect_response_timeout")
        _check_seconds(self, "drain_timeout", allow_zero=True)
        _check_seconds(self, "tls_handshake_timeout")
        _check_int(self, "max_pending_connects", 1, MAX_WINDOW)
        if self.idle_timeout is not None:
            _check_seconds(self, "idle_timeout")
        _check_int(self, "max_unsent_bytes", 1, MAX_WINDOW)
        _check_int(self, "frames_per_turn", 1, MAX_WINDOW)
        if not isinstance(self.flood, FloodLimits):
            raise ConfigError(_name("flood"), "", "must be FloodLimits")

    @classmethod
    def from_config(cls, config: Config) -> HboneSettings:
        """The agent's settings: ztunnel's env-configurable values, the rest its defaults.

        Raises ConfigError naming the environment variable of a value that cannot work.
        """
        return cls(
            stream_window=config.http2_stream_window_size,
            connection_window=config.http2_connection_window_size,
            max_frame_size=config.http2_frame_size,
            pool_max_streams=config.pool_max_streams_per_connection,
            pool_idle_timeout=config.pool_unused_release_timeout,
            idle_timeout=config.hbone_idle_timeout or None,
            max_pending_connects=config.hbone_max_pending_connects,
            max_unsent_bytes=config.hbone_max_unsent_bytes,
        )


# The name a ConfigError gives: ztunnel's environment variable where there is one.
_SETTING_NAMES = {
    "stream_window": "HTTP2_STREAM_WINDOW_SIZE",
    "connection_window": "HTTP2_CONNECTION_WINDOW_SIZE",
    "max_frame_size": "HTTP2_FRAME_SIZE",
    "pool_max_streams": "POOL_MAX_STREAMS_PER_CONNECTION",
    "pool_idle_timeout": "POOL_UNUSED_RELEASE_TIMEOUT",
    "idle_timeout": "HBONE_IDLE_TIMEOUT",
    "max_pending_connects": "HBONE_MAX_PENDING_CONNECTS",
    "max_unsent_bytes": "HBONE_MAX_UNSENT_BYTES",
}


def _name(field: str) -> str:
    return _SETTING_NAMES.get(field, f"hbone {field}")


def _check_int(settings: HboneSettings, field: str, low: int, high: int) -> None:
    value = getattr(settings, field)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(_name(field), "", f"must be an integer in {low}..{high}, got {value!r}")


def _check_seconds(settings: HboneSettings, field: str, *, allow_zero: bool = False) -> None:
    value = getattr(settings, field)
    # Written so that NaN fails too.
    valid = isinstance(value, int | float) and (value >= 0 if allow_zero else value > 0)
    if isinstance(value, bool) or not valid:
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(_name(field), "", f"must be a number of seconds {bound}, got {value!r}")
