"""How the flows turn what went wrong into a ``Failure`` (model/outcome.py), in one place.

The flows catch only the closed taxonomy of network trouble (``NETWORK_ERRORS``):
OS and TLS errors, trio's broken/closed/too-slow stream errors, and the agent's
own ``ZtunnelError`` subclasses (HBONE, resolution, identity, CA). Anything else
is a bug: ``closing`` records it on the tracked connection as an internal failure
and lets it propagate to the listener's handler, which logs it with its traceback.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager

import trio

from ztunnel.errors import ZtunnelError
from ztunnel.hbone.errors import HboneStatusError
from ztunnel.hbone.stream import HboneStream
from ztunnel.model.outcome import INTERRUPTED, Failure, FailureKind
from ztunnel.telemetry.connections import TrackedConnection

# ssl.SSLError is an OSError; TLSHandshakeError, HboneError, ResolveError, TLSIdentityError
# and CAError are ZtunnelErrors.
NETWORK_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
    ZtunnelError,
)

_UNREACHABLE = frozenset({errno.ENETUNREACH, errno.EHOSTUNREACH})


def describe(exc: BaseException) -> str:
    """A short, log-friendly reason, following the chain to the OS error if any."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror.lower()
        seen = seen.__cause__ or seen.__context__
    return str(exc) or type(exc).__name__


def connect_kind(exc: BaseException) -> FailureKind:
    """Which connect failure ``exc`` (one of ``NETWORK_ERRORS``) is."""
    if isinstance(exc, HboneStatusError):
        return FailureKind.UPSTREAM_DENIED if exc.status == 401 else FailureKind.UPSTREAM_REJECTED
    if isinstance(exc, trio.TooSlowError | TimeoutError):
        return FailureKind.CONNECT_TIMEOUT
    if isinstance(exc, ConnectionRefusedError):
        return FailureKind.CONNECT_REFUSED
    if isinstance(exc, OSError) and exc.errno in _UNREACHABLE:
        return FailureKind.UNREACHABLE
    return FailureKind.CONNECT_FAILED


def upstream_failure(exc: BaseException) -> Failure:
    """Outbound: the upstream (pool or TCP dial) could not be opened."""
    if isinstance(exc, HboneStatusError):
        return Failure(connect_kind(exc), f"http status: {exc.status}")
    # Our own errors already say what failed; foreign ones are reduced to their OS reason.
    reason = str(exc) if isinstance(exc, ZtunnelError) else describe(exc)
    return Failure(connect_kind(exc), f"connect to upstream failed: {reason}")


def relay_failure(error: str | None, client_failed: bool) -> Failure | None:
    """The outcome of a relay that ran: None when both directions ended cleanly, else who
    aborted it (``client_failed``: the read or write that failed was the client's)."""
    if error is None:
        return None
    if client_failed:
        return Failure(FailureKind.CLIENT_ABORTED, f"connection aborted by the client: {error}")
    return Failure(FailureKind.UPSTREAM_ABORTED, f"connection aborted by the upstream: {error}")


def internal_failure(exc: BaseException) -> Failure:
    return Failure(FailureKind.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")


def peer_error(stream: object) -> str | None:
    """Why the peer broke ``stream`` underneath us, if it is an HBONE stream it broke."""
    return stream.peer_error if isinstance(stream, HboneStream) else None


class Outcome:
    """How a tracked connection ended. Starts pessimistic, so a connection cancelled midway
    (drain, dying HBONE connection) is still closed with an explanation, not as a success.

    A flow names its ``client`` and ``upstream`` streams once it relays: a cancellation
    that comes with one of them broken by its peer (the HBONE connection under it died,
    and took the relay's task with it) is that side's abort, not the agent's.
    """

    __slots__ = ("client", "failure", "upstream")

    def __init__(self) -> None:
        self.failure: Failure | None = INTERRUPTED
        self.client: object = None
        self.upstream: object = None

    def settled(self) -> Failure | None:
        if self.failure is INTERRUPTED:
            for stream, client in ((self.client, True), (self.upstream, False)):
                if (why := peer_error(stream)) is not None:
                    return relay_failure(why, client_failed=client)
        return self.failure


@contextmanager
def closing(tracked: TrackedConnection) -> Iterator[Outcome]:
    """Close ``tracked`` exactly once with the outcome the block recorded.

    A bug in the block (any exception outside ``NETWORK_ERRORS``, which the flows catch
    where they happen) closes the connection as an internal failure and propagates, so
    the handler logs its traceback.
    """
    outcome = Outcome()
    try:
        yield outcome
    except Exception as exc:  # not swallowed: recorded, then re-raised to the handler
        outcome.failure = internal_failure(exc)
        raise
    finally:
        tracked.close(outcome.settled())
