"""The operator UI on the admin endpoint: the graph page, its JSON, and the table pages.

Routes (all GET/HEAD, read-only):

- ``/``: the graph page (``ui_assets/index.html``), drawn by ``/ui/ui.js`` from
- ``/api/graph``: nodes and edges of this agent's traffic (``ui_graph.build_graph``);
- ``/api/connections?edge=ID|node=ID&limit=N``: recent ended connections with their
  access-log lines, newest first;
- ``/ui/{graph,workloads,services,policies,certificates,connections}``: server-rendered
  tables, the ``ztunnel ctl`` views, readable without JavaScript.

Browser-facing hardening, on every UI response: a strict Content-Security-Policy (no
inline script or style, nothing from elsewhere), ``nosniff``, no framing, no caching;
and a request whose ``Host`` is not a loopback name is refused (421), so a web page
that rebinds its own DNS name to 127.0.0.1 cannot read the agent's state through a
victim's browser. JSON escapes ``<``, ``>`` and ``&`` so that no value, even
mis-sniffed as HTML, can form a tag.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Mapping, Sequence
from html import escape
from importlib import resources

from ztunnel.admin import ui_graph, ui_pages
from ztunnel.admin.http import Request, Response, is_loopback_host
from ztunnel.telemetry.connections import ConnectionTracker
from ztunnel.telemetry.history import ConnectionHistory

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS: tuple[tuple[str, str], ...] = (
    ("content-security-policy", CSP),
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "no-referrer"),
    ("cache-control", "no-store"),
)
ASSETS: Mapping[str, tuple[str, str]] = {
    "/ui/ui.js": ("ui.js", "text/javascript; charset=utf-8"),
    "/ui/ui.css": ("ui.css", "text/css; charset=utf-8"),
}
TABLE_VIEWS = ("workloads", "services", "policies", "certificates")
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000

DumpProvider = Callable[[], Mapping[str, object]]


@functools.cache
def asset(name: str) -> bytes:
    return resources.files("ztunnel.admin").joinpath("ui_assets", name).read_bytes()


def _json_text(obj: object) -> str:
    text = json.dumps(obj, indent=1, default=str, ensure_ascii=False)
    for raw, escaped in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(raw, escaped)
    return text + "\n"


def json_response(obj: object, status: int = 200) -> Response:
    return Response(status, _json_text(obj).encode(), "application/json; charset=utf-8")


def html_response(text: str, status: int = 200) -> Response:
    return Response(status, text.encode(), "text/html; charset=utf-8")


def _header(request: Request, name: str) -> str | None:
    for key, value in request.headers:
        if key.lower() == name:
            return value
    return None


class UiRoutes:
    """The UI's routes; ``config_dump`` is the admin's full dump (with open connections)."""

    def __init__(
        self,
        config_dump: DumpProvider,
        tracker: ConnectionTracker | None,
        endpoints: Sequence[tuple[str, str]] = (),
    ) -> None:
        self._dump = config_dump
        self._history = tracker.history if tracker is not None else ConnectionHistory()
        self._endpoints = endpoints
        pages: dict[str, Callable[[Request], Response]] = {
            "/": self._index,
            "/api/graph": self._graph_json,
            "/api/connections": self._connections_json,
            "/ui/graph": self._graph_page,
            "/ui/connections": self._connections_page,
        }
        for view in TABLE_VIEWS:
            pages[f"/ui/{view}"] = functools.partial(self._view, view)
        for path in ASSETS:
            pages[path] = self._asset
        pages["/favicon.ico"] = lambda _request: Response(204)  # browsers ask; nothing to show
        self.routes: dict[str, Callable[[Request], Response]] = {
            path: functools.partial(self._guarded, handler) for path, handler in pages.items()
        }

    def _guarded(self, handler: Callable[[Request], Response], request: Request) -> Response:
        if request.method not in ("GET", "HEAD"):
            response = Response.text(405, "Invalid HTTP method: the UI is read-only\n")
        elif not is_loopback_host(_header(request, "host") or "localhost"):
            response = Response.text(421, "the admin UI answers only to a loopback Host\n")
        else:
            response = handler(request)
        return dataclasses.replace(response, headers=response.headers + SECURITY_HEADERS)

    # -- JSON ---------------------------------------------------------------------------

    def graph(self) -> dict[str, object]:
        dump = self._dump()
        return ui_graph.build_graph(dump, ui_graph_open(dump), self._history, self._history.stats())

    def _graph_json(self, _request: Request) -> Response:
        return json_response(self.graph())

    def _connections_json(self, request: Request) -> Response:
        try:
            limit = int(request.query.get("limit", [str(DEFAULT_LIMIT)])[-1])
        except ValueError:
            return Response.text(400, "limit must be an integer\n")
        limit = max(1, min(limit, MAX_LIMIT))
        edge = request.query.get("edge", [None])[-1]
        node = request.query.get("node", [None])[-1]
        entries = ui_graph.entries_for(
            self._dump(), self._history, edge=edge, node=node, limit=limit
        )
        return json_response({"history": self._history.stats(), "entries": entries})

    # -- HTML ---------------------------------------------------------------------------

    def _index(self, _request: Request) -> Response:
        items = "\n".join(
            f'<li><a href="{escape(path.split("?")[0])}">{path}</a>: {escape(text)}</li>'
            for path, text in self._endpoints
        )
        text = asset("index.html").decode()
        text = text.replace("<!--nav-->", ui_pages.nav("/")).replace("<!--endpoints-->", items)
        return html_response(text)

    def _view(self, view: str, _request: Request) -> Response:
        return html_response(ui_pages.view_page(view, self._dump()))

    def _graph_page(self, _request: Request) -> Response:
        return html_response(ui_pages.graph_page(self.graph()))

    def _connections_page(self, _request: Request) -> Response:
        dump = self._dump()
        recent = ui_graph.entries_for(dump, self._history, limit=MAX_LIMIT)
        return html_response(ui_pages.connections_page(dump, recent, self._history.stats()))

    def _asset(self, request: Request) -> Response:
        name, content_type = ASSETS[request.path]
        return Response(200, asset(name), content_type)


def ui_graph_open(dump: Mapping[str, object]) -> list[Mapping[str, object]]:
    conns = dump.get("connections")
    return [c for c in conns if isinstance(c, Mapping)] if isinstance(conns, list) else []
