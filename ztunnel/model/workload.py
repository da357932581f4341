"""Workloads and services: the agent's view of the mesh (ztunnel's workload.proto).

Field names are the snake_case of ztunnel's local-config / config_dump camelCase
names, so translating between the two is mechanical. Everything is frozen: the
state store swaps whole objects on update instead of mutating them.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from ztunnel.model import ports
from ztunnel.model.identity import DEFAULT_CLUSTER_ID, DEFAULT_TRUST_DOMAIN, Identity

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network

HBONE_PORT = ports.HBONE  # where a mesh workload (or waypoint) accepts HBONE by default


class TunnelProtocol(enum.Enum):
    """How a workload receives mesh traffic: HBONE (in the mesh) or plain TCP."""

    TCP = "TCP"
    HBONE = "HBONE"


class HealthStatus(enum.Enum):
    HEALTHY = "Healthy"
    UNHEALTHY = "Unhealthy"


class NetworkMode(enum.Enum):
    STANDARD = "Standard"
    HOST_NETWORK = "HostNetwork"


class WorkloadType(enum.Enum):
    DEPLOYMENT = "deployment"
    CRONJOB = "cronjob"
    POD = "pod"
    JOB = "job"


class AppTunnelProtocol(enum.Enum):
    NONE = "NONE"
    PROXY = "PROXY"


class LoadBalancerMode(enum.Enum):
    UNSPECIFIED = "UnspecifiedMode"
    STRICT = "Strict"
    FAILOVER = "Failover"
    PASSTHROUGH = "Passthrough"


class HealthPolicy(enum.Enum):
    ONLY_HEALTHY = "OnlyHealthy"
    ALLOW_ALL = "AllowAll"


class Visibility(enum.Enum):
    PUBLIC = "Public"
    NAMESPACE = "Namespace"


class AppProtocol(enum.Enum):
    """What a Service port speaks (workload.proto ``AppProtocol``); istiod derives it from
    the Kubernetes port's ``appProtocol``, else its name prefix (``apps.app_protocol``)."""

    UNKNOWN = "Unknown"
    HTTP11 = "Http11"
    HTTP2 = "Http2"
    GRPC = "Grpc"
    TCP = "Tcp"
    TLS = "Tls"


@dataclass(frozen=True, slots=True)
class NetworkAddress:
    """An IP on a network; ``network/ip`` in the local config (``/1.2.3.4`` = default network)."""

    network: str
    address: IPAddress

    def __str__(self) -> str:
        return f"{self.network}/{self.address}"


@dataclass(frozen=True, slots=True)
class NamespacedHostname:
    namespace: str
    hostname: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.hostname}"


@dataclass(frozen=True, slots=True)
class GatewayAddress:
    """Where a waypoint or network gateway is: an address or a service hostname."""

    destination: NetworkAddress | NamespacedHostname
    hbone_mtls_port: int = HBONE_PORT


@dataclass(frozen=True, slots=True)
class ApplicationTunnel:
    protocol: AppTunnelProtocol = AppTunnelProtocol.NONE
    port: int | None = None


@dataclass(frozen=True, slots=True)
class Locality:
    region: str = ""
    zone: str = ""
    subzone: str = ""


@dataclass(frozen=True, slots=True)
class Workload:
    """One pod (or VM) as ztunnel sees it."""

    uid: str
    name: str
    namespace: str
    workload_ips: tuple[IPAddress, ...] = ()
    service_account: str = "default"
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    network: str = ""
    protocol: TunnelProtocol = TunnelProtocol.TCP
    network_mode: NetworkMode = NetworkMode.STANDARD
    node: str = ""
    hostname: str = ""
    waypoint: GatewayAddress | None = None
    network_gateway: GatewayAddress | None = None
    native_tunnel: bool = False
    application_tunnel: ApplicationTunnel | None = None
    authorization_policies: tuple[str, ...] = ()
    status: HealthStatus = HealthStatus.HEALTHY
    cluster_id: str = DEFAULT_CLUSTER_ID
    locality: Locality = field(default_factory=Locality)
    canonical_name: str = ""
    canonical_revision: str = ""
    workload_name: str = ""
    workload_type: WorkloadType = WorkloadType.DEPLOYMENT
    capacity: int = 1
    # "namespace/hostname" -> {service port: target port}; generates service endpoints.
    services: Mapping[str, Mapping[int, int]] = field(default_factory=dict)

    @property
    def identity(self) -> Identity:
        # An empty trust domain or service account means the default, as in ztunnel.
        return Identity(
            self.trust_domain or DEFAULT_TRUST_DOMAIN,
            self.namespace,
            self.service_account or "default",
        )


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A service's view of one workload: its uid and per-endpoint port map."""

    workload_uid: str
    port: Mapping[int, int] = field(default_factory=dict)
    status: HealthStatus = HealthStatus.HEALTHY


@dataclass(frozen=True, slots=True)
class LoadBalancer:
    routing_preferences: tuple[str, ...] = ()
    mode: LoadBalancerMode = LoadBalancerMode.UNSPECIFIED
    health_policy: HealthPolicy = HealthPolicy.ONLY_HEALTHY


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    namespace: str
    hostname: str
    vips: tuple[NetworkAddress, ...] = ()
    ports: Mapping[int, int] = field(default_factory=dict)  # service port -> target port
    # service port -> declared protocol; a port missing here is UNKNOWN (the waypoint sniffs)
    app_protocols: Mapping[int, AppProtocol] = field(default_factory=dict)
    subject_alt_names: tuple[str, ...] = ()
    waypoint: GatewayAddress | None = None
    load_balancer: LoadBalancer | None = None
    ip_families: str | None = None
    canonical: bool = True
    visibility: Visibility = Visibility.PUBLIC
    # workload uid -> Endpoint; filled from the workloads' ``services`` maps.
    endpoints: Mapping[str, Endpoint] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """``namespace/hostname``: how workloads and waypoints refer to a service."""
        return f"{self.namespace}/{self.hostname}"
