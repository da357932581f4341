"""Identity layer: the CA seam, workload certificates, their cache, and HBONE TLS contexts."""

from __future__ import annotations

from ztunnel.identity.ca import (
    CertificateAuthority,
    FakeCA,
    FileCA,
    init_ca_dir,
    new_intermediate,
    new_root,
)
from ztunnel.identity.certificate import WorkloadCertificate, new_csr
from ztunnel.identity.errors import CAError, CertificateError, TLSIdentityError
from ztunnel.identity.manager import CertState, SecretManager
from ztunnel.identity.tls import (
    client_context,
    peer_identity,
    server_context,
    verify_client_trust_domain,
    verify_server_identity,
)

__all__ = [
    "CAError",
    "CertState",
    "CertificateAuthority",
    "CertificateError",
    "FakeCA",
    "FileCA",
    "SecretManager",
    "TLSIdentityError",
    "WorkloadCertificate",
    "client_context",
    "init_ca_dir",
    "new_csr",
    "new_intermediate",
    "new_root",
    "peer_identity",
    "server_context",
    "verify_client_trust_domain",
    "verify_server_identity",
]
