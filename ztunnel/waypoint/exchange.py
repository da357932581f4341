"""One downstream request/response exchange, the same shape for HTTP/1.1 and HTTP/2.

The proxy pipeline (``proxy.py``) only sees this interface: read the request
body, send a response head, body and trailers, or (HTTP/1.1 only) switch
protocols after a ``101``. ``abort`` ends an exchange whose response cannot be
completed (a reset stream on HTTP/2, a closed connection on HTTP/1.1).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import trio

from ztunnel.hbone.events import ErrorCode
from ztunnel.waypoint.h2conn import H2Stream, H2StreamError
from ztunnel.waypoint.messages import Headers, Protocol, RequestHead, ResponseHead


class DownstreamGone(Exception):
    """The client went away (reset, closed): stop working on its request."""


class DownstreamProtocolError(DownstreamGone):
    """The client's request broke the protocol mid-body (bad chunk, stall): answer
    ``status`` if nothing was sent yet, then close."""

    def __init__(self, message: str, status: int = 400) -> None:
        self.status = status
        super().__init__(message)


class Exchange(ABC):
    protocol: Protocol
    head: RequestHead
    has_body: bool
    responded = False
    request_trailers: Headers = ()

    @abstractmethod
    async def receive_data(self) -> bytes:
        """The next request body chunk; b"" at its end. Raises DownstreamGone."""

    @abstractmethod
    async def send_response(self, head: ResponseHead, *, end_stream: bool = False) -> None: ...

    @abstractmethod
    async def send_data(self, data: bytes) -> None: ...

    @abstractmethod
    async def send_end(self, trailers: Headers = ()) -> None: ...

    @abstractmethod
    def abort(self) -> None:
        """The response cannot be completed: reset / close."""

    @property
    def can_upgrade(self) -> bool:
        return False

    async def switch_protocols(self, head: ResponseHead) -> tuple[trio.abc.Stream, bytes]:
        """Send ``101`` and hand over the raw stream plus bytes already read past the request."""
        raise NotImplementedError


class H2Exchange(Exchange):
    protocol = Protocol.HTTP2

    def __init__(self, stream: H2Stream, idle_timeout: float = 300.0) -> None:
        assert stream.request is not None
        self._stream = stream
        self._idle = idle_timeout
        self.head = stream.request
        self.has_body = not stream.headers_only

    async def receive_data(self) -> bytes:
        try:
            data = await self._stream.receive_data()
        except H2StreamError as exc:
            raise DownstreamGone(str(exc)) from exc
        if not data:
            self.request_trailers = self._stream.trailers
        return data

    async def send_response(self, head: ResponseHead, *, end_stream: bool = False) -> None:
        self.responded = True
        try:
            await self._stream.send_response(head, end_stream=end_stream)
        except H2StreamError as exc:
            raise DownstreamGone(str(exc)) from exc

    async def send_data(self, data: bytes) -> None:
        try:
            with trio.fail_after(self._idle):  # a client that never opens its window
                await self._stream.send_data(data)
        except H2StreamError as exc:
            raise DownstreamGone(str(exc)) from exc
        except trio.TooSlowError as exc:
            raise DownstreamGone("client stopped reading") from exc

    async def send_end(self, trailers: Headers = ()) -> None:
        try:
            if trailers:
                await self._stream.send_trailers(trailers)
            else:
                await self._stream.send_end()
        except H2StreamError as exc:
            raise DownstreamGone(str(exc)) from exc

    def abort(self) -> None:
        self._stream.reset(ErrorCode.INTERNAL_ERROR)
