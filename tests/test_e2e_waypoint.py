"""The waypoint end to end in the simulated cluster (root): real agents, a real ``ztunnel
waypoint`` process in its own pod, HTTP apps in pods, and real clients (our h11/h2 client,
curl, nghttp, h2load) in the client pod.

One cluster for the module (building it takes seconds); every test reads only the requests
it made (distinct paths, or the access-log records that appeared during the test).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ztunnel.cluster import apps
from ztunnel.cluster.net import ClusterNet, running_cluster
from ztunnel.identity.ca import init_ca_dir
from ztunnel.sources.clusterfile.spec import loads_spec
from ztunnel.testing.harness import AgentProcess, start_agent, stop_agents, wait_ready
from ztunnel.testing.waypoint import (
    WaypointProcess,
    start_waypoints,
    stop_waypoints,
    wait_waypoint_ready,
)

pytestmark = pytest.mark.root

HTTP = ["python", "-m", "ztunnel.cluster.http_app"]


def _server(name: str, node: str, labels: str) -> str:
    return (
        f"  - {{name: {name}, namespace: shop, node: {node}, serviceAccount: web, "
        f"labels: {labels},\n"
        f"     program: [python, -m, ztunnel.cluster.http_app, serve, --name, {name}, "
        '--port, "8080"], ports: [8080]}\n'
    )


CLUSTER = (
    textwrap.dedent(
        """\
        # istiod's implicit ALLOW of the waypoint identity: clients that go around it are refused.
        istiod: {PILOT_AUTO_ALLOW_WAYPOINT_POLICY: true}
        namespaces:
          shop: {labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}
          plain: {labels: {}}
        nodes: [n1, n2]
        pods:
          - {name: client, namespace: shop, node: n1, serviceAccount: client}
          - {name: admin, namespace: shop, node: n1, serviceAccount: admin}
          - {name: outsider, namespace: plain, node: n1}
          - name: waypoint
            namespace: shop
            node: n2
            serviceAccount: waypoint
            labels: {gateway.networking.k8s.io/gateway-name: waypoint,
                     istio.io/dataplane-mode: none, networking.istio.io/tunnel: http}
        """
    )
    + _server("web-v1-a", "n1", "{app: web, version: v1}")
    + _server("web-v1-b", "n2", "{app: web, version: v1}")
    + _server("web-v2", "n2", "{app: web-canary, version: v2}")
    + _server("flaky", "n2", "{app: flaky}")
    + _server("direct", "n1", "{app: direct}")
    + textwrap.dedent(
        """\
        services:
          - {name: waypoint, namespace: shop, vip: 10.96.0.2, ports: {15008: 15008},
             selector: {gateway.networking.k8s.io/gateway-name: waypoint}}
          - name: web
            namespace: shop
            vip: 10.96.0.10
            selector: {app: web}
            ports: [{port: 80, targetPort: 8080, name: http}, {port: 81, targetPort: 8080}]
          - {name: web-v2, namespace: shop, vip: 10.96.0.11, selector: {app: web-canary},
             ports: [{port: 80, targetPort: 8080, name: http}]}
          - {name: grpc, namespace: shop, vip: 10.96.0.12, selector: {app: web},
             ports: [{port: 9000, targetPort: 8080, name: api, appProtocol: grpc}]}
          - {name: flaky, namespace: shop, vip: 10.96.0.13, selector: {app: flaky},
             ports: [{port: 80, targetPort: 8080, name: http}]}
          - {name: direct, namespace: shop, vip: 10.96.0.14, selector: {app: direct},
             labels: {istio.io/use-waypoint: none},
             ports: [{port: 80, targetPort: 8080, name: http}]}
        policies:
          - apiVersion: gateway.networking.k8s.io/v1
            kind: Gateway
            metadata: {name: waypoint, namespace: shop}
            spec:
              gatewayClassName: istio-waypoint
              listeners: [{name: mesh, port: 15008, protocol: HBONE}]
          - apiVersion: security.istio.io/v1
            kind: AuthorizationPolicy
            metadata: {name: admin-only, namespace: shop}
            spec:
              targetRefs: [{kind: Service, group: "", name: web}]
              action: DENY
              rules:
                - from: [{source: {notPrincipals: [cluster.local/ns/shop/sa/admin]}}]
                  to: [{operation: {paths: [/admin, /admin/*]}}]
          - apiVersion: security.istio.io/v1
            kind: AuthorizationPolicy
            metadata: {name: no-delete, namespace: shop}
            spec:
              targetRefs: [{kind: Service, group: "", name: web}]
              action: DENY
              rules: [{to: [{operation: {methods: [DELETE]}}]}]
          - apiVersion: security.istio.io/v1
            kind: AuthorizationPolicy
            metadata: {name: no-blocked-header, namespace: shop}
            spec:
              targetRefs: [{kind: Service, group: "", name: web}]
              action: DENY
              rules: [{when: [{key: "request.headers[x-block]", values: ["yes"]}]}]
          - apiVersion: gateway.networking.k8s.io/v1
            kind: HTTPRoute
            metadata: {name: web, namespace: shop}
            spec:
              parentRefs: [{kind: Service, group: "", name: web}]
              rules:
                - matches: [{headers: [{name: x-canary, value: "true"}]}]
                  backendRefs: [{name: web-v2, port: 80}]
                - matches: [{path: {type: PathPrefix, value: /split}}]
                  backendRefs: [{name: web, port: 80, weight: 90},
                                {name: web-v2, port: 80, weight: 10}]
                - matches: [{path: {type: PathPrefix, value: /slow}}]
                  timeouts: {request: 300ms}
                  backendRefs: [{name: web, port: 80}]
                - backendRefs: [{name: web, port: 80}]
          - apiVersion: gateway.networking.k8s.io/v1
            kind: HTTPRoute
            metadata: {name: flaky, namespace: shop}
            spec:
              parentRefs: [{kind: Service, group: "", name: flaky}]
              rules:
                - retry: {codes: [503], attempts: 2}
                  backendRefs: [{name: flaky, port: 80}]
        """
    )
)
SERVERS = ("web-v1-a", "web-v1-b", "web-v2", "flaky", "direct")


@dataclass
class Cluster:
    net: ClusterNet
    agents: dict[str, AgentProcess]
    waypoint: WaypointProcess

    def run(self, pod: str, argv: list[str], timeout: float = 60) -> str:
        proc = apps.run_in_pod(self.net, f"shop/{pod}", argv, timeout=timeout)
        return proc.stdout

    def load(
        self, to: str, count: int = 1, path: str = "/", *args: str, pod: str = "client"
    ) -> dict[str, Any]:
        out = self.run(
            pod, [*HTTP, "load", "--to", to, "--count", str(count), "--path", path, *args]
        )
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return result

    def waypoint_requests(self, path: str) -> list[dict[str, Any]]:
        return [r for r in self.waypoint.requests() if r.get("path") == path]

    def ip(self, pod: str) -> str:
        return str(self.net.pod(f"shop/{pod}").ip)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with tempfile.TemporaryDirectory() as tmp, running_cluster(loads_spec(CLUSTER)) as net:
        path, ca_dir = Path(tmp) / "cluster.yaml", Path(tmp) / "ca"
        path.write_text(CLUSTER)
        ca_dir.mkdir()
        init_ca_dir(ca_dir)
        programs = apps.start_pod_programs(net)
        agents: dict[str, AgentProcess] = {}
        waypoints: dict[str, WaypointProcess] = {}
        try:
            for node in net.nodes:
                agents[node] = start_agent(net, node, path, ca_dir)
            waypoints = start_waypoints(net, path, ca_dir)
            for agent in agents.values():
                wait_ready(agent, 30)
            for wp in waypoints.values():
                wait_waypoint_ready(wp, 30)
            for pod in SERVERS:
                apps.wait_listening(net, f"shop/{pod}", 8080, timeout=15)
            yield Cluster(net, agents, waypoints["shop/waypoint"])
        finally:
            stop_waypoints(waypoints)
            stop_agents(agents)
            apps.stop_programs(programs)


def _until(cond: Any, timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


# -- policy ----------------------------------------------------------------------------


def test_allowed_path_200_and_denied_path_403_with_the_deciding_policy(cluster: Cluster) -> None:
    ok = cluster.load("10.96.0.10:80", path="/hello")
    assert ok["statuses"] == {"200": 1}, ok
    denied = cluster.load("10.96.0.10:80", path="/admin/users")
    assert denied["statuses"] == {"403": 1}, denied
    records = _until(lambda: cluster.waypoint_requests("/admin/users"))
    assert records[0]["authz.policy"] == "shop/admin-only"
    assert records[0]["response_code"] == 403
    assert records[0]["src.identity"] == "spiffe://cluster.local/ns/shop/sa/client"
    allowed = _until(lambda: cluster.waypoint_requests("/hello"))
    assert allowed[0]["response_code"] == 200 and allowed[0]["dst.workload"] in SERVERS


def test_principal_method_and_header_rules(cluster: Cluster) -> None:
    by_admin = cluster.load("10.96.0.10:80", 1, "/admin/ok", pod="admin")
    assert by_admin["statuses"] == {"200": 1}, by_admin
    delete = cluster.load("10.96.0.10:80", 1, "/things", "--method", "DELETE")
    assert delete["statuses"] == {"403": 1}
    blocked = cluster.load("10.96.0.10:80", 1, "/things", "--header", "x-block: yes")
    assert blocked["statuses"] == {"403": 1}
    fine = cluster.load("10.96.0.10:80", 1, "/things", "--header", "x-block: no")
    assert fine["statuses"] == {"200": 1}


# -- traffic management ----------------------------------------------------------------


def test_weighted_split_90_10_over_1000_requests(cluster: Cluster) -> None:
    result = cluster.load("10.96.0.10:80", 1000, "/split")
    assert result["ok"] and result["statuses"] == {"200": 1000}, result
    canary = result["pods"].get("web-v2", 0)
    # Binomial(1000, 0.1): mean 100, sd 9.5; +-5 sd fails about once in 3.5 million runs.
    assert 52 <= canary <= 148, result["pods"]
    assert result["pods"].get("web-v1-a", 0) + result["pods"].get("web-v1-b", 0) == 1000 - canary


def test_header_match_routes_to_the_canary(cluster: Cluster) -> None:
    result = cluster.load("10.96.0.10:80", 20, "/x", "--header", "x-canary: true")
    assert result["pods"] == {"web-v2": 20}, result


def test_retry_turns_the_first_503_into_a_200(cluster: Cluster) -> None:
    result = cluster.load("10.96.0.13:80", 1, "/flaky/first-try")
    assert result["statuses"] == {"200": 1}, result
    (record,) = _until(lambda: cluster.waypoint_requests("/flaky/first-try"))
    assert record["attempts"] == 2 and record["response_code"] == 200


def test_route_timeout_turns_a_slow_backend_into_504(cluster: Cluster) -> None:
    result = cluster.load("10.96.0.10:80", 1, "/slow/2000")
    assert result["statuses"] == {"504": 1}, result
    (record,) = _until(lambda: cluster.waypoint_requests("/slow/2000"))
    assert record["response_flags"] == "UT"


def test_keep_alive_requests_spread_over_two_endpoints(cluster: Cluster) -> None:
    result = cluster.load("10.96.0.10:80", 60, "/spread")
    assert result["connections"] == 1 and result["statuses"] == {"200": 60}, result
    assert set(result["pods"]) == {"web-v1-a", "web-v1-b"}, result


def test_a_service_without_a_waypoint_is_not_affected(cluster: Cluster) -> None:
    result = cluster.load("10.96.0.14:80", 3, "/admin/direct", "--method", "DELETE")
    assert result["statuses"] == {"200": 3} and result["pods"] == {"direct": 3}, result
    time.sleep(0.5)
    assert cluster.waypoint_requests("/admin/direct") == []


# -- protocols and real clients ----------------------------------------------------------


def test_curl_http11_and_http2_prior_knowledge_through_the_waypoint(cluster: Cluster) -> None:
    h1 = cluster.run("client", ["curl", "-sS", "-i", "http://10.96.0.10/curl-h1"])
    assert h1.startswith("HTTP/1.1 200") and "x-pod: web-v1-" in h1, h1
    h2 = cluster.run(
        "client", ["curl", "-sS", "-i", "--http2-prior-knowledge", "http://10.96.0.10:81/curl-h2"]
    )
    assert h2.startswith("HTTP/2 200") and "x-pod: web-v1-" in h2, h2
    denied = cluster.run("client", ["curl", "-sS", "http://10.96.0.10/admin"])
    assert denied == "RBAC: access denied"
    records = _until(lambda: cluster.waypoint_requests("/curl-h2"))
    assert records[0]["protocol"] == "HTTP/2"


def test_nghttp_and_h2load_through_the_waypoint(cluster: Cluster) -> None:
    if shutil.which("nghttp") is None:
        pytest.skip("nghttp2-client is not installed (scripts/install.sh installs it)")
    out = cluster.run("client", ["nghttp", "-v", "http://10.96.0.10:81/nghttp"])
    assert ":status: 200" in out and "x-pod: web-v1-" in out, out
    load = cluster.run("client", ["h2load", "-n", "200", "-c", "2", "http://10.96.0.10:81/h2load"])
    assert "200 succeeded" in load and "200 2xx" in load, load


def test_grpc_through_the_waypoint(cluster: Cluster) -> None:
    out = cluster.run("client", [*HTTP, "grpc", "--to", "10.96.0.12:9000", "--message", "hi"])
    result = json.loads(out.strip().splitlines()[-1])
    assert result["ok"] and result["grpc_status"] == "0" and result["message"] == "hi", result
    records = _until(lambda: cluster.waypoint_requests("/test.Echo/Say"))
    assert records[0]["grpc_status"] == "0" and records[0]["protocol"] == "HTTP/2"


# -- around the waypoint -----------------------------------------------------------------


def test_clients_around_the_waypoint_meet_the_destinations_l4_policy(cluster: Cluster) -> None:
    # A mesh client dialling a web pod directly: no service waypoint on that path (Istio's
    # rule), so the pod's L4 policy decides: istiod's implicit ALLOW of the waypoint
    # (PILOT_AUTO_ALLOW_WAYPOINT_POLICY) is its only ALLOW policy, so the client is refused.
    around = cluster.load(f"{cluster.ip('web-v1-a')}:8080", 1, "/around")
    assert not around["ok"], around
    # A client outside the mesh reaches the VIP through kube-proxy's DNAT, lands on the
    # pod's inbound plaintext port and is denied as well (no identity at all).
    out = apps.run_in_pod(
        cluster.net, "plain/outsider", [*HTTP, "load", "--to", "10.96.0.10:80"], timeout=30
    ).stdout
    assert not json.loads(out.strip().splitlines()[-1])["ok"]
    # Through the VIP the same client pod gets in: the waypoint's implicit allow.
    assert cluster.load("10.96.0.10:80", 1, "/through")["statuses"] == {"200": 1}
    assert cluster.waypoint_requests("/around") == []
    inbound = [
        r
        for node in cluster.agents.values()
        for r in node.log_lines()
        if r.get("dst.workload") == "web-v1-a"
        and r.get("src.workload") == "client"
        and r.get("error")
    ]
    # The destination's agent answered 401 (its inbound record), the client's saw the 401.
    errors = {str(r["error"]) for r in inbound}
    assert any("allow policies" in e or "401" in e for e in errors), errors


# -- operations ----------------------------------------------------------------------------


def test_admin_shows_routes_policies_and_explains_a_request(cluster: Cluster) -> None:
    assert cluster.load("10.96.0.10:80", 1, "/for-metrics")["statuses"] == {"200": 1}
    dump = cluster.waypoint.config_dump()
    assert {r["name"] for r in dump["routes"]} >= {"web", "flaky"}
    policies = {p["name"] for p in dump["l7Policies"]}
    assert policies == {"admin-only", "no-delete", "no-blocked-header"}
    status, body = cluster.waypoint.get(
        15000,
        "/explain_request?to=10.96.0.10:80&method=GET&path=/admin/x"
        "&from=spiffe://cluster.local/ns/shop/sa/client",
    )
    result = json.loads(body)
    assert status == 200 and result["response"]["status"] == 403
    assert result["decision"]["policy"] == "shop/admin-only"
    status, metrics = cluster.waypoint.get(15020, "/metrics")
    lines = [line for line in metrics.splitlines() if line.startswith(b"istio_requests_total{")]
    assert status == 200 and lines and all(b'reporter="waypoint"' in line for line in lines)
