"""The simulated-cluster groups of bench/compare.py (root): same node and cross node.

The cluster of bench/cluster.py (namespaces ``mesh``, ambient, and ``plain``, mirror
images: a client on node1, server-1 on node1, server-2 on node2) with one agent process
per node. Every server pod runs the C app (``loadgen serve 0.0.0.0:8080``); the load
generator runs in the client pod (nsenter). Paths, per server:

* direct: plain/client -> plain/server-N:8080;
* stunnel4: plain/client -> stunnel client on 127.0.0.1:944N in plain/client -> TLS 1.3
  mTLS -> stunnel server on plain/server-N:9443 -> 127.0.0.1:8080;
* ztunnel-py: mesh/client -> mesh/server-N:8080, captured by the node agents.

The client pods get a wide ephemeral port range and ``tcp_tw_reuse`` (their own netns
only): a pod has one address, and thousands of new connections per second would
otherwise run out of ports to TIME_WAIT.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import stunnel
from cluster import CLUSTER, QUIET_LOG
from loadgen import APP_PORT, BenchError, BenchPath

from ztunnel.cluster import apps
from ztunnel.cluster.net import ClusterNet, cleanup_stale, running_cluster
from ztunnel.cluster.spec import loads_spec
from ztunnel.identity.ca import init_ca_dir
from ztunnel.testing.harness import AgentProcess, start_agent, stop_agents, wait_ready

STUNNEL_PORT = 9443
SERVERS = (("cluster same node", "server-1", 9441), ("cluster cross node", "server-2", 9442))


def _tune_client_netns(net: ClusterNet, pod: str) -> None:
    for setting in ("net.ipv4.ip_local_port_range=1024 65000", "net.ipv4.tcp_tw_reuse=1"):
        apps.run_in_pod(net, pod, ["sysctl", "-q", "-w", setting], timeout=10)


def _start_stunnels(net: ClusterNet, workdir: Path) -> dict[str, subprocess.Popen[bytes]]:
    binary = stunnel.stunnel_binary()
    if binary is None:
        raise BenchError("stunnel4 is not installed (scripts/install.sh installs it as root)")
    pki = stunnel.make_pki(workdir / "cluster-stunnel-pki")
    procs: dict[str, subprocess.Popen[bytes]] = {}
    services = {}
    for _group, server, port in SERVERS:
        ip = net.pod(f"plain/{server}").ip
        services[server] = (f"127.0.0.1:{port}", f"{ip}:{STUNNEL_PORT}")
        conf = workdir / f"cluster-stunnel-{server}.conf"
        conf.write_text(
            stunnel.server_conf(
                pki,
                workdir / f"cluster-stunnel-{server}.log",
                f"0.0.0.0:{STUNNEL_PORT}",
                f"127.0.0.1:{APP_PORT}",
            )
        )
        procs[server] = apps.start_program(net, f"plain/{server}", [binary, str(conf)])
    conf = workdir / "cluster-stunnel-client.conf"
    conf.write_text(stunnel.client_conf(pki, workdir / "cluster-stunnel-client.log", services))
    procs["client"] = apps.start_program(net, "plain/client", [binary, str(conf)])
    for _group, server, port in SERVERS:
        apps.wait_listening(net, f"plain/{server}", STUNNEL_PORT, timeout=15)
        apps.wait_listening(net, "plain/client", port, timeout=15)
    return procs


def _nsenter_pid(proc: subprocess.Popen[bytes]) -> int:
    """``nsenter ... -- prog`` execs prog in the same process: the pid is the program's."""
    return proc.pid


@contextlib.contextmanager
def cluster_groups(binary: Path, workdir: Path) -> Iterator[list[list[BenchPath]]]:
    spec = loads_spec(CLUSTER, "bench/compare_cluster.py")
    cleanup_stale()
    cluster_file, ca_dir = workdir / "cluster.yaml", workdir / "cluster-ca"
    cluster_file.write_text(CLUSTER)
    ca_dir.mkdir()
    init_ca_dir(ca_dir)
    with running_cluster(spec) as net:
        agents: dict[str, AgentProcess] = {}
        programs: dict[str, Any] = {}
        try:
            for node in net.nodes:
                agents[node] = start_agent(
                    net, node, cluster_file, ca_dir, extra_env={"RUST_LOG": QUIET_LOG}
                )
            for pod in net.pods.values():
                if pod.name.startswith("server"):
                    programs[f"{pod.key} app"] = apps.start_program(
                        net, pod, [str(binary), "serve", "0.0.0.0", str(APP_PORT), "2"]
                    )
            for pod in net.pods.values():
                if pod.name.startswith("server"):
                    apps.wait_listening(net, pod, APP_PORT, timeout=15)
            for pod in ("plain/client", "mesh/client"):
                _tune_client_netns(net, pod)
            tunnels = _start_stunnels(net, workdir)
            programs.update({f"stunnel {k}": v for k, v in tunnels.items()})
            for agent in agents.values():
                wait_ready(agent, timeout=30)
            print(f"cluster {net.prefix}: 2 nodes, apps, stunnel4 and agents ready", flush=True)
            app_pids = {
                k.removesuffix(" app"): v.pid for k, v in programs.items() if k.endswith(" app")
            }
            yield [_paths(net, agents, tunnels, app_pids, g, s, p) for g, s, p in SERVERS]
        finally:
            with contextlib.suppress(Exception):
                stop_agents(agents)
            with contextlib.suppress(Exception):
                apps.stop_programs(programs)


def _paths(
    net: ClusterNet,
    agents: dict[str, AgentProcess],
    tunnels: dict[str, subprocess.Popen[bytes]],
    app_pids: dict[str, int],
    group: str,
    server: str,
    port: int,
) -> list[BenchPath]:
    plain_prefix = apps.pod_command(net, "plain/client", [])
    mesh_prefix = apps.pod_command(net, "mesh/client", [])
    direct = ["--connect", f"{net.pod(f'plain/{server}').ip}:{APP_PORT}"]
    st = ["--connect", f"127.0.0.1:{port}"]
    zt = ["--connect", f"{net.pod(f'mesh/{server}').ip}:{APP_PORT}"]
    server_node = net.pod(f"mesh/{server}").node
    agent_pids = {
        f"agent-{n}": a.proc.pid for n, a in agents.items() if n in ("node1", server_node)
    }
    plain_app = app_pids[f"plain/{server}"]
    return [
        BenchPath(group, "direct", direct, direct, prefix=plain_prefix, app_pid=plain_app),
        BenchPath(
            group,
            "stunnel4",
            st,
            st,
            prefix=plain_prefix,
            proxies={
                "stunnel-client": _nsenter_pid(tunnels["client"]),
                "stunnel-server": _nsenter_pid(tunnels[server]),
            },
            app_pid=plain_app,
        ),
        BenchPath(
            group,
            "ztunnel-py",
            zt,
            zt,
            prefix=mesh_prefix,
            proxies=agent_pids,
            app_pid=app_pids[f"mesh/{server}"],
        ),
    ]
