"""How a proxied connection ended: ztunnel's response flags and typed failure reasons.

A ``Failure`` is made once, where the agent learns what went wrong (a resolve
error, a refused dial, a policy decision), and then carried unchanged to every
place that reports it: the access log (its ``message`` and ``side``), the metrics
(``response_flags``, from its kind) and, for SOCKS5, the reply code (from its
kind). Nothing downstream parses a message to find out what happened.

Every kind says which ``Side`` ended the connection: the client (the app that opened
it, or the peer agent on inbound), the upstream (the destination), or the agent
itself (policy, drain, a refusal, a bug).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ResponseFlag(enum.StrEnum):
    """The ``response_flags`` label and log value (reference §6.3)."""

    NONE = "-"
    CONNECT = "CONNECT"  # the upstream could not be connected (dial, TLS, CONNECT non-200)
    DENY = "DENY"  # the destination's authorization policy refused or cut the connection
    TLS_FAILURE = "TLS_FAILURE"
    H2_HANDSHAKE_FAILURE = "H2_HANDSHAKE_FAILURE"
    NETWORK_POLICY = "NETWORK_POLICY"
    IDENTITY_ERROR = "IDENTITY_ERROR"
    CERT_REVOKED = "CERT_REVOKED"

    @property
    def is_failure(self) -> bool:
        """Counted in ``istio_tcp_connections_failed_total`` (every flag but ``-``)."""
        return self is not ResponseFlag.NONE


class Side(enum.StrEnum):
    """Who ended a connection that did not complete normally (the access log's ``side``)."""

    CLIENT = "client"  # the downstream: the app (outbound) or the peer agent (inbound)
    UPSTREAM = "upstream"  # the destination: the remote agent or app (outbound), the app (inbound)
    AGENT = "agent"  # this agent: policy, drain, a refusal, a bug


class FailureKind(enum.Enum):
    """Why a connection did not complete normally; each kind has one response flag."""

    # Refused before anything was opened (a WARN "connection failed" line, no metrics).
    SELF_CALL = "self_call"  # the destination is one of the agent's own ports
    UNKNOWN_SOURCE = "unknown_source"  # the proxied workload is not (yet) in the state
    UNKNOWN_HOST = "unknown_host"  # a SOCKS5 hostname the mesh does not know
    NO_ROUTE = "no_route"  # resolution found no usable destination (NoHealthyUpstream, ...)
    TLS_HANDSHAKE = "tls_handshake"  # inbound: the peer's TLS handshake failed
    IDENTITY_REJECTED = "identity_rejected"  # inbound: the peer's certificate is not acceptable
    # Decided by authorization policy.
    DENIED = "denied"  # this agent's policy refused the connection
    POLICY_CUT = "policy_cut"  # a policy change closed an open connection
    # The upstream could not be reached.
    UPSTREAM_DENIED = "upstream_denied"  # the destination's agent answered 401
    UPSTREAM_REJECTED = "upstream_rejected"  # the destination's agent answered another non-200
    CONNECT_REFUSED = "connect_refused"
    CONNECT_TIMEOUT = "connect_timeout"
    UNREACHABLE = "unreachable"  # no route to the network or host
    CONNECT_FAILED = "connect_failed"  # any other dial, TLS, identity or HTTP/2 failure
    # After the upstream was connected.
    CLIENT_ABORTED = "client_aborted"  # the client reset or broke the connection mid-relay
    UPSTREAM_ABORTED = "upstream_aborted"  # the upstream reset or broke it mid-relay
    # Ended by this agent.
    LOOP = "loop"  # the connection came from the agent itself (a redirect or NAT loop)
    DRAINED = "drained"  # still open at the drain deadline (shutdown, pod deleted): cut
    INTERRUPTED = "interrupted"  # cancelled before completion for another reason
    INTERNAL = "internal"  # a bug in the agent (its traceback is logged by the handler)

    @property
    def flag(self) -> ResponseFlag:
        return _FLAGS.get(self, ResponseFlag.NONE)

    @property
    def side(self) -> Side:
        return _SIDES.get(self, Side.AGENT)


_FLAGS = {
    FailureKind.DENIED: ResponseFlag.DENY,
    FailureKind.POLICY_CUT: ResponseFlag.DENY,
    FailureKind.UPSTREAM_DENIED: ResponseFlag.CONNECT,
    FailureKind.UPSTREAM_REJECTED: ResponseFlag.CONNECT,
    FailureKind.CONNECT_REFUSED: ResponseFlag.CONNECT,
    FailureKind.CONNECT_TIMEOUT: ResponseFlag.CONNECT,
    FailureKind.UNREACHABLE: ResponseFlag.CONNECT,
    FailureKind.CONNECT_FAILED: ResponseFlag.CONNECT,
}


_SIDES = {
    FailureKind.TLS_HANDSHAKE: Side.CLIENT,
    FailureKind.CLIENT_ABORTED: Side.CLIENT,
    FailureKind.UPSTREAM_DENIED: Side.UPSTREAM,
    FailureKind.UPSTREAM_REJECTED: Side.UPSTREAM,
    FailureKind.CONNECT_REFUSED: Side.UPSTREAM,
    FailureKind.CONNECT_TIMEOUT: Side.UPSTREAM,
    FailureKind.UNREACHABLE: Side.UPSTREAM,
    FailureKind.CONNECT_FAILED: Side.UPSTREAM,
    FailureKind.UPSTREAM_ABORTED: Side.UPSTREAM,
}


@dataclass(frozen=True, slots=True)
class Failure:
    """A failure reason: its kind (flags, SOCKS5 reply) and the access-log message."""

    kind: FailureKind
    message: str

    @property
    def flag(self) -> ResponseFlag:
        return self.kind.flag

    @property
    def side(self) -> Side:
        return self.kind.side

    def __str__(self) -> str:
        return self.message


# The pessimistic default of a connection whose end was never recorded: it was cancelled
# (drain, its HBONE connection died) before it could finish.
INTERRUPTED = Failure(FailureKind.INTERRUPTED, "connection closed by the agent before completion")
POLICY_CUT = Failure(
    FailureKind.POLICY_CUT, "connection closed by the agent: no longer allowed by policy"
)
DRAINED = Failure(FailureKind.DRAINED, "connection closed by the agent: drain deadline reached")
