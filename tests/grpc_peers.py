"""Independent gRPC peers for the control-plane tests: grpcio servers (a fake istiod)
run in their own threads, plus TLS material for "istiod" signed by a throwaway root.

grpcio is used with raw bytes (no generated stubs): handlers get and return
serialized messages, so the tests decode them with ztunnel's own *_pb2 modules.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import secrets
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class ServerTLS:
    root_pem: bytes
    cert_pem: bytes
    key_pem: bytes


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_tls(
    dns: tuple[str, ...] = ("localhost",), ips: tuple[str, ...] = ("127.0.0.1",)
) -> ServerTLS:
    """A root and a server certificate valid for ``dns`` and ``ips``."""
    now = datetime.datetime.now(datetime.UTC)
    root_name = _name(f"test root {secrets.token_hex(4)}")  # distinct: several may be trusted
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = (
        x509.CertificateBuilder()
        .subject_name(root_name)
        .issuer_name(root_name)
        .public_key(root_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(root_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    leaf = (
        x509.CertificateBuilder()
        .subject_name(_name("istiod"))
        .issuer_name(root.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(root_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return ServerTLS(
        root.public_bytes(pem),
        leaf.public_bytes(pem),
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )


Handler = Callable[..., Any]


class _ByPath(grpc.GenericRpcHandler):  # type: ignore[misc]
    def __init__(self, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.handlers = handlers

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        return self.handlers.get(details.method)


def unary(fn: Handler) -> grpc.RpcMethodHandler:
    """fn(request_bytes, context) -> response_bytes."""
    return grpc.unary_unary_rpc_method_handler(fn)


def bidi(fn: Handler) -> grpc.RpcMethodHandler:
    """fn(request_iterator, context) -> iterator of response bytes."""
    return grpc.stream_stream_rpc_method_handler(fn)


@contextlib.contextmanager
def grpcio_server(
    handlers: dict[str, grpc.RpcMethodHandler], tls: ServerTLS | None = None, port: int = 0
) -> Iterator[int]:
    """A grpcio server on 127.0.0.1 (a free port unless given); yields the port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((_ByPath(handlers),))
    address = f"127.0.0.1:{port}"
    if tls is None:
        bound = server.add_insecure_port(address)
    else:
        creds = grpc.ssl_server_credentials([(tls.key_pem, tls.cert_pem)])
        bound = server.add_secure_port(address, creds)
    server.start()
    try:
        yield bound
    finally:
        server.stop(grace=None).wait()


def grpcio_channel(
    port: int, tls: ServerTLS | None = None, name: str = "localhost"
) -> grpc.Channel:
    """A grpcio client channel to our server on 127.0.0.1:port."""
    if tls is None:
        return grpc.insecure_channel(f"127.0.0.1:{port}")
    creds = grpc.ssl_channel_credentials(root_certificates=tls.root_pem)
    return grpc.secure_channel(
        f"127.0.0.1:{port}", creds, options=(("grpc.ssl_target_name_override", name),)
    )
