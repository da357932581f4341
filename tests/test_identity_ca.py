"""The embedded file CA: what it signs, what it refuses, and Istio's cacerts layout."""

from __future__ import annotations

import datetime
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ztunnel.identity.ca import (
    CA_FILES,
    FakeCA,
    FileCA,
    init_ca_dir,
    new_intermediate,
    new_root,
)
from ztunnel.identity.certificate import WorkloadCertificate, new_csr
from ztunnel.identity.errors import CAError
from ztunnel.model.identity import Identity

ALICE = Identity("cluster.local", "default", "alice")
HOUR = datetime.timedelta(hours=1)


def _csr(*uris: str, key: ec.EllipticCurvePrivateKey | None = None) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if uris:
        sans = [x509.UniformResourceIdentifier(u) for u in uris]
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=True)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


async def test_leaf_has_istio_shape() -> None:
    ca = FakeCA.ephemeral()
    key, csr = new_csr(ALICE)
    chain = await ca.create_certificate(csr, HOUR)
    leaf = x509.load_pem_x509_certificate(chain[0])
    root = x509.load_pem_x509_certificate(chain[-1])
    assert len(chain) == 2 and leaf.subject == x509.Name([])
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical and san.value.get_values_for_type(x509.UniformResourceIdentifier) == [
        str(ALICE)
    ]
    assert len(list(san.value)) == 1
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and ku.key_encipherment and not ku.key_cert_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert isinstance(leaf.signature_hash_algorithm, hashes.SHA256)
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == HOUR
    leaf.verify_directly_issued_by(root)
    assert WorkloadCertificate.from_chain(ALICE, key, chain).identity == ALICE


async def test_serials_are_random_and_count_issued() -> None:
    ca = FakeCA.ephemeral()
    serials = {
        x509.load_pem_x509_certificate(
            (await ca.create_certificate(new_csr(ALICE)[1], HOUR))[0]
        ).serial_number
        for _ in range(5)
    }
    assert len(serials) == 5 and ca.issued == 5


async def test_validity_clamped_to_ca_lifetime() -> None:
    root, key = new_root(validity=datetime.timedelta(days=2))
    ca = FileCA(root, key, root, root)
    chain = await ca.create_certificate(new_csr(ALICE)[1], datetime.timedelta(days=30))
    leaf = x509.load_pem_x509_certificate(chain[0])
    assert leaf.not_valid_after_utc == x509.load_pem_x509_certificate(root).not_valid_after_utc


@pytest.mark.parametrize(
    ("csr", "message"),
    [
        (b"not a csr", "not a valid PEM"),
        (_csr(), "exactly one URI SAN, found 0"),
        (_csr(str(ALICE), "spiffe://cluster.local/ns/x/sa/y"), "exactly one URI SAN, found 2"),
        (_csr("https://example.com/ns/default/sa/alice"), "not a SPIFFE identity"),
        (_csr("spiffe://cluster.local/ns/default"), "not a SPIFFE identity"),
    ],
)
async def test_bad_csr_is_refused(csr: bytes, message: str) -> None:
    ca = FakeCA.ephemeral()
    with pytest.raises(CAError, match=message):
        await ca.create_certificate(csr, HOUR)
    assert ca.issued == 0


async def test_csr_with_broken_signature_is_refused() -> None:
    der = bytearray(
        x509.load_pem_x509_csr(_csr(str(ALICE))).public_bytes(serialization.Encoding.DER)
    )
    der[-3] ^= 0x01  # inside the ECDSA signature
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(CAError, match="signature"):
        await FakeCA.ephemeral().create_certificate(tampered, HOUR)


def test_sign_hook_makes_expired_certificate() -> None:
    now = datetime.datetime.now(datetime.UTC)
    cert = FakeCA.ephemeral().workload_certificate(
        ALICE, not_before=now - 2 * HOUR, not_after=now - HOUR
    )
    assert not cert.is_valid_at(now)


def test_init_ca_dir_writes_istio_layout(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    init_ca_dir(d, trust_domain="example.org")
    assert sorted(p.name for p in d.iterdir()) == sorted(CA_FILES)
    assert stat.S_IMODE((d / "ca-key.pem").stat().st_mode) == 0o600
    root = (d / "root-cert.pem").read_bytes()
    assert (d / "ca-cert.pem").read_bytes() == root == (d / "cert-chain.pem").read_bytes()
    cert = x509.load_pem_x509_certificate(root)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "example.org"
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days == 3650
    key = serialization.load_pem_private_key((d / "ca-key.pem").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert b"BEGIN PRIVATE KEY" in (d / "ca-key.pem").read_bytes()  # PKCS#8


def test_init_ca_dir_refuses_overwrite_unless_forced(tmp_path: Path) -> None:
    init_ca_dir(tmp_path)
    before = (tmp_path / "ca-key.pem").read_bytes()
    with pytest.raises(FileExistsError, match=r"ca-cert\.pem"):
        init_ca_dir(tmp_path)
    assert (tmp_path / "ca-key.pem").read_bytes() == before
    (tmp_path / "ca-key.pem").chmod(0o644)
    init_ca_dir(tmp_path, force=True)
    assert (tmp_path / "ca-key.pem").read_bytes() != before
    assert stat.S_IMODE((tmp_path / "ca-key.pem").stat().st_mode) == 0o600


async def test_loaded_ca_issues_verifiable_certificates(tmp_path: Path) -> None:
    init_ca_dir(tmp_path)
    ca = FileCA.load(tmp_path)
    key, csr = new_csr(ALICE)
    cert = WorkloadCertificate.from_chain(ALICE, key, await ca.create_certificate(csr, HOUR))
    assert cert.roots_pem() == (tmp_path / "root-cert.pem").read_bytes()


@pytest.mark.parametrize("chain_has_root", [True, False])
async def test_intermediate_ca_layout(tmp_path: Path, chain_has_root: bool) -> None:
    root, root_key = new_root()
    inter, inter_key = new_intermediate(root, root_key)
    (tmp_path / "ca-cert.pem").write_bytes(inter)
    (tmp_path / "ca-key.pem").write_bytes(inter_key)
    (tmp_path / "root-cert.pem").write_bytes(root)
    (tmp_path / "cert-chain.pem").write_bytes(inter + root if chain_has_root else inter)
    ca = FileCA.load(tmp_path)
    key, csr = new_csr(ALICE)
    chain = await ca.create_certificate(csr, HOUR)
    assert chain[1:] == [inter, root]
    cert = WorkloadCertificate.from_chain(ALICE, key, chain)
    assert cert.chain == (x509.load_pem_x509_certificate(inter),)


def test_ca_material_is_checked(tmp_path: Path) -> None:
    root, key = new_root()
    other_root, other_key = new_root()
    with pytest.raises(CAError, match="does not belong"):
        FileCA(root, other_key, root, root)
    with pytest.raises(CAError, match="no root signed"):
        FileCA(root, key, root, other_root)
    with pytest.raises(CAError, match="cannot read"):
        FileCA.load(tmp_path)


async def test_rsa_ca_key_works() -> None:
    # Istio's sample cacerts are RSA; leaves stay ECDSA P-256 (from the CSR), signed RSA/SHA-256.
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cluster.local")])
    root = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - HOUR)
        .not_valid_after(now + 100 * HOUR)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    ca = FileCA(root, key_pem, b"", root)
    wkey, csr = new_csr(ALICE)
    cert = WorkloadCertificate.from_chain(ALICE, wkey, await ca.create_certificate(csr, HOUR))
    assert isinstance(cert.leaf.signature_hash_algorithm, hashes.SHA256)
