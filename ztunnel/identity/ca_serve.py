"""``ztunnel ca serve``: run the CA service (a Deployment next to the DaemonSet; in the
simulated cluster, a process beside the agents), so no node holds the CA key.

    ztunnel ca serve --ca-dir DIR --tokens FILE --placement FILE [--port 15012]
                     [--dns-name istiod.istio-system.svc] [--ip 10.0.0.1]
                     [--metrics-port 15014]

- ``--ca-dir``: ``ztunnel ca init``'s directory or a mounted Secret (``load_ca_dir``);
  the service's own TLS certificate is signed with it for ``--dns-name``/``--ip``, so
  agents verify it with ``CA_ROOT_CA`` = the directory's root-cert.pem (ca.crt);
- ``--tokens``: ``{tokens: [{token, node, identity}]}``, who may call and from where
  (the simulated cluster's stand-in for TokenReview);
- ``--placement``: ``{nodes: {<node>: [spiffe://..., ...]}}``, which identities have pods
  on which node (the simulated cluster's stand-in for the pod list). Both files are
  re-read when they change;
- ``--metrics-port``: ``ztunnel_ca_refusals_total{reason}`` and
  ``ztunnel_ca_certificates_issued_total`` on ``/metrics``.

It is parsed here rather than in cli.py (``ztunnel ca serve ...`` is dispatched to
``main`` like ``ztunnel ctl``).
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
from collections.abc import Collection, Sequence
from functools import partial
from pathlib import Path
from typing import Protocol

import structlog
import trio
import yaml
from prometheus_client import CollectorRegistry

from ztunnel.errors import ConfigError, InvalidIdentity, ZtunnelError
from ztunnel.grpc.tls import server_context
from ztunnel.identity.ca_server import (
    CA_PORT,
    CAService,
    StaticTokens,
    load_ca_dir,
    serve,
    serving_certificate,
)
from ztunnel.model.identity import Identity
from ztunnel.telemetry.logging import configure_logging

LOGGER = structlog.get_logger("ztunnel.ca")
EXIT_CONFIG = 2
METRICS_PORT = 15014  # istiod's monitoring port


class MetricsServer(Protocol):
    """Serves a registry's /metrics on ``target`` (``admin.server.serve_registry``)."""

    async def __call__(
        self,
        target: tuple[str, int],
        registry: CollectorRegistry,
        *,
        task_status: trio.TaskStatus[int] = ...,
    ) -> None: ...


class StaticPlacement:
    """``PodsOnNode`` from a file: ``{nodes: {node: [spiffe ids]}}``, re-read on change.

    A file that cannot be read or parsed places nobody anywhere (every impersonation
    is refused) until it is fixed: failing closed.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._nodes: dict[str, frozenset[Identity]] = {}

    @staticmethod
    def parse(text: str, source: str) -> dict[str, frozenset[Identity]]:
        doc = yaml.safe_load(text) or {}
        nodes = doc.get("nodes") if isinstance(doc, dict) else None
        if not isinstance(nodes, dict):
            raise ConfigError(source, "nodes", "expected a mapping node -> [spiffe ids]")
        out = {}
        for node, ids in nodes.items():
            if not isinstance(ids, list):
                raise ConfigError(source, f"nodes.{node}", "expected a list of spiffe ids")
            try:
                out[str(node)] = frozenset(Identity.parse(str(i)) for i in ids)
            except InvalidIdentity as exc:
                raise ConfigError(source, f"nodes.{node}", str(exc)) from exc
        return out

    def __call__(self, node: str) -> Collection[Identity]:
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if stamp != self._stamp:
                self._stamp = stamp
                self._nodes = {}
                self._nodes = self.parse(self.path.read_text(encoding="utf-8"), str(self.path))
        except (OSError, UnicodeDecodeError, yaml.YAMLError, ConfigError) as exc:
            LOGGER.error(
                "placement file unusable, refusing impersonation",
                path=str(self.path),
                error=str(exc),
            )
            self._stamp, self._nodes = None, {}
        return self._nodes.get(node, frozenset())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ztunnel ca serve",
        description="Serve Istio's IstioCertificateService (CreateCertificate) with the CA "
        "in --ca-dir, so node agents hold no CA key.",
    )
    p.add_argument("--ca-dir", required=True, type=Path, help="ca init directory or Secret")
    p.add_argument("--tokens", required=True, type=Path, help="token -> node, identity file")
    p.add_argument("--placement", required=True, type=Path, help="node -> identities file")
    p.add_argument("--port", type=int, default=CA_PORT, help="default %(default)s")
    p.add_argument("--host", default=None, help="listen address (default: all)")
    p.add_argument("--dns-name", action="append", default=[], help="name in the TLS cert")
    p.add_argument("--ip", action="append", default=[], help="IP in the TLS cert")
    p.add_argument("--trust-domain", default="cluster.local")
    p.add_argument(
        "--trusted-agent",
        action="append",
        default=[],
        metavar="NS/SA",
        help="service accounts allowed to impersonate (default istio-system/ztunnel)",
    )
    p.add_argument("--max-ttl", type=float, default=24 * 3600, help="seconds (default 24h)")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=METRICS_PORT,
        help="Prometheus /metrics (refusals, issued); -1 = off (default %(default)s)",
    )
    p.add_argument("--metrics-host", default="0.0.0.0", help="default %(default)s")
    return p


def _trusted(trust_domain: str, items: Sequence[str]) -> set[Identity]:
    out = set()
    for item in items or ["istio-system/ztunnel"]:
        ns, _, sa = item.partition("/")
        if not ns or not sa:
            raise ConfigError("--trusted-agent", "", f"expected NS/SA, got {item!r}")
        out.add(Identity(trust_domain, ns, sa))
    return out


def main(argv: Sequence[str] | None = None, *, metrics_server: MetricsServer | None = None) -> int:
    """Run until interrupted; 2 on bad configuration. ``metrics_server`` serves the
    service's registry (the app passes the admin layer's; without one there is none)."""
    args = build_parser().parse_args(argv)
    configure_logging("info", "plain")
    try:
        ca = load_ca_dir(args.ca_dir)
        service = CAService(
            ca,
            StaticTokens(args.tokens),
            StaticPlacement(args.placement),
            trusted_node_agents=_trusted(args.trust_domain, args.trusted_agent),
            max_ttl=datetime.timedelta(seconds=args.max_ttl),
        )
        names = args.dns_name or ["istiod.istio-system.svc"]
        chain, key = serving_certificate(args.ca_dir, names, args.ip)
        with tempfile.TemporaryDirectory(prefix="ztunnel-ca-") as tmp:
            # ssl loads the serving key from a file; it lives only as long as this call
            (Path(tmp) / "tls.crt").write_bytes(chain)
            key_path = Path(tmp) / "tls.key"
            key_path.touch(mode=0o600)
            key_path.write_bytes(key)
            context = server_context(str(Path(tmp) / "tls.crt"), str(key_path))
    except (ZtunnelError, OSError, ValueError) as exc:
        print(f"ztunnel ca serve: {exc}", file=sys.stderr)
        return EXIT_CONFIG

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                lambda task_status: serve(
                    service, port=args.port, host=args.host, ssl_context=context,
                    task_status=task_status,
                )
            )  # fmt: skip
            addrs = ", ".join(str(sock.socket.getsockname()[:2]) for sock in listeners)
            print(f"ztunnel ca serve: listening on {addrs}", flush=True)
            if metrics_server is not None and args.metrics_port >= 0:
                target = (args.metrics_host, args.metrics_port)
                port = await nursery.start(partial(metrics_server, target, service.registry))
                print(f"ztunnel ca serve: metrics on {args.metrics_host}:{port}", flush=True)

    try:
        trio.run(run)
    except KeyboardInterrupt:
        return 0
    return 0
