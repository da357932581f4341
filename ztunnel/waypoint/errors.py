"""The waypoint's errors: bad configuration, and upstream failures carrying their answer.

An ``UpstreamError`` knows the status and body the waypoint answers with and the
Envoy response flag it is logged with (``UF`` connect failure, ``UC`` reset,
``UT`` timeout, ``UH`` no healthy upstream, ``URX`` retries exhausted), and which
retry condition it satisfies (``retry_on``), so the retry loop and the access
log never inspect foreign exceptions.
"""

from __future__ import annotations

from ztunnel.errors import ConfigError, ZtunnelError


class RouteConfigError(ConfigError):
    """An HTTPRoute / GRPCRoute / waypoint config document is malformed (names the field)."""


class WaypointError(ZtunnelError):
    """Base of the waypoint's runtime errors."""


class UpstreamError(WaypointError):
    status = 503
    flag = "UF"
    retry_on = "connect-failure"

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(detail)

    @property
    def body(self) -> bytes:
        return (
            "upstream connect error or disconnect/reset before headers. "
            f"reset reason: {self.reset_reason}"
        ).encode()

    reset_reason = "connection failure"


class UpstreamConnectError(UpstreamError):
    """The HBONE dial, the CONNECT or the app connect behind it failed."""


class UpstreamRefusedError(UpstreamError):
    """The upstream refused the stream before processing it (REFUSED_STREAM)."""

    flag = "UC"
    retry_on = "refused-stream"
    reset_reason = "remote refused stream reset"


class UpstreamResetError(UpstreamError):
    """The upstream connection broke or the stream was reset before a response arrived."""

    flag = "UC"
    retry_on = "reset"
    reset_reason = "connection termination"


class UpstreamProtocolError(UpstreamResetError):
    """The upstream's answer is not valid HTTP."""

    reset_reason = "protocol error"


class UpstreamTimeoutError(UpstreamError):
    status = 504
    flag = "UT"
    retry_on = "per-try-timeout"

    @property
    def body(self) -> bytes:
        return b"upstream request timeout"


class NoHealthyUpstreamError(UpstreamError):
    flag = "UH"
    retry_on = ""

    @property
    def body(self) -> bytes:
        return b"no healthy upstream"
