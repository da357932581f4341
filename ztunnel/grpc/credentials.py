"""What ztunnel presents to istiod on every control-plane call, read fresh from disk.

- ``token_metadata``: ``authorization: Bearer <token>`` from ``AUTH_TOKEN`` (a projected
  service-account token that the kubelet rotates, so it is re-read per call) and
  ``clusterid: <CLUSTER_ID>`` (ZT src/identity/auth.rs);
- ``RootsFile``: the TLS context for ``CA_ROOT_CA``/``XDS_ROOT_CA``, rebuilt when the
  file changes (root rotation) and kept as it was when a new version is unreadable.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import trio

from ztunnel.errors import ZtunnelError
from ztunnel.grpc.tls import client_context


class CredentialError(ZtunnelError):
    """A token or root file cannot be used (missing, empty, not PEM)."""


async def token_metadata(path: Path | None, cluster_id: str) -> list[tuple[str, str]]:
    """The auth headers for one call; none when ``path`` is None (no credentials)."""
    if path is None:
        return []
    try:
        token = (await trio.Path(path).read_bytes()).strip()
    except OSError as exc:
        raise CredentialError(f"cannot read token {path}: {exc.strerror}") from exc
    if not token:
        raise CredentialError(f"token file {path} exists, but is empty")
    try:
        text = token.decode("ascii")
    except UnicodeDecodeError as exc:
        raise CredentialError(f"token file {path} is not ASCII") from exc
    return [("authorization", f"Bearer {text}"), ("clusterid", cluster_id)]


class RootsFile:
    """A client TLS context trusting the roots in ``path`` (None: the system roots)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._context: ssl.SSLContext | None = None
        self._stamp: tuple[int, int, int] | None = None

    async def context(self) -> ssl.SSLContext:
        if self.path is None:
            if self._context is None:
                self._context = client_context(None)
            return self._context
        try:
            st = await trio.Path(self.path).stat()
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if self._context is None or stamp != self._stamp:
                roots = await trio.Path(self.path).read_bytes()
                if b"-----BEGIN CERTIFICATE-----" not in roots:
                    raise ValueError("no PEM certificate in it")
                self._context, self._stamp = client_context(roots), stamp
        except (OSError, ValueError, ssl.SSLError) as exc:
            if self._context is None:
                raise CredentialError(f"cannot load roots {self.path}: {exc}") from exc
            # keep the last good roots and try again next call (ztunnel does the same)
        return self._context
