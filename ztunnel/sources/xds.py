"""The xDS client: delta ADS to istiod (``XDS_ADDRESS``), applied to the agent's state.

Theory of operation: ``run`` keeps one ``DeltaAggregatedResources`` stream open,
reconnecting forever. Each attempt dials (TLS verified with ``XDS_ROOT_CA`` against
the host or ``ALT_XDS_HOSTNAME``; the token and ``clusterid`` re-read per attempt, plus
``XDS_HEADER_*``), sends the subscriptions (with the versions already held), then
answers every response with an ACK or NACK (``DeltaXds``). Between attempts it sleeps
a backoff that starts at 10 ms and doubles up to 15 s; a stream that delivered at
least one response resets it (istiod closes streams routinely, e.g. max connection
age). ``synced`` is set once both types were ACKed: readiness waits for it; state
already applied is kept across reconnects (nothing is flushed while istiod is away).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import structlog
import trio
from google.protobuf.message import DecodeError

from ztunnel.config import SYSTEM_ROOTS, Config
from ztunnel.errors import ConfigError
from ztunnel.grpc.client import ChannelOptions, Target, connect
from ztunnel.grpc.credentials import CredentialError, RootsFile, token_metadata
from ztunnel.grpc.status import GrpcError, StatusCode
from ztunnel.model.identity import DEFAULT_CLUSTER_ID
from ztunnel.proto import xds_pb2
from ztunnel.sources.xds_protocol import DeltaXds, XdsState, build_node

LOGGER = structlog.get_logger("ztunnel.xds")

DELTA_ADS = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"
INITIAL_BACKOFF = 0.01
MAX_BACKOFF = 15.0
MAX_MESSAGE = 64 * 1024 * 1024  # a full push of a large mesh fits (ztunnel allows 200 MiB)


@dataclass(frozen=True, slots=True)
class XdsConfig:
    address: str  # XDS_ADDRESS
    root_cert: Path | None = None  # XDS_ROOT_CA; None = the system roots
    alt_hostname: str | None = None  # ALT_XDS_HOSTNAME
    token_path: Path | None = None  # AUTH_TOKEN
    cluster_id: str = DEFAULT_CLUSTER_ID
    headers: tuple[tuple[str, str], ...] = ()  # XDS_HEADER_*
    options: ChannelOptions = field(default_factory=lambda: ChannelOptions(max_message=MAX_MESSAGE))
    initial_backoff: float = INITIAL_BACKOFF
    max_backoff: float = MAX_BACKOFF

    def target(self) -> Target:
        try:
            return Target.parse(self.address)
        except ValueError as exc:
            raise ConfigError("XDS_ADDRESS", "", str(exc)) from exc


class XdsClient:
    """Streams workloads, services and policies from istiod into an ``XdsState``."""

    def __init__(self, config: XdsConfig, state: XdsState, node: xds_pb2.Node) -> None:
        self.config = config
        self._target = config.target()
        self.protocol = DeltaXds(node, state)
        self._roots = RootsFile(config.root_cert)
        self.synced = trio.Event()  # readiness: the first full sync was ACKed
        self.connected = False
        self.connections = 0  # streams opened
        self.acks = 0
        self.nacks = 0
        self.last_error: str | None = None
        self._responses = 0  # on the current stream: any resets the backoff

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Stream until cancelled; ``task_status.started()`` right away (readiness is
        ``synced``, not this call's return)."""
        task_status.started()
        backoff = self.config.initial_backoff
        while True:
            self._responses = 0
            try:
                await self._stream()
                self.last_error = None
                LOGGER.warning("xDS stream ended by the server", target=self._target)
            except (GrpcError, CredentialError) as exc:
                self.last_error = str(exc)
                LOGGER.warning("xDS stream failed", target=self._target, error=str(exc))
            finally:
                self.connected = False
            backoff = (
                self.config.initial_backoff
                if self._responses
                else min(backoff * 2, self.config.max_backoff)
            )
            await trio.sleep(backoff)

    async def _stream(self) -> None:
        metadata = await token_metadata(self.config.token_path, self.config.cluster_id)
        context = await self._roots.context() if self._target.tls else None
        alt = self.config.alt_hostname
        names = (self._target.host, alt) if alt else (self._target.host,)
        async with (
            connect(self._target, ssl_context=context, verify_names=names,
                    options=self.config.options) as conn,
            conn.call(DELTA_ADS, metadata=[*metadata, *self.config.headers]) as call,
        ):  # fmt: skip
            self.connections += 1
            self.connected = True
            for request in self.protocol.initial_requests():
                await call.send(request.SerializeToString())
            async for raw in call:
                try:
                    response = xds_pb2.DeltaDiscoveryResponse.FromString(raw)
                except DecodeError as exc:  # no nonce to NACK: start over
                    raise GrpcError(StatusCode.INTERNAL, f"undecodable response: {exc}") from exc
                self._responses += 1
                outcome = self.protocol.handle(response)
                if outcome.ack:
                    self.acks += 1
                else:
                    self.nacks += 1
                await call.send(outcome.reply.SerializeToString())
                if self.protocol.synced and not self.synced.is_set():
                    LOGGER.info("xDS initial sync complete")
                    self.synced.set()

    def not_ready_reason(self) -> str | None:
        """Readiness (ztunnel's "state manager" task): the first sync of both types."""
        if self.synced.is_set():
            return None
        why = f" ({self.last_error})" if self.last_error else ""
        return f"xDS: waiting for the initial sync from {self._target}{why}"

    def dump(self) -> dict[str, object]:
        """The client's state for config_dump."""
        return {
            "address": str(self._target),
            "connected": self.connected,
            "synced": self.synced.is_set(),
            "connections": self.connections,
            "acks": self.acks,
            "nacks": self.nacks,
            "lastError": self.last_error,
        }


def xds_config(config: Config) -> XdsConfig:
    """The client's settings from the agent's (XDS_ADDRESS, XDS_ROOT_CA, ALT_XDS_HOSTNAME,
    AUTH_TOKEN, CLUSTER_ID, XDS_HEADER_*); raises ConfigError without XDS_ADDRESS."""
    if not config.xds_address:
        raise ConfigError("XDS_ADDRESS", "", "required for the xDS client")
    root = config.xds_root_ca
    return XdsConfig(
        address=config.xds_address,
        root_cert=None if root == SYSTEM_ROOTS else Path(root),
        alt_hostname=config.alt_xds_hostname,
        token_path=Path(config.auth_token),
        cluster_id=config.cluster_id,
        headers=config.xds_headers,
    )


def xds_node(config: Config) -> xds_pb2.Node:
    """ztunnel's node from INSTANCE_IP, POD_NAME, POD_NAMESPACE, NODE_NAME, ISTIO_METAJSON_*."""
    return build_node(
        instance_ip=config.instance_ip,
        pod_name=config.pod_name,
        pod_namespace=config.pod_namespace,
        node_name=config.node_name,
        json_metadata={key: json.loads(raw) for key, raw in config.xds_metadata},
    )
