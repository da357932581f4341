"""The C reference tunnel of bench/compare.py: a Debian stunnel4 pair with mutual TLS 1.3.

``make_pki`` writes a CA, a server and a client certificate (P-256 ECDSA, like the mesh's
workload certificates) with ``cryptography``; ``client_conf``/``server_conf`` write stunnel
configurations that require TLS 1.3, verify the peer's chain against that CA on both
sides (``verifyChain``; the server demands a client certificate) and set TCP_NODELAY on
every socket. stunnel runs in the foreground with its default threading model (a thread
per connection) and default session cache (a client resumes TLS sessions when it can).
"""

from __future__ import annotations

import datetime
import shutil
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def stunnel_binary() -> str | None:
    return shutil.which("stunnel4") or shutil.which("stunnel")


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _issue(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_name: x509.Name,
    cn: str,
    usage: x509.ObjectIdentifier,
    now: datetime.datetime,
) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(cn)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def make_pki(directory: Path) -> Pki:
    """A throw-away CA and one server and one client certificate under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("bench stunnel CA")
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    pki = Pki(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
    )
    pki.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for cert_path, key_path, cn, usage in (
        (pki.server_cert, pki.server_key, "server.bench", ExtendedKeyUsageOID.SERVER_AUTH),
        (pki.client_cert, pki.client_key, "client.bench", ExtendedKeyUsageOID.CLIENT_AUTH),
    ):
        cert_pem, key_pem = _issue(ca_key, ca_name, cn, usage, now)
        cert_path.write_bytes(cert_pem)
        key_path.write_bytes(key_pem)
        key_path.chmod(0o600)
    return pki


_COMMON = """\
foreground = yes
pid =
syslog = no
output = {log}
debug = 4
socket = l:TCP_NODELAY=1
socket = r:TCP_NODELAY=1
"""

_TLS = """\
sslVersionMin = TLSv1.3
CAfile = {ca}
verifyChain = yes
cert = {cert}
key = {key}
"""


def client_conf(pki: Pki, log: Path, services: dict[str, tuple[str, str]]) -> str:
    """``services``: name -> (accept "ip:port", connect "ip:port" of the stunnel server)."""
    out = _COMMON.format(log=log)
    for name, (accept, connect) in services.items():
        out += f"\n[{name}]\nclient = yes\naccept = {accept}\nconnect = {connect}\n"
        out += "checkHost = server.bench\n"
        out += _TLS.format(ca=pki.ca, cert=pki.client_cert, key=pki.client_key)
    return out


def server_conf(pki: Pki, log: Path, accept: str, connect: str) -> str:
    out = _COMMON.format(log=log)
    out += f"\n[server]\naccept = {accept}\nconnect = {connect}\n"
    out += _TLS.format(ca=pki.ca, cert=pki.server_cert, key=pki.server_key)
    return out
