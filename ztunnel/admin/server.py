"""The three small servers: admin (15000), metrics (15020) and readiness (15021).

Each is a synchronous handler (a plain object, testable without sockets) plus
an ``async def serve_*(target, ..., *, task_status)`` that runs it on the
shared HTTP core and reports the bound port. Paths, methods and response texts
follow ztunnel's ``src/admin.rs`` and ``src/readiness/server.rs``; readiness
answers 503 (not ztunnel's 500) while anything is pending.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

import trio
from prometheus_client import CollectorRegistry, generate_latest

import ztunnel
from ztunnel.admin import debug
from ztunnel.admin.http import ListenTarget, Request, Response, is_loopback_host, serve_http
from ztunnel.model import ports
from ztunnel.model.address import canonical_ip
from ztunnel.telemetry import logging as zlog
from ztunnel.telemetry.connections import ConnectionTracker, TrackedConnection
from ztunnel.telemetry.metrics import CONTENT_TYPE, Metrics

if TYPE_CHECKING:
    from ztunnel.admin.ui import UiRoutes

DumpProvider = Callable[[], Mapping[str, object]]
# (from, to) -> JSON result; raises ValueError (answered 400) for queries it cannot resolve.
Explainer = Callable[[str, str], Mapping[str, object]]
ReadinessProbe = Callable[[], Sequence[str]]

ADMIN_ADDRESS = ("127.0.0.1", ports.ADMIN)
METRICS_ADDRESS = ("0.0.0.0", ports.STATS)
READ_ONLY_METHODS = frozenset({"GET", "HEAD"})
READINESS_ADDRESS = ("0.0.0.0", ports.READINESS)

LOGGING_HELP = """\
usage: POST /logging\t\t\t\t(To list current level)
       POST /logging?level=<level>\t\t(To change global levels)
       POST /logging?level=<target>=<level>,<level>\t(To change specific targets' levels)
       POST /logging?reset\t\t\t(To reset to the startup level)

hint: loglevel:\terror|warn|info|debug|trace|off
hint: target:\tztunnel::proxy (or ztunnel.proxy), access, ...
"""

EXPLAIN_HELP = """\
usage: GET /explain?from=<source>&to=<destination>:<port>
  source:      a pod (namespace/name or name), a SPIFFE identity, or an IP
  destination: a pod, an IP or a service VIP/hostname, with a port
"""

ENDPOINTS: tuple[tuple[str, str], ...] = (
    ("/", "this page: the live graph of this node's connections"),
    ("/api/graph", "JSON: the graph's nodes and edges (also `ztunnel ctl graph`)"),
    ("/api/connections", "JSON: recent ended connections and their access-log lines"),
    ("/config_dump", "dump the current ztunnel configuration, connections and certificates"),
    ("/logging", "POST: query or change the log level"),
    ("/quitquitquit", "POST: start a graceful shutdown (drain, then exit)"),
    (
        "/explain?from=&lt;pod|identity|ip&gt;&to=&lt;pod|ip|service&gt;:&lt;port&gt;",
        "L4 policy decision for a connection, and why",
    ),
    ("/debug/tasks", "dump the trio task tree"),
    ("/debug/memory", "RSS, gc counters, open fds, tracemalloc top allocations"),
)


def build_info() -> dict[str, str]:
    """The config_dump ``version`` object (ztunnel's BuildInfo, with Python in place of Rust)."""
    return {
        "version": ztunnel.__version__,
        "gitRevision": "unknown",
        "pythonVersion": sys.version.split()[0],
        "buildProfile": "release",
        "buildStatus": "Clean",
        "gitTag": ztunnel.__version__,
        "istioVersion": "unknown",
    }


class AdminHandler:
    """Routes admin requests; ``on_quit`` is the integrator's graceful-drain trigger."""

    def __init__(
        self,
        dump_provider: DumpProvider = dict,
        tracker: ConnectionTracker | None = None,
        on_quit: Callable[[], None] | None = None,
        explainer: Explainer | None = None,
        on_log_filter: Callable[[str], None] | None = None,
    ) -> None:
        self._dump_provider = dump_provider
        self._on_log_filter = on_log_filter
        self._explainer = explainer
        self._tracker = tracker
        self._on_quit = on_quit
        self._routes: dict[str, Callable[[Request], Response]] = {
            "/config_dump": self._config_dump,
            "/logging": self._logging,
            "/quitquitquit": self._quit,
            "/explain": self._explain,
            "/debug/tasks": self._tasks,
            "/debug/memory": self._memory,
        }

    @functools.cached_property
    def ui(self) -> UiRoutes:
        """The UI's routes, built (and its modules imported: pages, assets, the ctl
        formatters) on the first request that is not one of the admin's own."""
        from ztunnel.admin.ui import UiRoutes

        return UiRoutes(self.config_dump, self._tracker, ENDPOINTS)

    def __call__(self, request: Request) -> Response:
        route = self._routes.get(request.path) or self.ui.routes.get(request.path)
        if route is None:
            return Response.text(404, "Not Found\n")
        if request.method not in READ_ONLY_METHODS and not _from_loopback(request):
            # The admin binds 127.0.0.1 by default; if an operator binds it wider, reading
            # stays possible but draining the agent or changing its logging does not.
            return Response.text(403, "state-changing requests are accepted from loopback only\n")
        if request.method == "POST" and not _same_machine_origin(request):
            # A page in the operator's browser may POST here (a form needs no CORS):
            # state-changing requests from another origin are refused.
            return Response.text(403, "cross-origin POST refused\n")
        return route(request)

    def _config_dump(self, _request: Request) -> Response:
        return Response.json(self.config_dump())

    def config_dump(self) -> dict[str, object]:
        """The provider's dump plus ``version``, ``connections`` and per-pod connections."""
        dump = dict(self._dump_provider())
        dump.setdefault("version", build_info())
        if self._tracker is not None:
            conns = self._tracker.open_connections()
            dump["connections"] = [c.dump() for c in conns]
            dump["workloadState"] = _with_connections(dump.get("workloadState"), conns)
        return dump

    def _logging(self, request: Request) -> Response:
        if request.method != "POST":
            return Response.text(405, "Invalid HTTP method\n" + LOGGING_HELP)
        if "reset" in request.query:
            zlog.reset()
        levels = request.query.get("level")
        if levels:
            try:
                zlog.set_filter(levels[-1])
            except ValueError as exc:
                return Response.text(400, f"{exc}\n{LOGGING_HELP}")
        if ("reset" in request.query or levels) and self._on_log_filter is not None:
            self._on_log_filter(zlog.current_filter())  # e.g. to the worker processes
        return Response.text(200, f"current log level is {zlog.current_filter()}\n")

    def _quit(self, request: Request) -> Response:
        if request.method != "POST":
            return Response.text(405, "Invalid HTTP method\nusage: POST /quitquitquit\n")
        if self._on_quit is not None:
            self._on_quit()
        return Response.text(200, "shutdown now\n")

    def _explain(self, request: Request) -> Response:
        source = request.query.get("from", [""])[-1]
        destination = request.query.get("to", [""])[-1]
        if self._explainer is None:
            return Response.text(404, "Not Found\n")
        if not source or not destination:
            return Response.text(400, EXPLAIN_HELP)
        try:
            return Response.json(dict(self._explainer(source, destination)))
        except ValueError as exc:
            return Response.text(400, f"{exc}\n{EXPLAIN_HELP}")

    def _tasks(self, _request: Request) -> Response:
        return Response.text(200, debug.task_tree())

    def _memory(self, _request: Request) -> Response:
        return Response.json(debug.memory_report())


def _from_loopback(request: Request) -> bool:
    """The client connected from a loopback address (``::ffff:127.x`` included), or over a
    stream that is not an IP socket."""
    return not request.peer or canonical_ip(request.peer).is_loopback


def _same_machine_origin(request: Request) -> bool:
    """No ``Origin`` (curl, ctl) or a loopback one; ``Origin: null`` is a sandboxed page."""
    for key, value in request.headers:
        if key.lower() == "origin":
            host = urlsplit(value).netloc
            return bool(host) and is_loopback_host(host)
    return True


def _with_connections(
    state: object, conns: Sequence[TrackedConnection]
) -> dict[str, dict[str, object]]:
    """Copy of workloadState with each pod's ``connections`` filled from the tracker."""
    out: dict[str, dict[str, object]] = {}
    if isinstance(state, Mapping):
        out = {str(k): dict(v) if isinstance(v, Mapping) else {} for k, v in state.items()}
    by_pod: dict[str, dict[str, list[dict[str, object]]]] = {}
    for conn in conns:
        if not conn.info.proxy_uid:
            continue
        pod = by_pod.setdefault(conn.info.proxy_uid, {"inbound": [], "outbound": []})
        d = conn.dump()
        entry = {k: d[k] for k in ("src", "originalDst", "actualDst", "protocol")}
        pod[conn.info.direction].append(entry)
    for uid in out.keys() | by_pod.keys():
        out.setdefault(uid, {})["connections"] = by_pod.get(uid, {"inbound": [], "outbound": []})
    return out


class Exposition(Protocol):
    def exposition(self) -> bytes:
        """The metrics in Prometheus text format."""
        ...


class RegistryExposition:
    """Any prometheus_client registry (``ztunnel ca serve``'s) as an ``Exposition``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class MetricsHandler:
    def __init__(self, metrics: Exposition) -> None:
        self._metrics = metrics

    def __call__(self, request: Request) -> Response:
        if request.path not in ("/metrics", "/stats/prometheus"):
            return Response.text(404, "Not Found\n")
        if request.method not in ("GET", "HEAD"):
            return Response.text(405, "Invalid HTTP method\n")
        return Response(200, self._metrics.exposition(), CONTENT_TYPE)


class ReadinessHandler:
    def __init__(self, readiness: ReadinessProbe) -> None:
        self._readiness = readiness

    def __call__(self, request: Request) -> Response:
        if request.path != "/healthz/ready":
            return Response.text(404, "Not Found\n")
        if request.method not in ("GET", "HEAD"):
            return Response.text(405, "Invalid HTTP method\n")
        pending = sorted(self._readiness())
        if pending:
            return Response.text(503, f"not ready, pending: {', '.join(pending)}\n")
        return Response.text(200, "ready\n")


async def serve_admin(
    target: ListenTarget = ADMIN_ADDRESS,
    *,
    dump_provider: DumpProvider = dict,
    tracker: ConnectionTracker | None = None,
    on_quit: Callable[[], None] | None = None,
    explainer: Explainer | None = None,
    on_log_filter: Callable[[str], None] | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    handler = AdminHandler(dump_provider, tracker, on_quit, explainer, on_log_filter)
    await serve_http(target, handler, task_status=task_status)


async def serve_metrics(
    target: ListenTarget,
    metrics: Metrics,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    await serve_http(target, MetricsHandler(metrics), task_status=task_status)


async def serve_registry(
    target: ListenTarget,
    registry: CollectorRegistry,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """/metrics for a registry other than the agent's (``ztunnel ca serve``)."""
    await serve_http(target, MetricsHandler(RegistryExposition(registry)), task_status=task_status)


async def serve_readiness(
    target: ListenTarget,
    readiness: ReadinessProbe,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    await serve_http(target, ReadinessHandler(readiness), task_status=task_status)
