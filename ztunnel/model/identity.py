"""SPIFFE identities as ztunnel understands them: ``spiffe://<td>/ns/<ns>/sa/<sa>``.

Parsing is strict (ztunnel's ``Identity::from_str``): the ``spiffe://`` prefix
and exactly five ``/``-separated parts, the second ``ns`` and the fourth ``sa``,
none of them empty. Anything else is rejected, never guessed at.
"""

from __future__ import annotations

from dataclasses import dataclass

from ztunnel.errors import InvalidIdentity

SPIFFE_PREFIX = "spiffe://"
DEFAULT_TRUST_DOMAIN = "cluster.local"
DEFAULT_CLUSTER_ID = "Kubernetes"  # istio's CLUSTER_ID when none is configured


@dataclass(frozen=True, slots=True, order=True)
class Identity:
    trust_domain: str
    namespace: str
    service_account: str

    @classmethod
    def parse(cls, uri: str) -> Identity:
        """Parse ``spiffe://td/ns/NS/sa/SA``; raises InvalidIdentity otherwise."""
        if not uri.startswith(SPIFFE_PREFIX):
            raise InvalidIdentity(f"identity {uri!r} does not start with {SPIFFE_PREFIX!r}")
        parts = uri[len(SPIFFE_PREFIX) :].split("/")
        if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa" or not all(parts):
            raise InvalidIdentity(
                f"identity {uri!r} is not of the form spiffe://<trust domain>/ns/<ns>/sa/<sa>"
            )
        return cls(parts[0], parts[2], parts[4])

    @property
    def principal(self) -> str:
        """The identity without ``spiffe://``, as authorization principals are matched."""
        return f"{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    def __str__(self) -> str:
        return SPIFFE_PREFIX + self.principal
