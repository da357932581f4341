"""Workload CSRs and the validation of the chain a CA sends back."""

from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from ztunnel.identity.ca import FakeCA, FileCA, new_root
from ztunnel.identity.certificate import WorkloadCertificate, new_csr
from ztunnel.identity.errors import CertificateError
from ztunnel.model.identity import Identity

ALICE = Identity("cluster.local", "default", "alice")
BOB = Identity("cluster.local", "default", "bob")
HOUR = datetime.timedelta(hours=1)


def test_csr_matches_ztunnel() -> None:
    key, pem = new_csr(ALICE)
    csr = x509.load_pem_x509_csr(pem)
    assert csr.is_signature_valid and csr.subject == x509.Name([])
    assert isinstance(key.curve, ec.SECP256R1) and isinstance(
        csr.signature_hash_algorithm, hashes.SHA256
    )
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical and [str(u.value) for u in san.value] == [str(ALICE)]
    assert new_csr(ALICE)[0].private_numbers() != key.private_numbers()  # fresh key each time


async def test_chain_accessors_and_half_life() -> None:
    ca = FakeCA.ephemeral()
    key, csr = new_csr(ALICE)
    chain = await ca.create_certificate(csr, 2 * HOUR)
    cert = WorkloadCertificate.from_chain(ALICE, key, chain)
    assert cert.refresh_at == cert.not_before + HOUR
    assert cert.not_after - cert.not_before == 2 * HOUR
    assert cert.serial == x509.load_pem_x509_certificate(chain[0]).serial_number
    assert cert.chain_pem() == chain[0] == cert.leaf_pem() and cert.roots_pem() == chain[-1]
    assert cert.key_pem().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert cert.is_valid_at(cert.not_before) and not cert.is_valid_at(cert.not_after)


async def test_wrong_identity_is_rejected() -> None:
    key, csr = new_csr(BOB)
    chain = await FakeCA.ephemeral().create_certificate(csr, HOUR)
    with pytest.raises(CertificateError, match=r"bob, but .*alice was requested"):
        WorkloadCertificate.from_chain(ALICE, key, chain)


async def test_wrong_key_is_rejected() -> None:
    _, csr = new_csr(ALICE)
    chain = await FakeCA.ephemeral().create_certificate(csr, HOUR)
    with pytest.raises(CertificateError, match="does not match its key"):
        WorkloadCertificate.from_chain(ALICE, new_csr(ALICE)[0], chain)


async def test_chain_must_end_at_a_returned_root() -> None:
    key, csr = new_csr(ALICE)
    chain = await FakeCA.ephemeral().create_certificate(csr, HOUR)
    with pytest.raises(CertificateError, match="does not end at a returned root"):
        WorkloadCertificate.from_chain(ALICE, key, [chain[0], FakeCA.ephemeral().roots_pem])
    with pytest.raises(CertificateError, match="expected the leaf"):
        WorkloadCertificate.from_chain(ALICE, key, chain[:1])
    with pytest.raises(CertificateError, match="unparsable"):
        WorkloadCertificate.from_chain(ALICE, key, [chain[0], b"junk"])


async def test_all_concatenated_roots_are_kept() -> None:
    root_a, _ = new_root()
    root_b, key_b = new_root()
    ca = FileCA(root_b, key_b, root_b, root_a + root_b)
    key, csr = new_csr(ALICE)
    cert = WorkloadCertificate.from_chain(ALICE, key, await ca.create_certificate(csr, HOUR))
    assert cert.roots_pem() == root_a + root_b and len(cert.roots) == 2
