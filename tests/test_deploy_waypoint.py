"""deploy/waypoint.yaml: the core objects validate offline against the Kubernetes schemas;
the Gateway (a CRD, not in those schemas) has Istio's waypoint shape, checked by hand; and
the manifest agrees with the code: the arguments and environment ``ztunnel waypoint``
parses, its ports and probe, the pod labels the mesh derivation binds by, the Service the
waypoint's address is taken from, and the ConfigMap's files load."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

from ztunnel.cli import build_parser
from ztunnel.model.workload import HBONE_PORT
from ztunnel.sources import waypoints as wp
from ztunnel.sources.localconfig import load_local_config
from ztunnel.waypoint.state import L7Config
from ztunnel.waypoint_app import settings_from

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "deploy" / "waypoint.yaml"
K8S_VERSION = "1.35.0"


def documents() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]


def one(kind: str) -> dict[str, Any]:
    (found,) = [d for d in documents() if d["kind"] == kind]
    return found


def container() -> dict[str, Any]:
    (c,) = one("Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def test_core_objects_validate_against_the_kubernetes_schema() -> None:
    kinds = [d["kind"] for d in documents()]
    assert sorted(kinds) == ["ConfigMap", "Deployment", "Gateway", "Service", "ServiceAccount"]
    for doc in documents():
        if doc["kind"] != "Gateway":
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_gateway_has_istios_waypoint_shape() -> None:
    gw = one("Gateway")
    assert gw["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert set(gw) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(gw["spec"]) == {"gatewayClassName", "listeners"}
    assert gw["spec"]["gatewayClassName"] == wp.WAYPOINT_CLASS
    assert gw["spec"]["listeners"] == [{"name": "mesh", "port": HBONE_PORT, "protocol": "HBONE"}]
    assert gw["metadata"]["labels"][wp.WAYPOINT_FOR_LABEL] in ("service", "workload", "all")
    assert wp.is_waypoint_gateway(gw)


def test_the_mesh_derivation_finds_the_waypoint_and_its_identity() -> None:
    gw, deployment, svc = one("Gateway"), one("Deployment"), one("Service")
    template = deployment["spec"]["template"]
    labels = template["metadata"]["labels"]
    ns = gw["metadata"]["namespace"]
    pods = [wp.PodInfo("waypoint-0", ns, template["spec"]["serviceAccountName"], labels)]
    services = [
        wp.ServiceInfo(
            svc["metadata"]["name"],
            svc["metadata"]["namespace"],
            f"{svc['metadata']['name']}.{ns}.svc.cluster.local",
            svc["metadata"]["labels"],
        )
    ]
    index = wp.index_waypoints([gw], pods, services)
    found = index.waypoints[f"{ns}/{gw['metadata']['name']}"]
    assert index.warnings == []
    assert found.address is not None and found.address.hbone_mtls_port == HBONE_PORT
    assert found.service_accounts == (one("ServiceAccount")["metadata"]["name"],)
    # Never captured, HBONE-native, selected by its Service and its Deployment.
    assert labels["istio.io/dataplane-mode"] == "none"
    assert labels[wp.TUNNEL_LABEL] == "http"
    assert labels[wp.GATEWAY_NAME_LABEL] == gw["metadata"]["name"]
    for selector in (svc["spec"]["selector"], deployment["spec"]["selector"]["matchLabels"]):
        assert all(labels.get(k) == v for k, v in selector.items())
    mesh_port = [p for p in svc["spec"]["ports"] if p["name"] == "mesh"]
    assert mesh_port == [{"name": "mesh", "port": 15008, "targetPort": 15008, "protocol": "TCP"}]


def _parsed_args() -> argparse.Namespace:
    args = build_parser().parse_args(container()["args"])
    assert args.command == "waypoint"
    return args


def test_arguments_and_environment_are_what_ztunnel_waypoint_reads() -> None:
    env: dict[str, str] = {}
    for e in container()["env"]:
        field = e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        env[e["name"]] = {
            "metadata.namespace": "default",
            "spec.serviceAccountName": "waypoint",
        }.get(field, e.get("value", ""))
    known = {
        "GATEWAY_NAME",
        "POD_NAMESPACE",
        "SERVICE_ACCOUNT",
        "TRUST_DOMAIN",
        "CA_DIR",
        "LOG_FORMAT",
        "WAYPOINT_DRAIN_TIMEOUT",
    }
    assert set(env) <= known, set(env) - known
    settings = settings_from(_parsed_args(), env)
    assert str(settings.identity) == "spiffe://cluster.local/ns/default/sa/waypoint"
    assert settings.gateway.name == one("Gateway")["metadata"]["name"]
    assert (
        settings.drain_timeout
        < one("Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    )
    ports = {p["containerPort"] for p in container()["ports"]}
    assert ports == {settings.listen[1], settings.stats_addr[1], settings.readiness_addr[1]}
    probe = container()["readinessProbe"]["httpGet"]
    assert (probe["path"], probe["port"]) == ("/healthz/ready", settings.readiness_addr[1])


def test_the_configmap_files_load_where_the_arguments_point() -> None:
    args = _parsed_args()
    data = one("ConfigMap")["data"]
    (mount,) = [m for m in container()["volumeMounts"] if m["name"] == "config"]
    files = {f"{mount['mountPath']}/{name}": text for name, text in data.items()}
    assert set(files) == {args.local_config, *args.config}
    load_local_config(files[args.local_config], args.local_config)
    for path in args.config:
        config = L7Config.from_documents(list(yaml.safe_load_all(files[path])), source=path)
        assert config.policies and config.warnings == []


def test_the_waypoint_runs_unprivileged() -> None:
    sc = container()["securityContext"]
    assert sc["runAsNonRoot"] and not sc["allowPrivilegeEscalation"]
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["readOnlyRootFilesystem"]
