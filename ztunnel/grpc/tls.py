"""TLS for control-plane channels: verify the server against a root file, by name or alt name.

ztunnel verifies istiod's certificate with the roots in ``CA_ROOT_CA``/``XDS_ROOT_CA``
against the address's host, or ``ALT_CA_HOSTNAME``/``ALT_XDS_HOSTNAME`` when set (istiod
is often reached by IP or through a load balancer whose name is not in its certificate).
Python's ``check_hostname`` takes exactly one name, so the chain is verified by OpenSSL
and the name checked here, after the handshake, against either.
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Sequence

from cryptography import x509

from ztunnel.grpc.status import GrpcError, StatusCode


def client_context(roots_pem: bytes | None) -> ssl.SSLContext:
    """TLS >= 1.2, ALPN h2, chain verified with ``roots_pem`` (None: the system roots)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.check_hostname = False  # names are checked by check_server_name (host or alt name)
    ctx.verify_mode = ssl.CERT_REQUIRED
    if roots_pem is not None:
        ctx.load_verify_locations(cadata=roots_pem.decode("ascii", errors="replace"))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["h2"])
    return ctx


def server_context(cert_chain_pem: str, key_pem: str) -> ssl.SSLContext:
    """A server context from PEM files (paths); ALPN h2."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert_chain_pem, key_pem)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["h2"])
    return ctx


def check_server_name(der: bytes | None, names: Sequence[str]) -> None:
    """Raise GrpcError(UNAVAILABLE) unless the certificate is valid for one of ``names``."""
    if der is None:
        raise GrpcError(StatusCode.UNAVAILABLE, "server presented no certificate")
    cert = x509.load_der_x509_certificate(der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = x509.SubjectAlternativeName([])
    dns = san.get_values_for_type(x509.DNSName)
    ips = san.get_values_for_type(x509.IPAddress)
    for name in names:
        if _matches(name, dns, ips):
            return
    raise GrpcError(
        StatusCode.UNAVAILABLE,
        f"server certificate is not valid for {' or '.join(names)} (DNS {dns}, IP {ips})",
    )


def _matches(name: str, dns: Sequence[str], ips: Sequence[object]) -> bool:
    try:
        return ipaddress.ip_address(name) in ips
    except ValueError:
        pass
    wanted = name.lower().rstrip(".")
    for pattern in (d.lower().rstrip(".") for d in dns):
        if pattern == wanted:
            return True
        # RFC 6125: a wildcard is the whole leftmost label and matches exactly one label.
        if pattern.startswith("*.") and "." in wanted and wanted.split(".", 1)[1] == pattern[2:]:
            return True
    return False
