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


def relay_failure(error: str | None) -> Failure | None:
    """The outcome of a relay that ran: None when both directions ended cleanly."""
    return Failure(FailureKind.RELAY, error) if error is not None else None


def internal_failure(exc: BaseException) -> Failure:
    return Failure(FailureKind.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")


class Outcome:
    """How a tracked connection ended. Starts pessimistic, so a connection cancelled midway
    (drain, dying HBONE connection) is still closed with an explanation, not as a success."""

    __slots__ = ("failure",)

    def __init__(self) -> None:
        self.failure: Failure | None = INTERRUPTED


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
        tracked.close(outcome.failure)
