"""The node's traffic graph: who talked to whom, how, and how much (``GET /api/graph``).

Pure functions over what the admin endpoint already has: the config dump (workloads,
services, certificates, proxied pods), the tracker's open connections and the
connection history. Nodes are workloads (``wl:<uid>``), services (``svc:<hostname>``)
and bare addresses (``ip:<ip>``, peers the state does not know). An edge joins a
source and a destination node *per outcome* (``mtls``, ``plaintext``, ``denied``,
``failed``), so a pair that was first allowed and then denied shows both.

When both ends of a connection are proxied by this agent, it reports the connection
twice (outbound and inbound); an edge therefore counts each reporter separately and
shows the larger count, preferring the destination's view as Istio's dashboards do.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from ztunnel.telemetry.history import OUTCOMES, HistoryEntry, Outcome, classify

Dump = Mapping[str, object]
Json = dict[str, object]

GRAPH_VERSION = 1


def _items(dump: Dump, key: str) -> list[Mapping[str, object]]:
    items = dump.get(key)
    return [i for i in items if isinstance(i, Mapping)] if isinstance(items, list) else []


def split_addr(addr: object) -> tuple[str, int | None]:
    """``ip:port`` / ``[v6]:port`` -> (host, port); a bare host -> (host, None)."""
    text = "" if addr is None else str(addr)
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or (":" in host and not host.startswith("[")):
        return text.strip("[]"), None
    return host.strip("[]"), int(port)


def _identity(w: Mapping[str, object]) -> str:
    td = w.get("trustDomain") or "cluster.local"
    return f"spiffe://{td}/ns/{w.get('namespace')}/sa/{w.get('serviceAccount') or 'default'}"


def _ips(w: Mapping[str, object]) -> list[str]:
    ips = w.get("workloadIps")
    return [str(ip) for ip in ips] if isinstance(ips, list) else []


class Catalog:
    """Lookups over the config dump: workloads by uid and IP, services, certificates."""

    def __init__(self, dump: Dump) -> None:
        self.workloads = {str(w.get("uid")): w for w in _items(dump, "workloads")}
        self.by_ip = {ip: uid for uid, w in self.workloads.items() for ip in _ips(w)}
        self.services = {
            str(s.get("hostname") or s.get("name")): s for s in _items(dump, "services")
        }
        self.certs = {str(c.get("identity")): c for c in _items(dump, "certificates")}
        state = dump.get("workloadState")
        self.proxied = set(state) if isinstance(state, Mapping) else set()
        config = dump.get("config")
        node = config.get("nodeName") if isinstance(config, Mapping) else None
        self.node_name = str(node) if node else ""

    def node_for(self, uid: object, addr: object) -> str:
        """The graph node of one end of a connection: its workload if known, else its IP."""
        if uid and str(uid) in self.workloads:
            return f"wl:{uid}"
        host, _ = split_addr(addr)
        known = self.by_ip.get(host)
        return f"wl:{known}" if known else f"ip:{host}"

    def certificate(self, identity: str) -> Json | None:
        cert = self.certs.get(identity)
        if cert is None:
            return None
        chain = cert.get("certChain")
        leaf = chain[0] if isinstance(chain, list) and chain else {}
        leaf = leaf if isinstance(leaf, Mapping) else {}
        return {
            "state": cert.get("state"),
            "serial": leaf.get("serialNumber"),
            "validFrom": leaf.get("validFrom"),
            "expires": leaf.get("expirationTime"),
        }


@dataclass(frozen=True, slots=True)
class Ends:
    """Where one connection record goes in the graph."""

    source: str
    target: str
    outcome: Outcome
    reporter: str
    service: str | None
    target_port: int | None

    @property
    def edge_id(self) -> str:
        return edge_id(self.source, self.target, self.outcome)


def edge_id(source: str, target: str, outcome: str) -> str:
    return f"{source}|{target}|{outcome}"


def ends_of_entry(catalog: Catalog, entry: HistoryEntry) -> Ends:
    conn, log = entry.connection, entry.log
    if conn:
        return _ends(catalog, conn, entry.outcome)
    # Refused before it was tracked: only the access log's addresses are known.
    reporter = "source" if log.get("direction") == "outbound" else "destination"
    _, port = split_addr(log.get("dst.addr"))
    return Ends(
        catalog.node_for(None, log.get("src.addr")),
        catalog.node_for(None, log.get("dst.addr")),
        entry.outcome,
        reporter,
        None,
        port,
    )


def _ends(catalog: Catalog, conn: Mapping[str, object], outcome: Outcome) -> Ends:
    original = conn.get("originalDst") or conn.get("actualDst")
    _, port = split_addr(original)
    service = conn.get("dstService")
    return Ends(
        catalog.node_for(conn.get("srcWorkload"), conn.get("src")),
        catalog.node_for(conn.get("dstWorkload"), original),
        outcome,
        str(conn.get("reporter") or "source"),
        str(service) if service else None,
        port,
    )


def ends_of_open(catalog: Catalog, conn: Mapping[str, object]) -> Ends:
    return _ends(catalog, conn, classify(conn.get("securityPolicy"), None))


@dataclass
class _Side:
    """What one reporter (source or destination agent) saw of an edge."""

    closed: int = 0
    open: int = 0
    bytes_sent: int = 0
    bytes_recv: int = 0


@dataclass
class _Edge:
    ends: Ends
    sides: dict[str, _Side] = field(default_factory=dict)
    services: set[str] = field(default_factory=set)
    ports: set[int] = field(default_factory=set)
    src_identity: str | None = None
    dst_identity: str | None = None
    last_seen: float = 0.0
    last_error: str | None = None

    def add(self, ends: Ends, conn: Mapping[str, object], *, is_open: bool, at: float) -> None:
        side = self.sides.setdefault(ends.reporter, _Side())
        if is_open:
            side.open += 1
        else:
            side.closed += 1
        side.bytes_sent += _int(conn.get("bytesSent"))
        side.bytes_recv += _int(conn.get("bytesRecv"))
        if ends.service:
            self.services.add(ends.service)
        if ends.target_port is not None:
            self.ports.add(ends.target_port)
        self.src_identity = _str(conn.get("srcIdentity")) or self.src_identity
        self.dst_identity = _str(conn.get("dstIdentity")) or self.dst_identity
        self.last_seen = max(self.last_seen, at)

    def view(self) -> _Side:
        """The reporter that saw the most; the destination's view on a tie."""
        order = sorted(
            self.sides.items(), key=lambda kv: (kv[1].closed + kv[1].open, kv[0] == "destination")
        )
        return order[-1][1]


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _str(value: object) -> str | None:
    return str(value) if value else None


def build_graph(
    dump: Dump,
    open_conns: Sequence[Mapping[str, object]],
    history: Iterable[HistoryEntry],
    history_stats: Mapping[str, int],
    *,
    now: float | None = None,
) -> Json:
    """The ``/api/graph`` document (see docs/operations.md for the contract)."""
    now = time.time() if now is None else now
    catalog = Catalog(dump)
    edges: dict[str, _Edge] = {}
    for entry in history:
        ends = ends_of_entry(catalog, entry)
        edge = edges.setdefault(ends.edge_id, _Edge(ends))
        edge.add(ends, entry.connection, is_open=False, at=entry.ended_at)
        error = entry.log.get("error")
        edge.last_error = str(error) if error else edge.last_error
    for conn in open_conns:
        ends = ends_of_open(catalog, conn)
        edges.setdefault(ends.edge_id, _Edge(ends)).add(ends, conn, is_open=True, at=now)
    node_ids = _node_ids(catalog, edges.values())
    return {
        "version": GRAPH_VERSION,
        "node": catalog.node_name,
        "generatedAt": round(now, 3),
        "history": dict(history_stats),
        "outcomes": list(OUTCOMES),
        "nodes": [_node(catalog, nid) for nid in sorted(node_ids)],
        "edges": [_edge_json(catalog, e) for _, e in sorted(edges.items())],
    }


def _node_ids(catalog: Catalog, edges: Iterable[_Edge]) -> set[str]:
    """This node's workloads, every peer of an edge, and the services either addressed."""
    ids = {
        f"wl:{uid}"
        for uid, w in catalog.workloads.items()
        if uid in catalog.proxied or (catalog.node_name and w.get("node") == catalog.node_name)
    }
    for e in edges:
        ids |= {e.ends.source, e.ends.target}
        ids |= {f"svc:{s}" for s in e.services if s in catalog.services}
    for host, svc in catalog.services.items():
        if any(f"wl:{uid}" in ids for uid in _endpoint_uids(svc)):
            ids.add(f"svc:{host}")
    return ids


def _endpoint_uids(svc: Mapping[str, object]) -> list[str]:
    eps = svc.get("endpoints")
    if not isinstance(eps, Mapping):
        return []
    return [
        str(e.get("workloadUid") or k) if isinstance(e, Mapping) else str(k) for k, e in eps.items()
    ]


def _node(catalog: Catalog, nid: str) -> Json:
    kind, _, key = nid.partition(":")
    if kind == "wl":
        w = catalog.workloads[key]
        identity = _identity(w)
        return {
            "id": nid,
            "kind": "workload",
            "name": w.get("name"),
            "namespace": w.get("namespace"),
            "uid": key,
            "addresses": _ips(w),
            "node": w.get("node"),
            "local": key in catalog.proxied
            or bool(catalog.node_name and w.get("node") == catalog.node_name),
            "protocol": w.get("protocol") or "TCP",
            "identity": identity,
            "certificate": catalog.certificate(identity),
        }
    if kind == "svc":
        s = catalog.services[key]
        vips = s.get("vips")
        return {
            "id": nid,
            "kind": "service",
            "name": s.get("name") or key,
            "namespace": s.get("namespace"),
            "hostname": key,
            "addresses": [str(v).rpartition("/")[2] for v in vips]
            if isinstance(vips, list)
            else [],
            "endpoints": [f"wl:{uid}" for uid in _endpoint_uids(s) if uid in catalog.workloads],
            "local": False,
        }
    return {"id": nid, "kind": "address", "name": key, "addresses": [key], "local": False}


def _explain_query(catalog: Catalog, e: _Edge) -> Json | None:
    """``/explain`` arguments that re-evaluate this edge's destination policy now."""
    src_kind, _, src_key = e.ends.source.partition(":")
    dst_kind, _, dst_key = e.ends.target.partition(":")
    port = max(e.ports) if e.ports else None
    if port is None:
        return None
    if src_kind == "wl":
        w = catalog.workloads[src_key]
        source = f"{w.get('namespace')}/{w.get('name')}"
    else:
        source = src_key
    if dst_kind == "wl":
        ips = _ips(catalog.workloads[dst_key])
        if not ips:
            return None
        dst_host = ips[0]
    else:
        dst_host = dst_key
    dst = f"[{dst_host}]:{port}" if ":" in dst_host else f"{dst_host}:{port}"
    return {"from": source, "to": dst}


def _edge_json(catalog: Catalog, e: _Edge) -> Json:
    view = e.view()
    return {
        "id": e.ends.edge_id,
        "source": e.ends.source,
        "target": e.ends.target,
        "outcome": e.ends.outcome,
        "open": view.open,
        "connections": view.closed + view.open,
        "bytesSent": view.bytes_sent,
        "bytesRecv": view.bytes_recv,
        "reporters": {k: s.closed + s.open for k, s in sorted(e.sides.items())},
        "services": sorted(e.services),
        "ports": sorted(e.ports),
        "srcIdentity": e.src_identity,
        "dstIdentity": e.dst_identity,
        "lastSeen": round(e.last_seen, 3),
        "lastError": e.last_error,
        "explain": _explain_query(catalog, e),
    }


def entries_for(
    dump: Dump,
    history: Iterable[HistoryEntry],
    *,
    edge: str | None = None,
    node: str | None = None,
    limit: int = 100,
) -> list[Json]:
    """History entries (newest first) on one edge, or touching one node; all if neither."""
    catalog = Catalog(dump)
    out: list[Json] = []
    for entry in reversed(list(history)):
        ends = ends_of_entry(catalog, entry)
        if edge is not None and ends.edge_id != edge:
            continue
        if node is not None and node not in (ends.source, ends.target):
            continue
        out.append({**entry.to_json(), "edge": ends.edge_id})
        if len(out) >= limit:
            break
    return out
