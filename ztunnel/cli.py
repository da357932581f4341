"""Command line: ``ztunnel run | waypoint | ca init | ca serve | ctl | demo``.

Every ``run`` option is also read from ztunnel's environment variable of the
same meaning (flag > env > default); ``ztunnel run --help`` lists both names.
Bad configuration exits with status 2 and one clear line, before anything starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ztunnel import __version__
from ztunnel.config import Config
from ztunnel.errors import ConfigError

if TYPE_CHECKING:
    from ztunnel.identity.ca import CertificateAuthority

EXIT_CONFIG = 2


def _flag(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("agent settings (flag, or the environment variable shown)")
    for f in dataclasses.fields(Config):
        if f.metadata.get("prefix"):
            continue  # CA_HEADER_* and the like: environment only (listed in the epilog)
        env = f.metadata["env"]
        default = f.default
        if isinstance(default, tuple):
            default = f"{default[0]}:{default[1]}"
        elif hasattr(default, "value"):
            default = default.value
        # argparse formats help with %: a literal one (ZTUNNEL_WORKER_THREADS's 50%) is doubled
        text = (f.metadata["help"] or f.name.replace("_", " ")).replace("%", "%%")
        group.add_argument(
            _flag(f.name),
            dest=f.name,
            metavar=env,
            default=None,
            help=f"{text} [env {env}; default {default!r}]",
        )
    _add_redirect_alias(group)
    extra = parser.add_argument_group("pod sources (shared mode)")
    extra.add_argument(
        "--cluster",
        metavar="FILE",
        help="cluster file (pods, services, policies): the agent enrolls this node's pods",
    )
    extra.add_argument(
        "--cluster-prefix", metavar="PREFIX", help="netns prefix of a running cluster"
    )
    extra.add_argument(
        "--policies", metavar="DIR", help="Istio AuthorizationPolicy/PeerAuthentication YAML files"
    )


def _prefix_epilog() -> str:
    lines = [
        f"{f.metadata['env']}: {f.metadata['help']}"
        for f in dataclasses.fields(Config)
        if f.metadata.get("prefix")
    ]
    return "environment only: " + "; ".join(lines)


def _add_redirect_alias(group: argparse._ArgumentGroup) -> None:
    """``--redirect iptables|ebpf|none``: the short spelling of ``--redirect-mode``."""
    group.add_argument(
        "--redirect",
        dest="redirect_mode",
        metavar="MODE",
        default=None,
        help="same as --redirect-mode: iptables, ebpf or none",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ztunnel",
        description="ztunnel-py: an Istio-ambient node agent (HBONE mTLS tunnel, L4 policy).",
    )
    parser.add_argument("--version", action="version", version=f"ztunnel-py {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    run = sub.add_parser(
        "run",
        help="run the node agent",
        description="Run the agent. Settings come from flags or ztunnel's environment variables.",
        epilog=_prefix_epilog(),
    )
    add_run_arguments(run)

    ca = sub.add_parser("ca", help="manage the embedded certificate authority")
    ca_sub = ca.add_subparsers(dest="ca_command", metavar="ACTION")
    ca_sub.required = True
    init = ca_sub.add_parser(
        "init",
        help="write a new root CA in Istio's plugged-in CA layout",
        description="Write ca-cert.pem, ca-key.pem, root-cert.pem and cert-chain.pem into DIR "
        "(the layout of Istio's cacerts secret), for `ztunnel run --ca-dir DIR`.",
    )
    init.add_argument("directory", metavar="DIR")
    init.add_argument("--trust-domain", default="cluster.local", help="default %(default)s")
    init.add_argument("--force", action="store_true", help="overwrite existing files")
    ca_sub.add_parser(
        "serve",
        help="serve Istio's CA protocol with this CA, so node agents hold no CA key "
        "(ztunnel ca serve --help)",
        add_help=False,
    )

    add_waypoint_parser(sub)

    sub.add_parser(
        "ctl",
        help="inspect a running agent (workloads, services, policies, certificates, ...)",
        add_help=False,
    )
    demo = sub.add_parser(
        "demo",
        help="build a simulated 2-node ambient cluster, run traffic, explain it (root)",
        description="Builds a two-node simulated cluster in network namespaces, runs traffic "
        "through the mesh, prints what happened, and tears it down. Needs root.",
    )
    demo.add_argument(
        "--keep", action="store_true", help="leave it running and print how to inspect"
    )
    demo.add_argument("--cluster", metavar="FILE", help="cluster file (default: the built-in demo)")
    demo.add_argument(
        "--redirect",
        metavar="MODE",
        default=None,
        help="how the agents redirect pod traffic: iptables (default) or ebpf [env REDIRECT_MODE]",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if argv is None and args_list[:1] == ["run"]:
        _use_malloc(os.environ)
    if args_list[:1] == ["ctl"]:
        from ztunnel.admin.ctl import main as ctl_main

        return ctl_main(args_list[1:])
    if args_list[:2] == ["ca", "serve"]:
        return ca_serve_command(args_list[2:])
    args = build_parser().parse_args(args_list)
    if args.command == "ca":
        from ztunnel.identity.cli import ca_init_command

        return ca_init_command(args.directory, args.trust_domain, args.force)
    if args.command == "waypoint":
        return waypoint_command(args)
    if args.command == "demo":
        from ztunnel.demo import demo_command

        return demo_command(keep=args.keep, cluster_file=args.cluster, redirect=args.redirect)
    return run_command(args)


def _use_malloc(env: Mapping[str, str]) -> None:
    """Run the agent with ``PYTHONMALLOC=malloc`` (re-exec, same pid) unless the operator
    chose an allocator: Python objects then live in glibc's heap, whose free pages
    ``malloc_trim`` returns after a burst of connections, instead of pymalloc's 1 MiB
    arenas, which stay while one object in them lives (docs/reliability.md, "Memory after
    a burst": +6 MiB after 5,000 streams instead of +37 to +97 MiB). Worker processes
    inherit it. ``PYTHONMALLOC=pymalloc`` keeps CPython's default."""
    if "PYTHONMALLOC" in env or not sys.orig_argv:
        return
    argv = [sys.executable, *sys.orig_argv[1:]]
    os.execve(sys.executable, argv, {**env, "PYTHONMALLOC": "malloc"})


def ca_serve_command(argv: Sequence[str]) -> int:
    """``ztunnel ca serve``: parsed by its module; its metrics served by ours."""
    from ztunnel.admin.server import serve_registry
    from ztunnel.identity.ca_serve import main as ca_serve_main

    return ca_serve_main(argv, metrics_server=serve_registry)


def run_command(args: argparse.Namespace) -> int:
    overrides = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(Config)}
    try:
        config = Config.from_sources(os.environ, overrides)
        from ztunnel.agent import Agent

        agent = Agent.from_config(
            config,
            cluster_file=args.cluster,
            cluster_prefix=args.cluster_prefix,
            policy_dir=args.policies,
            env=os.environ,
        )
        return agent.run_forever()  # a listener that cannot bind is a ConfigError too
    except ConfigError as exc:
        print(f"ztunnel: configuration error: {_one_line(str(exc))}", file=sys.stderr)
        return EXIT_CONFIG


def _one_line(text: str) -> str:
    """Errors quote file contents and OS messages: keep the promised single line."""
    return " ".join(text.split())


def add_waypoint_parser(sub: Any) -> None:
    wp = sub.add_parser(
        "waypoint",
        help="run a waypoint: the L7 proxy of a waypoint Gateway (HBONE in and out)",
        description="Run one waypoint process: HBONE on 15008, HTTP-aware routing and L7 "
        "policy, admin on 15000, metrics on 15020, readiness on 15021. The mesh comes from a "
        "cluster file or a ztunnel local-config file; routes and L7 policies from the cluster "
        "file's documents and --config files. Certificates: CA_ADDRESS (+ CA_ROOT_CA, "
        "AUTH_TOKEN) as the agent's, CA_DIR or FAKE_CA=true.",
    )
    wp.add_argument("--gateway", help="the waypoint Gateway's name [env GATEWAY_NAME]")
    wp.add_argument("--namespace", help="its namespace [env POD_NAMESPACE; default default]")
    wp.add_argument("--service-account", help="its pods' service account [env SERVICE_ACCOUNT]")
    wp.add_argument("--cluster", metavar="FILE", help="cluster file: mesh, routes, policies")
    wp.add_argument("--cluster-prefix", metavar="PREFIX", help="netns prefix of the cluster")
    wp.add_argument("--local-config", metavar="FILE", help="ztunnel local-config YAML (mesh)")
    wp.add_argument(
        "--config",
        metavar="PATH",
        action="append",
        help="HTTPRoute/GRPCRoute/AuthorizationPolicy YAML file or directory (repeatable)",
    )
    wp.add_argument("--listen", help="HBONE listener [env WAYPOINT_LISTEN_ADDR; 0.0.0.0:15008]")
    wp.add_argument("--admin", help="admin [env ZTUNNEL_ADMIN_ADDR; 127.0.0.1:15000]")
    wp.add_argument("--stats", help="metrics [env ZTUNNEL_STATS_ADDR; 0.0.0.0:15020]")
    wp.add_argument("--readiness", help="readiness [env ZTUNNEL_READINESS_ADDR; 0.0.0.0:15021]")


# The environment the waypoint's CA settings come from (as the agent's, never its other ones).
_WAYPOINT_CA_ENV = (
    "TRUST_DOMAIN",
    "CLUSTER_ID",
    "CA_DIR",
    "FAKE_CA",
    "CA_ADDRESS",
    "CA_ROOT_CA",
    "ALT_CA_HOSTNAME",
    "AUTH_TOKEN",
    "SECRET_TTL",
)


def waypoint_ca(env: Mapping[str, str]) -> CertificateAuthority:
    """The waypoint's CA, configured as the agent's: the Istio CA at CA_ADDRESS (asked for the
    waypoint's own identity with its own token: no impersonation), else CA_DIR or FAKE_CA."""
    from ztunnel.agent import make_ca
    from ztunnel.identity.istio_ca import IstioCAClient, ca_config

    wanted = {k: v for k, v in env.items() if k in _WAYPOINT_CA_ENV or k.startswith("CA_HEADER_")}
    config = Config.from_sources(wanted)
    target = config.ca_target
    if target is not None:
        return IstioCAClient(ca_config(config, target, shared=False))
    return make_ca(config)


def waypoint_command(args: argparse.Namespace) -> int:
    from ztunnel.telemetry.logging import configure_logging
    from ztunnel.waypoint_app import WaypointProcess, settings_from

    try:
        settings = settings_from(args, os.environ)
        process = WaypointProcess(settings, waypoint_ca(os.environ))
        configure_logging(os.environ.get("RUST_LOG", "info"), os.environ.get("LOG_FORMAT", "plain"))
    except (ConfigError, ValueError) as exc:
        print(f"ztunnel waypoint: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return process.run_forever()


if __name__ == "__main__":
    sys.exit(main())
