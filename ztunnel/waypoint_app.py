"""``ztunnel waypoint``: one waypoint process (a waypoint Gateway's pod) and what runs beside it.

One root nursery, like the agent's: the certificate manager (the waypoint's own SVID), admin
(15000: ``/config_dump`` with routes, L7 policies, warnings, mesh and certificates;
``/explain_request`` for one HTTP request; ``/logging``, ``/quitquitquit``), metrics (15020:
``istio_requests_total`` and friends), readiness (15021: ready once the listener is bound and
the certificate is issued), the waypoint itself (15008), and the config watcher.

Where its configuration comes from (``WaypointSource``):

* the mesh (workloads, Services, their waypoint bindings and port protocols): the cluster
  file (``--cluster FILE --cluster-prefix P``, the same derivation the agents use) or a
  ztunnel local-config file (``--local-config FILE``);
* routes and L7 policies: the cluster file's documents (HTTPRoute, GRPCRoute,
  AuthorizationPolicy with targetRefs, Service documents) and every ``--config PATH`` (a
  YAML file or a directory of them).

Every file is polled; a change reloads all of it (``WaypointState.config`` and the store are
replaced at once). A bad edit is logged naming the file and field and the last good
configuration stays in force. SIGTERM, SIGINT and ``POST /quitquitquit`` drain: the
listener closes, every HBONE peer gets a GOAWAY, open streams get ``drain_timeout``.
"""

from __future__ import annotations

import datetime
import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import structlog
import trio

from ztunnel.admin.http import Request, Response, serve_http
from ztunnel.admin.server import AdminHandler, ReadinessHandler
from ztunnel.config import parse_address, parse_duration
from ztunnel.errors import ConfigError, ZtunnelError
from ztunnel.identity.ca import CertificateAuthority
from ztunnel.identity.manager import SecretManager
from ztunnel.model.identity import Identity
from ztunnel.model.pod import MeshState
from ztunnel.policy.l7model import WaypointRef
from ztunnel.sources.clusterfile.layout import layout
from ztunnel.sources.clusterfile.mesh import mesh_state
from ztunnel.sources.clusterfile.source import check_prefix
from ztunnel.sources.clusterfile.spec import load_spec
from ztunnel.sources.dump import service_to_dump, workload_to_dump
from ztunnel.sources.localconfig import load_local_config_file
from ztunnel.state.store import StateStore
from ztunnel.telemetry.metrics import CONTENT_TYPE
from ztunnel.waypoint.explain import ExplainError, config_dump, explain_request
from ztunnel.waypoint.server import Waypoint, WaypointConfig
from ztunnel.waypoint.state import L7Config, WaypointState, read_documents
from ztunnel.waypoint.telemetry import WaypointMetrics

log = structlog.get_logger("ztunnel.waypoint")

Address = tuple[str, int]
FileStamp = tuple[int, int, int]

EXPLAIN_HELP = """\
usage: GET /explain_request?to=<vip|hostname>:<port>&method=GET&path=/x
           [&header=name:value ...][&from=spiffe://td/ns/NS/sa/SA][&ip=<source ip>]
"""


@dataclass(frozen=True, slots=True)
class WaypointSettings:
    """What ``ztunnel waypoint`` was asked to run (flags and environment, already parsed)."""

    gateway: WaypointRef
    identity: Identity
    cluster_file: str | None = None
    cluster_prefix: str | None = None
    local_config: str | None = None
    config_paths: tuple[str, ...] = ()
    listen: Address = ("0.0.0.0", 15008)
    admin_addr: Address = ("127.0.0.1", 15000)
    stats_addr: Address = ("0.0.0.0", 15020)
    readiness_addr: Address = ("0.0.0.0", 15021)
    drain_timeout: float = 5.0
    poll: float = 0.5
    secret_ttl: float = 86400.0

    def validate(self) -> None:
        if (self.cluster_file is None) == (self.local_config is None):
            raise ConfigError(
                "--cluster", "", "the mesh comes from exactly one of --cluster or --local-config"
            )
        if self.cluster_file is not None:
            check_prefix(self.cluster_prefix)


# -- configuration ---------------------------------------------------------------------------


@dataclass
class Loaded:
    """One consistent reading of every configuration file."""

    mesh: MeshState
    l7: L7Config
    warnings: list[str] = field(default_factory=list)


class WaypointSource:
    """The files a waypoint reads, read together (blocking; run in a thread)."""

    def __init__(self, settings: WaypointSettings) -> None:
        self.settings = settings

    def files(self) -> list[Path]:
        s = self.settings
        found = [Path(p) for p in (s.cluster_file, s.local_config) if p is not None]
        for base in map(Path, s.config_paths):
            found += sorted(base.rglob("*.y*ml")) if base.is_dir() else [base]
        return found

    def stamp(self) -> tuple[tuple[str, FileStamp | None], ...]:
        out: list[tuple[str, FileStamp | None]] = []
        for path in self.files():
            try:
                st = path.stat()
                out.append((str(path), (st.st_mtime_ns, st.st_size, st.st_ino)))
            except OSError:
                out.append((str(path), None))
        return tuple(out)

    def load(self) -> Loaded:
        """Raises ConfigError naming the file and field."""
        s = self.settings
        documents = read_documents(s.config_paths)
        if s.cluster_file is not None:
            spec = load_spec(s.cluster_file)
            mesh, warnings = mesh_state(spec, layout(spec, check_prefix(s.cluster_prefix)))
            documents.insert(0, (spec.source, list(spec.policies)))
        else:
            assert s.local_config is not None  # validate() guarantees one of the two
            static = load_local_config_file(s.local_config)
            mesh, warnings = MeshState(static.workloads, static.services, static.policies), []
        l7 = L7Config.from_sources(documents)
        return Loaded(mesh, l7, [*warnings, *l7.warnings])


# -- admin -------------------------------------------------------------------------------


def _explain_handler(state: WaypointState, request: Request) -> Response:
    q = request.query
    target = q.get("to", [""])[-1]
    method = q.get("method", ["GET"])[-1]
    path = unquote(q.get("path", ["/"])[-1])
    if not target:
        return Response.text(400, EXPLAIN_HELP)
    headers = []
    for raw in q.get("header", []):
        name, sep, value = raw.partition(":")
        if not sep or not name.strip():
            return Response.text(400, f"bad header {raw!r}: expected name:value\n{EXPLAIN_HELP}")
        headers.append((name.strip(), value.strip()))
    source = None
    if q.get("from"):
        try:
            source = Identity.parse(q["from"][-1])
        except ZtunnelError as exc:
            return Response.text(400, f"{exc}\n{EXPLAIN_HELP}")
    try:
        result = explain_request(
            state,
            target,
            method,
            path,
            headers=tuple(headers),
            source=source,
            source_ip=q.get("ip", ["0.0.0.0"])[-1],
        )
    except (ExplainError, ValueError) as exc:
        return Response.text(400, f"{exc}\n{EXPLAIN_HELP}")
    return Response.json(result)


def admin_handler(state: WaypointState, admin: AdminHandler) -> Callable[[Request], Response]:
    """The agent's admin routes plus ``/explain_request`` (one HTTP request, explained)."""

    def handle(request: Request) -> Response:
        if request.path == "/explain_request":
            return _explain_handler(state, request)
        return admin(request)

    return handle


def metrics_handler(metrics: WaypointMetrics) -> Callable[[Request], Response]:
    def handle(request: Request) -> Response:
        if request.path not in ("/metrics", "/stats/prometheus"):
            return Response.text(404, "Not Found\n")
        return Response(200, metrics.exposition(), CONTENT_TYPE)

    return handle


# -- the process -------------------------------------------------------------------------


class WaypointProcess:
    def __init__(
        self,
        settings: WaypointSettings,
        ca: CertificateAuthority,
        *,
        initial: Loaded | None = None,
    ) -> None:
        settings.validate()
        self.settings = settings
        self.source = WaypointSource(settings)
        loaded = initial or self.source.load()  # bad configuration fails before anything runs
        self.store = StateStore()
        self.state = WaypointState(self.store, settings.gateway)
        self.secrets = SecretManager(ca, ttl=datetime.timedelta(seconds=settings.secret_ttl))
        self.metrics = WaypointMetrics()
        self.waypoint = Waypoint(
            WaypointConfig(
                identity=settings.identity,
                listen=settings.listen,
                drain_timeout=settings.drain_timeout,
            ),
            self.state,
            self.secrets,
            metrics=self.metrics,
        )
        self.warnings: list[str] = []
        self.last_error: str | None = None
        self.reloads = 0
        self.bound: dict[str, Address] = {}
        self.certificate_error: str | None = "not yet issued"
        self._cancel: Callable[[], None] | None = None
        self._draining = False
        self.apply(loaded)

    def apply(self, loaded: Loaded) -> None:
        mesh = loaded.mesh
        self.store.replace_all(mesh.workloads, mesh.services, mesh.policies)
        self.state.config = loaded.l7
        self.warnings = loaded.warnings
        for warning in loaded.warnings:
            log.warning("configuration", message=warning)

    # -- inspection ----------------------------------------------------------------------

    def config_dump(self) -> dict[str, Any]:
        dump = config_dump(self.state)
        dump["warnings"] = list(dict.fromkeys([*dump["warnings"], *self.warnings]))
        dump.update(
            identity=str(self.settings.identity),
            listen=self.bound.get("hbone"),
            reloads=self.reloads,
            lastError=self.last_error,
            workloads=[workload_to_dump(w) for w in self.store.workloads()],
            services=[service_to_dump(s) for s in self.store.services()],
            certificates=self.secrets.dump(),
        )
        return dump

    def readiness(self) -> list[str]:
        reasons = []
        if "hbone" not in self.bound:
            reasons.append("listener: not bound")
        if self.certificate_error is not None:
            reasons.append(f"certificate {self.settings.identity}: {self.certificate_error}")
        return reasons

    # -- running -------------------------------------------------------------------------

    def run_forever(self) -> int:
        trio.run(self._main)
        return 0

    async def _main(self) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.run)
            nursery.start_soon(self._watch_signals)

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("signal received, draining", signal=signal.Signals(signum).name)
                await self.shutdown()
                return

    async def run(
        self, *, task_status: trio.TaskStatus[WaypointProcess] = trio.TASK_STATUS_IGNORED
    ) -> None:
        s = self.settings
        with trio.CancelScope() as scope:
            self._cancel = scope.cancel
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                await nursery.start(self.secrets.run)
                admin = AdminHandler(self.config_dump, on_quit=self.request_shutdown)
                handler = admin_handler(self.state, admin)
                self.bound["admin"] = (
                    s.admin_addr[0],
                    await nursery.start(serve_http, s.admin_addr, handler),
                )
                port = await nursery.start(serve_http, s.stats_addr, metrics_handler(self.metrics))
                self.bound["stats"] = (s.stats_addr[0], port)
                ready = ReadinessHandler(self.readiness)
                port = await nursery.start(serve_http, s.readiness_addr, ready)
                self.bound["readiness"] = (s.readiness_addr[0], port)
                self.bound["hbone"] = await nursery.start(self.waypoint.run)
                nursery.start_soon(self._fetch_certificate)
                nursery.start_soon(self.watch)
                log.info(
                    "waypoint ready",
                    gateway=f"{s.gateway.namespace}/{s.gateway.name}",
                    identity=str(s.identity),
                    **{k: f"{h}:{p}" for k, (h, p) in self.bound.items()},
                )
                task_status.started(self)

    async def _fetch_certificate(self) -> None:
        """Issue the SVID up front so readiness means "can serve"; retried until it works."""
        delay = 0.2
        while True:
            try:
                await self.secrets.fetch(self.settings.identity)
            except ZtunnelError as exc:
                self.certificate_error = str(exc)
                log.warning("certificate not issued yet", error=str(exc))
                await trio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            self.certificate_error = None
            return

    async def watch(self) -> None:
        """Reload everything whenever a file changes; keep the last good config on errors."""
        seen = await trio.to_thread.run_sync(self.source.stamp)
        while True:
            await trio.sleep(self.settings.poll)
            stamp = await trio.to_thread.run_sync(self.source.stamp)
            if stamp == seen:
                continue
            seen = stamp
            await self.reload()

    async def reload(self) -> bool:
        try:
            loaded = await trio.to_thread.run_sync(self.source.load)
        except ConfigError as exc:
            self.last_error = str(exc)
            log.warning(
                "configuration rejected; keeping the last good one",
                field=exc.field,
                problem=exc.problem,
            )
            return False
        self.apply(loaded)
        self.reloads += 1
        self.last_error = None
        log.info(
            "configuration reloaded",
            routes=len(loaded.l7.routes.routes),
            policies=len(loaded.l7.policies),
        )
        return True

    def request_shutdown(self) -> None:
        self.nursery.start_soon(self.shutdown)

    async def shutdown(self) -> None:
        if self._draining:
            return
        self._draining = True
        log.info("draining", deadline_seconds=self.settings.drain_timeout)
        self.waypoint.drain()
        with trio.move_on_after(self.settings.drain_timeout):
            while self.waypoint.connections:  # noqa: ASYNC110 - connections close on their own
                await trio.sleep(0.05)
        if self._cancel is not None:
            self._cancel()


def settings_from(args: Any, env: Mapping[str, str]) -> WaypointSettings:
    """``ztunnel waypoint`` flags over environment variables (POD_NAMESPACE, SERVICE_ACCOUNT,
    GATEWAY_NAME, TRUST_DOMAIN as Istio's waypoint Deployment sets them)."""
    namespace = args.namespace or env.get("POD_NAMESPACE") or "default"
    account = args.service_account or env.get("SERVICE_ACCOUNT") or ""
    gateway = args.gateway or env.get("GATEWAY_NAME") or ""
    if not account:
        raise ConfigError("--service-account", "", "required (or SERVICE_ACCOUNT)")
    if not gateway:
        raise ConfigError(
            "--gateway", "", "required: the waypoint Gateway's name (or GATEWAY_NAME)"
        )
    trust_domain = env.get("TRUST_DOMAIN") or "cluster.local"

    def addr(flag: str, name: str, default: str) -> Address:
        return parse_address(getattr(args, flag) or env.get(name) or default, name)

    return WaypointSettings(
        gateway=WaypointRef(namespace, gateway),
        identity=Identity(trust_domain, namespace, account),
        cluster_file=args.cluster,
        cluster_prefix=args.cluster_prefix,
        local_config=args.local_config,
        config_paths=tuple(args.config or ()),
        listen=addr("listen", "WAYPOINT_LISTEN_ADDR", "0.0.0.0:15008"),
        admin_addr=addr("admin", "ZTUNNEL_ADMIN_ADDR", "127.0.0.1:15000"),
        stats_addr=addr("stats", "ZTUNNEL_STATS_ADDR", "0.0.0.0:15020"),
        readiness_addr=addr("readiness", "ZTUNNEL_READINESS_ADDR", "0.0.0.0:15021"),
        drain_timeout=parse_duration(
            env.get("WAYPOINT_DRAIN_TIMEOUT", "5s"), "WAYPOINT_DRAIN_TIMEOUT"
        ),
    )


__all__: Sequence[str] = (
    "Loaded",
    "WaypointProcess",
    "WaypointSettings",
    "WaypointSource",
    "settings_from",
)
