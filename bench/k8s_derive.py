"""Figures for the Kubernetes source: how long one snapshot derivation takes and how big
the pod store is, for a cluster of N pods and N/10 services (prints, asserts nothing).

    .venv/bin/python bench/k8s_derive.py [pods]
"""

from __future__ import annotations

import sys
import time
import tracemalloc

from ztunnel.policy.istio import attach_policies, translate_documents
from ztunnel.sources.kubernetes.derive import ClusterObjects, Settings, mesh_state, node_pods
from ztunnel.sources.kubernetes.protocol import PODS
from ztunnel.sources.kubernetes.source import trim_pod
from ztunnel.testing.k8s_fake import namespace, pod, service


def cluster(n: int) -> ClusterObjects:
    namespaces = {
        f"ns{i}": namespace(f"ns{i}", {"istio.io/dataplane-mode": "ambient"}) for i in range(10)
    }
    pods, services = {}, {}
    for i in range(n):
        ns = f"ns{i % 10}"
        ip = f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"
        obj = pod(
            f"p{i}",
            ns,
            node=f"node{i % 50}",
            ip=ip,
            labels={"app": f"app{i % (n // 10)}"},
            ports=[("http", 8080)],
        )
        pods[f"{ns}/p{i}"] = trim_pod(PODS, obj)
    for j in range(n // 10):
        ns = f"ns{j % 10}"
        services[f"{ns}/app{j}"] = service(
            f"app{j}",
            ns,
            selector={"app": f"app{j}"},
            ports=[("http", 80, "http")],
            cluster_ip=f"10.96.{j >> 8}.{j & 255}",
        )
    return ClusterObjects(pods=pods, namespaces=namespaces, services=services)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    tracemalloc.start()
    objects = cluster(n)
    size = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    settings = Settings(node_name="node1")
    translated = translate_documents([])
    runs = 5
    start = time.perf_counter()
    for _ in range(runs):
        state, labels = mesh_state(objects, settings)
        attach_policies(state.workloads, labels, translated)
        node_pods(objects, settings, {})
    per = (time.perf_counter() - start) / runs
    print(f"pods={n} services={n // 10} workloads={len(state.workloads)}")
    print(f"derive one snapshot: {per * 1000:.1f} ms")
    print(
        f"trimmed objects in memory: {size / 1e6:.1f} MB ({size / n:.0f} B per pod incl. services)"
    )


if __name__ == "__main__":
    main()
