"""Errors of the identity layer: the CA, workload certificates and TLS peer checks."""

from __future__ import annotations

from ztunnel.errors import ZtunnelError


class CAError(ZtunnelError):
    """The CA refused or failed to sign: bad CSR, bad CA material, or an unreachable CA."""


class CertificateError(ZtunnelError):
    """A certificate chain returned by the CA is unusable (malformed, wrong identity, bad chain)."""


class TLSIdentityError(ZtunnelError):
    """A TLS peer's certificate does not carry the SPIFFE identity we require."""
