"""Cluster access the way Kubernetes clients find it, and the HTTP client built from it.

Order (controller-runtime's): ``KUBECONFIG`` (one file or several joined by ``:``, merged
as kubectl merges them: the first file to define a name or the current context wins),
then in-cluster (``KUBERNETES_SERVICE_HOST``/``_PORT`` and the service-account token, CA
and namespace under ``/var/run/secrets/kubernetes.io/serviceaccount``), then
``~/.kube/config``.

Parsing and context selection, CA file/data, client certificate/key file/data and
``insecure-skip-tls-verify`` come from lightkube's config layer; the transport is
lightkube's (httpx2 on anyio, so it runs under trio). Token files are re-read whenever
they change on disk (the kubelet rotates projected tokens) and after a 401.
"""

from __future__ import annotations

import base64
import binascii
import os
import ssl
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import msgspec
import yaml
from lightkube.config.client_adapter import verify_cluster
from lightkube.config.kubeconfig import KubeConfig, SingleConfig
from lightkube.config.models import Cluster, User
from lightkube.core.exceptions import ConfigError as LightkubeConfigError

from ztunnel.errors import ConfigError

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
DEFAULT_KUBECONFIG = "~/.kube/config"
# Path-valued fields a kubeconfig may give relative to the file that holds them.
_PATH_FIELDS = {
    "clusters": ("cluster", ("certificate-authority",)),
    "users": ("user", ("client-certificate", "client-key", "tokenFile")),
}

# What lightkube, PyYAML, msgspec and ssl raise for unusable configuration.
_CONFIG_ERRORS = (
    LightkubeConfigError,
    OSError,
    ssl.SSLError,
    yaml.YAMLError,
    msgspec.ValidationError,
    binascii.Error,
    KeyError,
    TypeError,
    ValueError,
)


@dataclass(frozen=True)
class ClusterAccess:
    """Where the API server is and how to authenticate, plus where that came from."""

    config: SingleConfig
    source: str  # "in-cluster" or "<kubeconfig path> (context <name>)"

    @property
    def server(self) -> str:
        return self.config.cluster.server


def load_access(
    env: Mapping[str, str],
    *,
    service_account_dir: str | os.PathLike[str] = SERVICE_ACCOUNT_DIR,
    context: str | None = None,
) -> ClusterAccess:
    """Find the cluster; a ``ConfigError`` names the file and what is wrong with it."""
    kubeconfig = env.get("KUBECONFIG", "")
    try:
        if kubeconfig:
            return _from_kubeconfig(kubeconfig.split(os.pathsep), context)
        sa_dir = Path(service_account_dir)
        if env.get("KUBERNETES_SERVICE_HOST") and (sa_dir / "token").is_file():
            return _in_cluster(env, sa_dir)
        default = Path(env.get("HOME") or "~").expanduser() / ".kube" / "config"
        if default.is_file():
            return _from_kubeconfig([str(default)], context)
    except ConfigError:
        raise
    except _CONFIG_ERRORS as exc:
        source = kubeconfig or str(service_account_dir)
        raise ConfigError(source, "", f"unusable Kubernetes configuration: {exc!r}") from exc
    raise ConfigError(
        "KUBECONFIG",
        "",
        "no cluster access: set KUBECONFIG, run in a pod (KUBERNETES_SERVICE_HOST and a "
        f"service-account token in {service_account_dir}), or create {DEFAULT_KUBECONFIG}",
    )


def _in_cluster(env: Mapping[str, str], sa_dir: Path) -> ClusterAccess:
    host = env["KUBERNETES_SERVICE_HOST"]
    port = env.get("KUBERNETES_SERVICE_PORT", "443")
    if ":" in host:
        host = f"[{host}]"
    namespace_file = sa_dir / "namespace"
    namespace = namespace_file.read_text().strip() if namespace_file.is_file() else None
    config = KubeConfig.from_one(
        cluster=Cluster(server=f"https://{host}:{port}", certificate_auth=str(sa_dir / "ca.crt")),
        user=User(token_file=str(sa_dir / "token")),
        namespace=namespace,
    ).get()
    assert config is not None  # from_one always sets the current context
    return ClusterAccess(config, "in-cluster")


def _from_kubeconfig(paths: list[str], context: str | None) -> ClusterAccess:
    files = [Path(p).expanduser() for p in paths if p]
    existing = [f for f in files if f.is_file()]
    if not existing:
        raise ConfigError(os.pathsep.join(paths), "", "no such kubeconfig file")
    merged: dict[str, Any] = {"clusters": [], "contexts": [], "users": []}
    for file in existing:
        _merge(merged, _read_kubeconfig(file), file)
    try:
        config = KubeConfig.from_dict(merged, fname=existing[0]).get(context)
    except LightkubeConfigError as exc:
        raise ConfigError(str(existing[0]), "current-context", str(exc)) from exc
    except KeyError as exc:
        raise ConfigError(str(existing[0]), "contexts", f"names a missing entry {exc}") from exc
    assert config is not None  # get() without a default raises instead
    return ClusterAccess(config, f"{existing[0]} (context {config.context_name})")


def _read_kubeconfig(file: Path) -> dict[str, Any]:
    doc = yaml.safe_load(file.read_text(encoding="utf-8"))
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(str(file), "", "a kubeconfig must be a mapping")
    return doc


def _merge(merged: dict[str, Any], doc: dict[str, Any], file: Path) -> None:
    """kubectl's merge: the first file to define a named entry or the current context wins;
    relative paths are resolved against the file that holds them."""
    for section in ("clusters", "contexts", "users"):
        entries = doc.get(section) or []
        if not isinstance(entries, list):
            raise ConfigError(str(file), section, "must be a list")
        known = {e.get("name") for e in merged[section]}
        for entry in entries:
            if not isinstance(entry, dict) or "name" not in entry:
                raise ConfigError(str(file), section, "every entry needs a name")
            if entry["name"] not in known:
                merged[section].append(_absolute_paths(section, entry, file.parent))
    if "current-context" not in merged and doc.get("current-context"):
        merged["current-context"] = doc["current-context"]


def _absolute_paths(section: str, entry: dict[str, Any], base: Path) -> dict[str, Any]:
    if section not in _PATH_FIELDS:
        return entry
    key, fields = _PATH_FIELDS[section]
    body = entry.get(key)
    if not isinstance(body, dict):
        return entry
    fixed = dict(body)
    for name in fields:
        value = fixed.get(name)
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            fixed[name] = str(base / value)
    return {**entry, key: fixed}


class TokenFileAuth(httpx2.Auth):
    """``Authorization: Bearer <token file>``, re-read when the file changes (the kubelet
    swaps projected tokens by symlink, so the inode changes) and once after a 401."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._header = ""

    def _current(self, force: bool = False) -> str:
        try:
            st = os.stat(self.path)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            if force or stamp != self._stamp:
                token = Path(self.path).read_text().strip()
                self._stamp, self._header = stamp, f"Bearer {token}"
        except OSError:
            pass  # keep the last token: a rotation in progress must not drop credentials
        return self._header

    def auth_flow(
        self, request: httpx2.Request
    ) -> Generator[httpx2.Request, httpx2.Response, None]:
        request.headers["Authorization"] = self._current()
        response = yield request
        if response.status_code == 401:
            request.headers["Authorization"] = self._current(force=True)
            yield request


def _auth(access: ClusterAccess) -> httpx2.Auth | None:
    user = access.config.user or User()
    if user.exec is not None or user.auth_provider is not None:
        raise ConfigError(
            access.source,
            "users[].user.exec" if user.exec is not None else "users[].user.auth-provider",
            "credential plugins are not supported; use a token, tokenFile or client certificate",
        )
    if user.token_file:
        return TokenFileAuth(str(access.config.abs_file(user.token_file)))
    if user.token:
        return _BearerAuth(user.token)
    if user.username and user.password:
        return httpx2.BasicAuth(user.username, user.password)
    return None


class _BearerAuth(httpx2.Auth):
    def __init__(self, token: str) -> None:
        self._header = f"Bearer {token.strip()}"

    def auth_flow(
        self, request: httpx2.Request
    ) -> Generator[httpx2.Request, httpx2.Response, None]:
        request.headers["Authorization"] = self._header
        yield request


def ssl_context(access: ClusterAccess) -> ssl.SSLContext:
    """The TLS context: the cluster CA (file or data) or, with insecure-skip-tls-verify, no
    verification; the client certificate and key (files or data) when the user has them."""
    cluster, user = access.config.cluster, access.config.user or User()
    for data in (cluster.certificate_auth_data, user.client_cert_data, user.client_key_data):
        if data is not None:
            base64.b64decode(data, validate=True)  # a clear error instead of a temp file of junk
    return verify_cluster(cluster, user, access.config.abs_file, trust_env=False)


def open_http(access: ClusterAccess, *, connect_timeout: float = 10.0) -> httpx2.AsyncClient:
    """An HTTP client for the API server (reads: 60 s; watches set their own read timeout)."""
    try:
        verify = ssl_context(access)
        auth = _auth(access)
    except ConfigError:
        raise
    except _CONFIG_ERRORS as exc:
        raise ConfigError(access.source, "", f"unusable credentials: {exc!r}") from exc
    return httpx2.AsyncClient(
        base_url=access.server,
        verify=verify,
        auth=auth,
        timeout=httpx2.Timeout(60.0, connect=connect_timeout),
        # Proxy variables are ignored: the agent talks to its API server directly.
        trust_env=False,
        headers={"User-Agent": "ztunnel-py", "Accept": "application/json"},
    )
