"""The committed *_pb2 modules match the .proto files, and the field numbers are Istio's."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from ztunnel.proto import authorization_pb2, citadel_pb2, workload_pb2, xds_pb2, zds_pb2

ROOT = Path(__file__).resolve().parent.parent
MODULES = [authorization_pb2, citadel_pb2, workload_pb2, xds_pb2, zds_pb2]


def _generator():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts/gen_protos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _descriptor(serialized: bytes) -> descriptor_pb2.FileDescriptorProto:
    return descriptor_pb2.FileDescriptorProto.FromString(serialized)


def test_generated_modules_are_up_to_date(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    _generator().generate(tmp_path)
    for module in MODULES:
        name = Path(module.__file__).name  # type: ignore[arg-type]
        text = (tmp_path / "ztunnel/proto" / name).read_text()
        marker = "AddSerializedFile(b'"
        start = text.index(marker) + len(marker)
        end = text.index("')\n", start)
        fresh = ast.literal_eval("b'" + text[start:end] + "'")  # protoc's bytes literal
        assert _descriptor(fresh) == _descriptor(module.DESCRIPTOR.serialized_pb), (
            f"{name} is stale: run scripts/gen_protos.py"
        )


def _number(message: type, field: str) -> int:
    return int(message.DESCRIPTOR.fields_by_name[field].number)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("message", "field", "number"),
    [
        (workload_pb2.Workload, "uid", 20),
        (workload_pb2.Workload, "services", 22),
        (workload_pb2.Workload, "capacity", 27),
        (workload_pb2.Workload, "network_mode", 25),
        (workload_pb2.Service, "visibility", 14),
        (workload_pb2.NetworkAddress, "length", 3),
        (authorization_pb2.Match, "service_accounts", 11),
        (authorization_pb2.Clause, "matches", 2),
        (citadel_pb2.IstioCertificateRequest, "validity_duration", 3),
        (citadel_pb2.IstioCertificateRequest, "metadata", 4),
        (zds_pb2.WorkloadRequest, "keep", 5),
        (zds_pb2.DelWorkload, "uid", 2),
        (xds_pb2.DeltaDiscoveryRequest, "initial_resource_versions", 5),
        (xds_pb2.DeltaDiscoveryRequest, "error_detail", 7),
        (xds_pb2.DeltaDiscoveryResponse, "removed_resources", 6),
        (xds_pb2.Resource, "name", 3),
    ],
)
def test_field_numbers_match_istio(message: type, field: str, number: int) -> None:
    assert _number(message, field) == number


def test_full_names_used_on_the_wire() -> None:
    # Any type URLs and gRPC paths are built from these
    assert workload_pb2.Address.DESCRIPTOR.full_name == "istio.workload.Address"
    assert authorization_pb2.Authorization.DESCRIPTOR.full_name == "istio.security.Authorization"
    services = {s.full_name for m in MODULES for s in m.DESCRIPTOR.services_by_name.values()}
    assert services == {
        "istio.v1.auth.IstioCertificateService",
        "envoy.service.discovery.v3.AggregatedDiscoveryService",
    }
    assert "ztunnel.proto.workload_pb2" in sys.modules
