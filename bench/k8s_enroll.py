"""Figures for `ztunnel run` with the Kubernetes source on a simulated node (root): how long
after a namespace label flip all N running pods are enrolled (rules installed, proxy up)
and annotated, how long un-enrolling takes when the label goes (drain deadline 0), and one
/proc scan for N pods' netns on this machine. Prints, asserts nothing.

    sudo .venv/bin/python bench/k8s_enroll.py [pods]
"""

from __future__ import annotations

import datetime
import os
import sys
import tempfile
import time
from pathlib import Path

from ztunnel.cluster.kubelet import running_pods
from ztunnel.cluster.net import running_cluster
from ztunnel.identity.ca import init_ca_dir
from ztunnel.sources.clusterfile.spec import loads_spec
from ztunnel.sources.kubernetes.procfs import ProcNetnsFinder
from ztunnel.sources.kubernetes.protocol import PODS
from ztunnel.testing.harness import AgentProcess, stop_agents, wait_ready
from ztunnel.testing.k8s_cluster import (
    KubeApi,
    cluster_objects,
    running_api_server,
    start_kube_agent,
)
from ztunnel.testing.k8s_fake import namespace

AMBIENT = {"istio.io/dataplane-mode": "ambient"}


def spec_text(n: int) -> str:
    pods = "\n".join(
        f"  - {{name: p{i}, namespace: bench, node: node1, serviceAccount: sa{i % 5}}}"
        for i in range(n)
    )
    return f"namespaces: {{bench: {{labels: {{}}}}}}\nnodes: [node1]\npods:\n{pods}\n"


def log_times(agent: AgentProcess, message: str) -> list[float]:
    out = []
    for r in agent.log_lines():
        if r.get("message") == message:
            stamp = str(r["time"]).replace("Z", "+00:00")
            out.append(datetime.datetime.fromisoformat(stamp).timestamp())
    return out


def annotated(api: KubeApi, n: int) -> int:
    count = 0
    for i in range(n):
        obj = api.get(PODS, "bench", f"p{i}") or {}
        if (obj.get("metadata", {}).get("annotations") or {}).get("ambient.istio.io/redirection"):
            count += 1
    return count


def wait(cond: object, timeout: float = 120.0) -> float:
    start = time.monotonic()
    while not cond():  # type: ignore[operator]
        if time.monotonic() - start > timeout:
            raise TimeoutError
        time.sleep(0.05)
    return time.monotonic() - start


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    with (
        tempfile.TemporaryDirectory() as tmp,
        running_cluster(loads_spec(spec_text(n))) as net,
        running_pods(net, programs=False) as kubelet,
    ):
        finder = ProcNetnsFinder("/proc")
        wanted = {kubelet.uids[k]: [p.ip] for k, p in net.pods.items()}
        start = time.perf_counter()
        found = finder.find(wanted)
        scan = time.perf_counter() - start
        procs = len([d for d in os.listdir("/proc") if d.isdigit()])
        print(f"/proc scan for {n} pods among {procs} processes: {scan * 1000:.1f} ms "
              f"({len(found)} found)")  # fmt: skip
        objects = cluster_objects(net, kubelet.uids)
        with running_api_server(net, Path(tmp) / "api", objects) as api:
            init_ca_dir(Path(tmp) / "ca")  # standalone: the agent holds the CA
            t0 = time.monotonic()
            agent = start_kube_agent(
                net, "node1", api.kubeconfig, Path(tmp) / "ca",
                extra_env={"CONNECTION_TERMINATION_DEADLINE": "0s"},
            )  # fmt: skip
            try:
                wait_ready(agent, 60)
                print(f"agent start to ready (API synced): {time.monotonic() - t0:.2f} s")
                flip = time.time()
                api.apply(namespace("bench", AMBIENT))
                wait(lambda: len(log_times(agent, "pod enrolled")) >= n)
                enrolled = max(log_times(agent, "pod enrolled")) - flip
                wait(lambda: annotated(api, n) == n)
                marked = time.time() - flip
                print(
                    f"label flip to {n} pods enrolled: {enrolled:.2f} s, annotated: {marked:.2f} s"
                )
                flip = time.time()
                api.apply(namespace("bench"))
                wait(lambda: len(log_times(agent, "pod un-enrolled")) >= n)
                left = max(log_times(agent, "pod un-enrolled")) - flip
                wait(lambda: annotated(api, n) == 0)
                unmarked = time.time() - flip
                print(f"label removal to {n} pods un-enrolled: {left:.2f} s, "
                      f"annotations removed: {unmarked:.2f} s")  # fmt: skip
            finally:
                stop_agents({"node1": agent})


if __name__ == "__main__":
    main()
