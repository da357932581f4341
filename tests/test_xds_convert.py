"""xDS protos -> model: the same objects the local config produces, and strict refusals."""

from __future__ import annotations

import dataclasses

import pytest
from google.protobuf import any_pb2

from tests.xds_fakes import deny_port, ip_bytes, service, workload
from ztunnel.model.identity import DEFAULT_CLUSTER_ID
from ztunnel.model.workload import AppProtocol, Service
from ztunnel.proto import authorization_pb2 as apb
from ztunnel.proto import workload_pb2 as wpb
from ztunnel.sources.localconfig import load_local_config
from ztunnel.sources.xds_convert import (
    ADDRESS_TYPE,
    AUTHORIZATION_TYPE,
    ResourceError,
    address_from_proto,
    authorization_from_proto,
    decode_resource,
)

LOCAL = """
workloads:
- uid: Kubernetes//Pod/default/echo
  name: echo
  namespace: default
  serviceAccount: echo
  workloadIps: ["10.1.0.7"]
  protocol: HBONE
  node: node1
  services:
    "default/echo.default.svc.cluster.local": {80: 8080}
  authorizationPolicies: ["default/only-sleep"]
  waypoint: {destination: "default/waypoint.default.svc.cluster.local", hboneMtlsPort: 15008}
services:
- name: echo
  namespace: default
  hostname: echo.default.svc.cluster.local
  vips: ["/10.96.0.10"]
  ports: {80: 8080}
policies:
- name: only-sleep
  namespace: default
  scope: WorkloadSelector
  action: Allow
  rules:
  - - - principals: [!Exact cluster.local/ns/default/sa/sleep]
        sourceIps: ["10.1.0.0/16"]
      - notDestinationPorts: [9999]
"""


def test_same_model_as_the_local_config() -> None:
    local = load_local_config(LOCAL, "test")
    w = workload("echo", "10.1.0.7", sa="echo",
                 services={"default/echo.default.svc.cluster.local": {80: 8080}},
                 policies=("default/only-sleep",))  # fmt: skip
    w.workload.waypoint.hostname.namespace = "default"
    w.workload.waypoint.hostname.hostname = "waypoint.default.svc.cluster.local"
    w.workload.waypoint.hbone_mtls_port = 15008
    assert address_from_proto(w) == local.workloads[0]
    assert local.workloads[0].cluster_id == DEFAULT_CLUSTER_ID  # neither names one
    converted = address_from_proto(service("echo", "10.96.0.10"))
    # xDS services carry no endpoints (the store fills them from the workloads)
    assert converted == dataclasses.replace(local.services[0], endpoints={})
    match_a = apb.Match(
        principals=[apb.StringMatch(exact="cluster.local/ns/default/sa/sleep")],
        source_ips=[apb.Address(address=ip_bytes("10.1.0.0"), length=16)],
    )
    policy = apb.Authorization(
        name="only-sleep", namespace="default", scope=apb.WORKLOAD_SELECTOR, action=apb.ALLOW,
        rules=[apb.Rule(clauses=[apb.Clause(matches=[
            match_a, apb.Match(not_destination_ports=[9999])])])],
    )  # fmt: skip
    assert authorization_from_proto(policy) == local.policies[0]


def _broken(mutate: object) -> wpb.Address:
    a = workload("x", "10.0.0.1")
    mutate(a.workload)  # type: ignore[operator]
    return a


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        (_broken(lambda w: setattr(w, "uid", "")), "no uid"),
        (_broken(lambda w: w.addresses.append(b"\x00" * 5)), "4 or 16 bytes"),
        (_broken(lambda w: setattr(w, "tunnel_protocol", wpb.LEGACY_ISTIO_MTLS)), "LEGACY"),
        (_broken(lambda w: setattr(w, "status", 7)), "status: unknown value 7"),
        (_broken(lambda w: w.services["nohost"].ports.add(service_port=1)), "namespace/hostname"),
        (_broken(lambda w: w.waypoint.SetInParent()), "no destination"),
        (wpb.Address(), "neither a workload nor a service"),
    ],
)
def test_bad_workloads_are_refused(address: wpb.Address, problem: str) -> None:
    with pytest.raises(ResourceError, match=problem):
        address_from_proto(address)


def test_bad_services_are_refused() -> None:
    cidr = service("s", "10.96.0.0")
    cidr.service.addresses[0].length = 16
    with pytest.raises(ResourceError, match="CIDR"):
        address_from_proto(cidr)
    weighted = service("s", "10.96.0.1")
    weighted.service.weighted_waypoints.add(weight=1)
    with pytest.raises(ResourceError, match="weighted"):
        address_from_proto(weighted)


def test_bad_policies_are_refused() -> None:
    empty_matcher = deny_port("p", 80)
    empty_matcher.rules[0].clauses[0].matches[0].principals.add()
    with pytest.raises(ResourceError, match="no match type"):
        authorization_from_proto(empty_matcher)
    big_port = deny_port("p", 70000)
    with pytest.raises(ResourceError, match="out of range"):
        authorization_from_proto(big_port)
    long_prefix = deny_port("p", 80)
    long_prefix.rules[0].clauses[0].matches[0].source_ips.add(address=ip_bytes("10.0.0.1"),
                                                                length=33)  # fmt: skip
    with pytest.raises(ResourceError, match="too long"):
        authorization_from_proto(long_prefix)


def test_decode_resource_checks_type_and_bytes() -> None:
    good = any_pb2.Any(type_url=AUTHORIZATION_TYPE, value=deny_port("p", 1).SerializeToString())
    assert decode_resource(AUTHORIZATION_TYPE, good).key == "default/p"  # type: ignore[union-attr]
    with pytest.raises(ResourceError, match="expected"):
        decode_resource(ADDRESS_TYPE, good)
    with pytest.raises(ResourceError, match="cannot decode"):
        decode_resource(ADDRESS_TYPE, any_pb2.Any(type_url=ADDRESS_TYPE, value=b"\xff"))


def test_service_port_app_protocols_reach_the_model() -> None:
    addr = service("web", "10.96.0.20", ports={80: 8080, 9000: 9000, 5432: 5432})
    del addr.service.ports[:]
    addr.service.ports.extend(
        [
            wpb.Port(service_port=80, target_port=8080, app_protocol=wpb.HTTP11),
            wpb.Port(service_port=9000, target_port=9000, app_protocol=wpb.GRPC),
            wpb.Port(service_port=5432, target_port=5432),  # UNKNOWN: left out (sniffed)
        ]
    )
    svc = address_from_proto(addr)
    assert isinstance(svc, Service)
    assert svc.ports == {80: 8080, 9000: 9000, 5432: 5432}
    assert dict(svc.app_protocols) == {80: AppProtocol.HTTP11, 9000: AppProtocol.GRPC}
