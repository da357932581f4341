"""Protobuf messages of the control-plane protocols (generated; see scripts/gen_protos.py).

The .proto files beside the modules are ztunnel-py's own, written from the field
numbers of istio/ztunnel's protos (workload, authorization, citadel, zds, xds), so
the wire format is Istio's. The *_pb2.py/.pyi modules are protoc output, committed so
a fresh clone needs no protoc; tests/test_grpc_protos.py keeps them in step.
"""
