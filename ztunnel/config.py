"""Agent configuration: ztunnel's environment variable names, overridable by flags.

Precedence: command-line flag > environment variable > default. Every listener
address can be overridden so several agents can share one machine. Parsing is
strict: a bad value is a ConfigError naming the variable and what was expected.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ztunnel.errors import ConfigError
from ztunnel.model import ports
from ztunnel.model.address import format_hostport
from ztunnel.model.logfilter import LogFilter
from ztunnel.model.ports import AgentPorts

T = TypeVar("T")


class ProxyMode(enum.Enum):
    SHARED = "shared"
    DEDICATED = "dedicated"


class RedirectMode(enum.Enum):
    """How an enrolled pod's traffic reaches the agent (``redirect/modes.py`` maps each to
    its ``Redirector``)."""

    IPTABLES = "iptables"
    EBPF = "ebpf"  # tc + sk_lookup programs from ebpf/ (docs/ebpf.md)
    NONE = "none"  # someone else (istio-cni) installs the redirection


@dataclass(frozen=True, slots=True)
class WorkloadInfo:
    """PROXY_WORKLOAD_INFO: which workload a dedicated-mode agent proxies for."""

    namespace: str
    name: str
    service_account: str

    @classmethod
    def parse(cls, value: str) -> WorkloadInfo:
        parts = value.split("/")
        if len(parts) != 3 or not all(parts):
            raise ConfigError(
                "PROXY_WORKLOAD_INFO", "", f"expected <ns>/<name>/<sa>, got {value!r}"
            )
        return cls(*parts)


# A listener address: the host stays a string because "::" and "0.0.0.0" mean "every
# interface" to bind(); connections carry ``model.address.SocketAddr`` instead.
Address = tuple[str, int]


def parse_address(value: str, name: str) -> Address:
    """``ip:port``, ``[v6]:port`` or ``:port`` (all interfaces)."""
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([^:\[\]]*):(\d+)", value.strip())
    if not m:
        raise ConfigError(name, "", f"expected ip:port or [ipv6]:port, got {value!r}")
    host = m.group(1) or m.group(3) or "::"
    port = int(m.group(2) or m.group(4))
    try:
        ipaddress.ip_address(host)
    except ValueError as exc:
        raise ConfigError(name, "", f"bad IP address {host!r}") from exc
    if not 0 <= port <= 65535:
        raise ConfigError(name, "", f"port {port} out of range 0..65535")
    return host, port


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: str, name: str) -> float:
    """Go/humantime-style durations: ``24h``, ``5m``, ``1h30m``, ``500ms``, or bare seconds."""
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds) or seconds < 0:
            raise ConfigError(name, "", f"expected a duration of 0 or more seconds, got {value!r}")
        return _bounded_duration(seconds, value, name)
    total, pos = 0.0, 0
    for m in _DURATION.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(text) or not text:
        raise ConfigError(name, "", f"expected a duration like 30s, 5m or 24h, got {value!r}")
    return _bounded_duration(total, value, name)


# Past this, datetime and certificate arithmetic overflow; no setting needs more.
MAX_DURATION = 100 * 365 * 86400.0


def _bounded_duration(seconds: float, value: str, name: str) -> float:
    if seconds > MAX_DURATION:
        raise ConfigError(name, "", f"{value!r} is longer than 100 years")
    return seconds


def parse_bool(value: str, name: str) -> bool:
    low = value.strip().lower()
    if low in ("true", "1", "yes", "on"):
        return True
    if low in ("false", "0", "no", "off", ""):
        return False
    raise ConfigError(name, "", f"expected true or false, got {value!r}")


def parse_int(value: str, name: str, minimum: int = 0) -> int:
    try:
        number = int(value)
    except ValueError as exc:
        raise ConfigError(name, "", f"expected an integer, got {value!r}") from exc
    if number < minimum:
        raise ConfigError(name, "", f"must be at least {minimum}, got {number}")
    return number


def _int_at_least(minimum: int) -> Callable[[str, str], int]:
    """A field parser: an integer no smaller than ``minimum``, errors naming the setting."""
    return lambda value, name: parse_int(value, name, minimum)


DEFAULT_DRAIN_DEADLINE = 5.0
# 128 (Python's and the kernel's old default) overflowed under a burst of 1,000 handshakes.
DEFAULT_LISTEN_BACKLOG = 1024
# ztunnel's defaults (relative: ztunnel runs in / of its container).
DEFAULT_ROOT_CA = "./var/run/secrets/istio/root-cert.pem"
DEFAULT_AUTH_TOKEN = "./var/run/secrets/tokens/istio-token"
DEFAULT_INPOD_UDS = "/var/run/ztunnel/ztunnel.sock"
SYSTEM_ROOTS = "SYSTEM"  # XDS_ROOT_CA / CA_ROOT_CA value meaning "the OS trust store"


def termination_deadline(env: Mapping[str, str]) -> float:
    """ztunnel's drain deadline: CONNECTION_TERMINATION_DEADLINE if set, else derived from
    TERMINATION_GRACE_PERIOD_SECONDS (g-5 when g > 10, else g-1, at least 1 s) so the drain
    ends before the kubelet's SIGKILL, else 5 s."""
    explicit = env.get("CONNECTION_TERMINATION_DEADLINE")
    if explicit:
        return parse_duration(explicit, "CONNECTION_TERMINATION_DEADLINE")
    grace = env.get("TERMINATION_GRACE_PERIOD_SECONDS")
    if not grace:
        return DEFAULT_DRAIN_DEADLINE
    g = parse_int(grace, "TERMINATION_GRACE_PERIOD_SECONDS")
    return float(max(1, g - 5 if g > 10 else g - 1))


def _env_field(
    env: str,
    parser: Callable[[str, str], Any],
    default: Any,
    help: str,
    *,
    fallback: str | None = None,
) -> Any:
    """A setting read from ``env`` (else ``fallback``, another variable of the same meaning)."""
    meta = {"env": env, "parse": parser, "help": help, "fallback": fallback}
    return field(default=default, metadata=meta)


# Settings spread over every variable with a prefix (CA_HEADER_*): (suffix, value) pairs,
# sorted; they have no command-line flag.
Headers = tuple[tuple[str, str], ...]


def _prefix_field(prefix: str, parser: Callable[[Headers, str], Headers], help: str) -> Any:
    meta = {"env": prefix + "*", "prefix": prefix, "parse": parser, "help": help}
    return field(default=(), metadata=meta)


def _headers(items: Headers, prefix: str) -> Headers:
    """``CA_HEADER_X_FOO=bar`` -> ``("x-foo", "bar")`` (ztunnel's header naming)."""
    return tuple((name.lower().replace("_", "-"), value) for name, value in items)


def _json_values(items: Headers, prefix: str) -> Headers:
    """``ISTIO_METAJSON_<KEY>=<json>``: each value must be JSON (kept as text)."""
    for name, value in items:
        try:
            json.loads(value)
        except ValueError as exc:
            raise ConfigError(prefix + name, "", f"expected JSON, got {value!r}") from exc
    return items


def _prefixed(env: Mapping[str, str], prefix: str) -> Headers:
    return tuple(
        (key[len(prefix) :], env[key])
        for key in sorted(env)
        if key.startswith(prefix) and len(key) > len(prefix)
    )


def _mode(value: str, name: str) -> ProxyMode:
    try:
        return ProxyMode(value.strip().lower())
    except ValueError as exc:
        raise ConfigError(name, "", f"expected shared or dedicated, got {value!r}") from exc


def _redirect_mode(value: str, name: str) -> RedirectMode:
    try:
        return RedirectMode(value.strip().lower())
    except ValueError as exc:
        choices = ", ".join(m.value for m in RedirectMode)
        raise ConfigError(name, "", f"expected one of {choices}, got {value!r}") from exc


def _str(value: str, name: str) -> str:
    return value


def _abs_path(value: str, name: str) -> str:
    if not value.startswith("/"):
        raise ConfigError(name, "", f"expected an absolute path, got {value!r}")
    return value


def _opt_str(value: str, name: str) -> str | None:
    return value or None


def _workload_info(value: str, name: str) -> WorkloadInfo | None:
    return WorkloadInfo.parse(value) if value else None


def _worker_threads(value: str, name: str) -> str | None:
    """A count (``4``) or a share of the CPU quota (``50%``); resolved by ``ztunnel.workers``."""
    text = value.strip()
    if not text:
        return None
    m = re.fullmatch(r"(\d+)(%?)", text)
    if not m or int(m.group(1)) < 1 or (m.group(2) and int(m.group(1)) > 100):
        raise ConfigError(
            name, "", f"expected a number >= 1 or a percentage 1%..100%, got {value!r}"
        )
    return f"{int(m.group(1))}{m.group(2)}"


def _log_format(value: str, name: str) -> str:
    if value not in ("plain", "json"):
        raise ConfigError(name, "", f"expected plain or json, got {value!r}")
    return value


# Field -> (minimum, maximum, why), checked after parsing (Config._validate_values). The
# HTTP/2 values (frame size, windows, streams, pool timeout) are HboneSettings' to check.
_RANGES: dict[str, tuple[int, int, str]] = {
    "packet_mark": (0, 2**32 - 1, "SO_MARK is 32 bits"),
    "listen_backlog": (1, 65_535, "listen() backlog"),
}
# A certificate that is never valid.
_POSITIVE_DURATIONS = ("secret_ttl",)


@dataclass(frozen=True, slots=True)
class Config:
    """Everything the agent needs to start; see docs/configuration.md."""

    proxy_mode: ProxyMode = _env_field(
        "PROXY_MODE", _mode, ProxyMode.SHARED, "shared (in-pod, per-pod proxies) or dedicated"
    )
    redirect_mode: RedirectMode | None = _env_field(
        "REDIRECT_MODE",
        _redirect_mode,
        None,
        "how enrolled pods' traffic is redirected (shared mode): iptables, ebpf or none "
        "(default: iptables with --cluster and Kubernetes, none under istio-cni)",
    )
    bpf_pin_dir: str = _env_field(
        "ZTUNNEL_BPF_PIN_DIR",
        _abs_path,
        "/sys/fs/bpf/ztunnel",
        "the agent's own bpffs directory (eBPF mode: programs, maps, per-pod attachments)",
    )
    proxy_workload_info: WorkloadInfo | None = _env_field(
        "PROXY_WORKLOAD_INFO", _workload_info, None, "ns/name/sa of the workload (dedicated mode)"
    )
    local_xds_path: str | None = _env_field(
        "LOCAL_XDS_PATH", _opt_str, None, "ztunnel local-config YAML file"
    )
    local_xds: str | None = _env_field("LOCAL_XDS", _opt_str, None, "local-config YAML, inline")
    trust_domain: str = _env_field("TRUST_DOMAIN", _str, "cluster.local", "SPIFFE trust domain")
    cluster_id: str = _env_field(
        "CLUSTER_ID",
        _str,
        "Kubernetes",
        "cluster id (metrics, baggage, control-plane calls)",
        fallback="ISTIO_META_CLUSTER_ID",
    )
    node_name: str = _env_field("NODE_NAME", _str, "", "this node's name")
    network: str = _env_field("NETWORK", _str, "", "this node's network")
    fake_ca: bool = _env_field("FAKE_CA", parse_bool, False, "use an ephemeral in-memory CA")
    ca_dir: str | None = _env_field(
        "CA_DIR", _opt_str, None, "Istio plugged-in CA directory (ca-cert.pem, ca-key.pem, ...)"
    )
    secret_ttl: float = _env_field(
        "SECRET_TTL", parse_duration, 86400.0, "workload certificate lifetime (e.g. 24h)"
    )
    pool_max_streams_per_connection: int = _env_field(
        "POOL_MAX_STREAMS_PER_CONNECTION",
        _int_at_least(1),
        100,
        "HBONE streams per pooled connection before another is opened",
    )
    pool_unused_release_timeout: float = _env_field(
        "POOL_UNUSED_RELEASE_TIMEOUT", parse_duration, 300.0, "idle pooled connection lifetime"
    )
    http2_stream_window_size: int = _env_field(
        "HTTP2_STREAM_WINDOW_SIZE",
        _int_at_least(65535),
        4 * 1024 * 1024,
        "HTTP/2 per-stream flow-control window (bytes)",
    )
    http2_connection_window_size: int = _env_field(
        "HTTP2_CONNECTION_WINDOW_SIZE",
        _int_at_least(65535),
        16 * 1024 * 1024,
        "HTTP/2 connection flow-control window (bytes)",
    )
    http2_frame_size: int = _env_field(
        "HTTP2_FRAME_SIZE",
        _int_at_least(16384),
        1024 * 1024,
        "HTTP/2 SETTINGS_MAX_FRAME_SIZE (bytes)",
    )
    hbone_idle_timeout: float = _env_field(
        "HBONE_IDLE_TIMEOUT",
        parse_duration,
        600.0,
        "an inbound HBONE connection without streams is closed after this (0: never)",
    )
    hbone_max_pending_connects: int = _env_field(
        "HBONE_MAX_PENDING_CONNECTS",
        _int_at_least(1),
        100,
        "CONNECTs one inbound HBONE connection may have unanswered; more are refused",
    )
    hbone_max_unsent_bytes: int = _env_field(
        "HBONE_MAX_UNSENT_BYTES",
        _int_at_least(16384),
        1024 * 1024,
        "replies queued for a peer that does not read, per connection; past it it is dropped",
    )
    hbone_max_handshakes_per_ip: int = _env_field(
        "HBONE_MAX_HANDSHAKES_PER_IP",
        _int_at_least(1),
        256,
        "inbound HBONE connections from one source IP still in their TLS handshake",
    )
    hbone_max_connections_per_peer: int = _env_field(
        "HBONE_MAX_CONNECTIONS_PER_PEER",
        _int_at_least(1),
        1024,
        "open inbound HBONE connections of one peer identity (agent-wide)",
    )
    hbone_max_streams_per_peer: int = _env_field(
        "HBONE_MAX_STREAMS_PER_PEER",
        _int_at_least(1),
        20_000,
        "open inbound CONNECT streams of one peer identity (agent-wide)",
    )
    hbone_flood_penalty: float = _env_field(
        "HBONE_FLOOD_PENALTY",
        parse_duration,
        10.0,
        "a peer closed with GOAWAY(ENHANCE_YOUR_CALM) is refused this long (0: never)",
    )
    pod_max_inbound_connections: int = _env_field(
        "POD_MAX_INBOUND_CONNECTIONS",
        _int_at_least(1),
        16_384,
        "open inbound connections (HBONE and plaintext) of one proxied pod",
    )
    pod_max_outbound_connections: int = _env_field(
        "POD_MAX_OUTBOUND_CONNECTIONS",
        _int_at_least(1),
        16_384,
        "open outbound connections (captured and SOCKS5) of one proxied pod",
    )
    log_format: str = _env_field("LOG_FORMAT", _log_format, "plain", "plain or json")
    log_level: str = _env_field("RUST_LOG", _str, "info", "log filter, e.g. info or access=debug")
    socks5_enabled: bool = _env_field(
        "UNSTABLE_ENABLE_SOCKS5", parse_bool, False, "enable the SOCKS5 outbound listener"
    )
    packet_mark: int = _env_field("PACKET_MARK", parse_int, 0x539, "SO_MARK of every agent socket")
    listen_backlog: int = _env_field(
        "ZTUNNEL_LISTEN_BACKLOG",
        _int_at_least(1),
        DEFAULT_LISTEN_BACKLOG,
        "listen() backlog of the proxy listeners (the kernel caps it at net.core.somaxconn)",
    )
    enable_orig_src: bool | None = _env_field(
        "ENABLE_ORIG_SRC",
        lambda v, n: parse_bool(v, n),
        None,
        "keep the client's source IP upstream (default: when the kernel allows)",
    )
    connection_termination_deadline: float = _env_field(
        "CONNECTION_TERMINATION_DEADLINE",
        parse_duration,
        DEFAULT_DRAIN_DEADLINE,
        "drain deadline on shutdown (default: from TERMINATION_GRACE_PERIOD_SECONDS, else 5s)",
    )
    worker_threads: str | None = _env_field(
        "ZTUNNEL_WORKER_THREADS",
        _worker_threads,
        None,
        "data-plane worker processes: a number, or a share of the CPU quota such as 50% "
        "(default: the CPU quota; 1 = everything in one process)",
    )
    outbound_addr: Address = _env_field(
        "ZTUNNEL_OUTBOUND_ADDR", parse_address, ("::", ports.OUTBOUND), "outbound capture listener"
    )
    inbound_addr: Address = _env_field(
        "ZTUNNEL_INBOUND_ADDR", parse_address, ("::", ports.INBOUND), "inbound HBONE listener"
    )
    inbound_plaintext_addr: Address = _env_field(
        "ZTUNNEL_INBOUND_PLAINTEXT_ADDR",
        parse_address,
        ("::", ports.INBOUND_PLAINTEXT),
        "inbound plaintext listener",
    )
    socks5_addr: Address = _env_field(
        "ZTUNNEL_SOCKS5_ADDR", parse_address, ("127.0.0.1", ports.SOCKS5), "SOCKS5 listener"
    )
    admin_addr: Address = _env_field(
        "ZTUNNEL_ADMIN_ADDR", parse_address, ("127.0.0.1", ports.ADMIN), "admin endpoint"
    )
    stats_addr: Address = _env_field(
        "ZTUNNEL_STATS_ADDR", parse_address, ("::", ports.STATS), "Prometheus metrics"
    )
    readiness_addr: Address = _env_field(
        "ZTUNNEL_READINESS_ADDR", parse_address, ("::", ports.READINESS), "readiness probe"
    )
    # -- the Istio control plane (docs/control-plane.md); unset = standalone ----------------
    xds_address: str | None = _env_field(
        "XDS_ADDRESS", _opt_str, None, "istiod's xDS address, e.g. istiod.istio-system.svc:15012"
    )
    xds_root_ca: str = _env_field(
        "XDS_ROOT_CA", _str, DEFAULT_ROOT_CA, "roots that verify istiod (SYSTEM: the OS roots)"
    )
    alt_xds_hostname: str | None = _env_field(
        "ALT_XDS_HOSTNAME", _opt_str, None, "another name istiod's certificate may carry"
    )
    xds_headers: Headers = _prefix_field(
        "XDS_HEADER_", _headers, "extra header on the xDS stream (XDS_HEADER_X_FOO=bar)"
    )
    ca_address: str | None = _env_field(
        "CA_ADDRESS",
        _opt_str,
        None,
        "Istio CA (istiod or `ztunnel ca serve`); default: XDS_ADDRESS when no CA_DIR/FAKE_CA",
    )
    ca_root_ca: str = _env_field(
        "CA_ROOT_CA", _str, DEFAULT_ROOT_CA, "roots that verify the CA (SYSTEM: the OS roots)"
    )
    alt_ca_hostname: str | None = _env_field(
        "ALT_CA_HOSTNAME", _opt_str, None, "another name the CA's certificate may carry"
    )
    ca_headers: Headers = _prefix_field(
        "CA_HEADER_", _headers, "extra header on CA requests (CA_HEADER_X_FOO=bar)"
    )
    auth_token: str = _env_field(
        "AUTH_TOKEN",
        _str,
        DEFAULT_AUTH_TOKEN,
        "file with the agent's service-account token (re-read per call)",
    )
    inpod_uds: str | None = _env_field(
        "INPOD_UDS",
        _opt_str,
        None,
        f"istio-cni's ZDS socket (shared mode; default {DEFAULT_INPOD_UDS} with XDS_ADDRESS)",
    )
    instance_ip: str = _env_field("INSTANCE_IP", _str, "1.1.1.1", "this agent's IP (xDS node id)")
    pod_name: str = _env_field(
        "POD_NAME", _str, "", "this agent's pod name (xDS node id; never enrolled)"
    )
    pod_namespace: str = _env_field(
        "POD_NAMESPACE", _str, "", "this agent's namespace (xDS node id; never enrolled)"
    )
    xds_metadata: Headers = _prefix_field(
        "ISTIO_METAJSON_", _json_values, "xDS node metadata (ISTIO_METAJSON_<KEY>=<json>)"
    )
    # -- the Kubernetes pod source (docs/kubernetes.md) -------------------------------------
    host_proc: str = _env_field(
        "HOST_PROC", _str, "/proc", "the host's /proc, where pods' network namespaces are found"
    )
    cluster_domain: str = _env_field(
        "CLUSTER_DOMAIN", _str, "cluster.local", "service hostnames <svc>.<ns>.svc.<domain>"
    )

    @classmethod
    def env_names(cls) -> Mapping[str, str]:
        """Field name -> environment variable name."""
        return {f.name: f.metadata["env"] for f in dataclasses.fields(cls)}

    @classmethod
    def from_sources(
        cls, env: Mapping[str, str], overrides: Mapping[str, str | None] | None = None
    ) -> Config:
        """Build from the environment, then flag overrides (raw strings, by field name)."""
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            name = f.metadata["env"]
            prefix = f.metadata.get("prefix")
            if prefix:
                values[f.name] = f.metadata["parse"](_prefixed(env, prefix), prefix)
                continue
            raw = (overrides or {}).get(f.name)
            if raw is None:
                raw = env.get(name)
            if raw is None and f.metadata.get("fallback"):
                name = f.metadata["fallback"]
                raw = env.get(name)
            if raw is not None:
                values[f.name] = f.metadata["parse"](raw, name)
        if "connection_termination_deadline" not in values:
            values["connection_termination_deadline"] = termination_deadline(env)
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        if self.local_xds_path and self.local_xds:
            raise ConfigError("LOCAL_XDS_PATH", "", "LOCAL_XDS_PATH and LOCAL_XDS are exclusive")
        if self.proxy_mode is ProxyMode.DEDICATED and self.proxy_workload_info is None:
            raise ConfigError("PROXY_WORKLOAD_INFO", "", "required when PROXY_MODE=dedicated")
        if self.fake_ca and self.ca_dir:
            raise ConfigError("CA_DIR", "", "FAKE_CA and CA_DIR are exclusive")
        self._validate_control_plane()
        self._validate_values()

    def _validate_control_plane(self) -> None:
        """Combinations of the Istio control plane with the standalone sources."""
        if self.ca_address and (self.ca_dir or self.fake_ca):
            held = "CA_DIR" if self.ca_dir else "FAKE_CA"
            raise ConfigError(
                "CA_ADDRESS", "", f"a remote CA and {held} (a CA key here) are exclusive"
            )
        if self.xds_address and (self.local_xds_path or self.local_xds):
            local = "LOCAL_XDS_PATH" if self.local_xds_path else "LOCAL_XDS"
            raise ConfigError(
                "XDS_ADDRESS", "", f"XDS_ADDRESS (istiod) and {local} (standalone) are exclusive"
            )
        if self.inpod_uds and self.proxy_mode is ProxyMode.DEDICATED:
            raise ConfigError("INPOD_UDS", "", "istio-cni's pods need PROXY_MODE=shared")
        if self.zds_path and self.redirect_mode in (RedirectMode.IPTABLES, RedirectMode.EBPF):
            raise ConfigError(
                "REDIRECT_MODE",
                self.redirect_mode.value,
                "under istio-cni (ZDS) istio-cni installs the redirection",
            )

    @property
    def ca_target(self) -> str | None:
        """The Istio CA to ask: CA_ADDRESS, else (as ztunnel) istiod at XDS_ADDRESS unless a
        local CA is configured; None = a local CA (CA_DIR / FAKE_CA) or none at all."""
        if self.ca_address:
            return self.ca_address
        if self.xds_address and not (self.ca_dir or self.fake_ca):
            return self.xds_address
        return None

    @property
    def zds_path(self) -> str | None:
        """istio-cni's socket when the pods come from ZDS: INPOD_UDS, else (as ztunnel in
        shared mode under istiod) the default path when XDS_ADDRESS is set."""
        if self.inpod_uds:
            return self.inpod_uds
        if self.xds_address and self.proxy_mode is ProxyMode.SHARED:
            return DEFAULT_INPOD_UDS
        return None

    def _validate_values(self) -> None:
        """Values that parse but cannot work: refused at start, not at the first connection."""
        env = self.env_names()
        for name, (lo, hi, why) in _RANGES.items():
            value = getattr(self, name)
            if not lo <= value <= hi:
                raise ConfigError(env[name], "", f"{value} is out of range {lo}..{hi} ({why})")
        for name in _POSITIVE_DURATIONS:
            if getattr(self, name) <= 0:
                raise ConfigError(env[name], "", "must be longer than 0s")
        try:
            LogFilter.parse(self.log_level)
        except ValueError as exc:
            raise ConfigError("RUST_LOG", "", str(exc)) from exc

    def agent_ports(self) -> AgentPorts:
        """The agent's ports, as configured and by default, for the self-call checks."""
        proxy = {
            *ports.DATA_PLANE,
            self.outbound_addr[1],
            self.inbound_addr[1],
            self.inbound_plaintext_addr[1],
        }
        if self.socks5_enabled:
            proxy |= {ports.SOCKS5, self.socks5_addr[1]}
        services = {
            *ports.SERVICES,
            self.admin_addr[1],
            self.stats_addr[1],
            self.readiness_addr[1],
        }
        return AgentPorts.of(proxy, services)

    def to_dump(self) -> dict[str, Any]:
        """camelCase view for config_dump's "config" section."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("prefix"):
                value = _dump_prefixed(f.name, value)
            elif isinstance(value, enum.Enum):
                value = value.value
            elif isinstance(value, WorkloadInfo):
                value = dataclasses.asdict(value)
            elif isinstance(value, tuple):
                value = format_hostport(*value)
            head, *rest = f.name.split("_")
            out[head + "".join(p.title() for p in rest)] = value
        return out


def _dump_prefixed(name: str, value: Headers) -> Any:
    """Header values may be credentials: only their names are shown."""
    if name == "xds_metadata":
        return {key: json.loads(raw) for key, raw in value}
    return [key for key, _ in value]
