"""What can go wrong talking to the Kubernetes API, as the pod source tells it apart.

Every failure of the HTTP client is translated once, in ``api.ApiClient``, into one of
these; the reflectors decide per class: ``KubeGone`` means relist, ``KubeNotFound`` on a
collection means the resource (an Istio CRD) is not installed, everything else is
retried with backoff from the last resourceVersion.
"""

from __future__ import annotations

from ztunnel.errors import ZtunnelError


class KubeError(ZtunnelError):
    """Base of the Kubernetes source's errors."""


class KubeUnavailable(KubeError):
    """The API server could not be reached or the connection broke (refused, reset, timeout,
    TLS failure, a response cut short)."""


class KubeProtocolError(KubeError):
    """The server sent something that is not the documented format (bad JSON, a list
    without items, an oversized watch line)."""


class KubeApiError(KubeError):
    """The API server answered with an error Status (HTTP status or a watch ERROR event)."""

    def __init__(self, code: int, reason: str = "", message: str = "") -> None:
        self.code = code
        self.reason = reason
        self.message = message
        super().__init__(f"{code} {reason}: {message}" if reason else f"{code}: {message}")


class KubeGone(KubeApiError):
    """410 Gone / Expired: the resourceVersion (or continue token) is too old; relist."""


class KubeNotFound(KubeApiError):
    """404: the object, or the whole resource type (a CRD that is not installed)."""


def api_error(code: int, reason: str = "", message: str = "") -> KubeApiError:
    """The most specific error class for an API status code."""
    if code == 410:
        return KubeGone(code, reason, message)
    if code == 404:
        return KubeNotFound(code, reason, message)
    return KubeApiError(code, reason, message)
