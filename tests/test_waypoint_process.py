"""``ztunnel waypoint`` as a process, in one trio run on loopback (no root): it starts from a
local-config mesh and a routes/policies directory, serves admin (config_dump, explain),
metrics and readiness, reloads a changed file (and keeps the last good config on a bad
edit), drains on request; ``ztunnel ctl`` reads its routes and L7 policies and explains an
HTTP request; bad settings stop it before anything starts."""

from __future__ import annotations

import argparse
import io
import json
import textwrap
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from ztunnel.admin import ctl
from ztunnel.cli import main as cli_main
from ztunnel.cli import waypoint_ca
from ztunnel.errors import ConfigError
from ztunnel.identity.ca import FakeCA
from ztunnel.identity.istio_ca import IstioCAClient
from ztunnel.model.identity import Identity
from ztunnel.policy.l7model import WaypointRef
from ztunnel.waypoint_app import WaypointProcess, WaypointSettings, settings_from

MESH = textwrap.dedent(
    """\
    workloads:
    - uid: Kubernetes//Pod/shop/web-1
      name: web-1
      namespace: shop
      serviceAccount: web
      workloadIps: ["127.0.0.1"]
      protocol: HBONE
      services:
        "shop/web.shop.svc.cluster.local": {80: 8080}
    services:
    - name: web
      namespace: shop
      hostname: web.shop.svc.cluster.local
      vips: ["/10.96.0.10"]
      ports: {80: 8080}
    """
)
L7 = textwrap.dedent(
    """\
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: no-admin, namespace: shop}
    spec:
      targetRefs: [{kind: Service, group: "", name: web}]
      action: DENY
      rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
    ---
    apiVersion: gateway.networking.k8s.io/v1
    kind: HTTPRoute
    metadata: {name: web-route, namespace: shop}
    spec:
      parentRefs: [{kind: Service, group: "", name: web}]
      rules:
        - backendRefs: [{name: web, port: 80, weight: 3}]
          timeouts: {request: 2s}
    """
)


def _settings(tmp: Path) -> WaypointSettings:
    (tmp / "mesh.yaml").write_text(MESH)
    (tmp / "l7").mkdir(exist_ok=True)
    (tmp / "l7" / "web.yaml").write_text(L7)
    return WaypointSettings(
        gateway=WaypointRef("shop", "waypoint"),
        identity=Identity("cluster.local", "shop", "waypoint"),
        local_config=str(tmp / "mesh.yaml"),
        config_paths=(str(tmp / "l7"),),
        listen=("127.0.0.1", 0),
        admin_addr=("127.0.0.1", 0),
        stats_addr=("127.0.0.1", 0),
        readiness_addr=("127.0.0.1", 0),
        poll=0.05,
    )


def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _ctl(*argv: str) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    code = ctl.main(list(argv), out=out, err=err)
    return code, out.getvalue() + err.getvalue()


async def _until(cond: Callable[[], bool]) -> None:
    with trio.fail_after(10):
        while not cond():  # noqa: ASYNC110 - polling what another task changes
            await trio.sleep(0.05)


async def _until_ready(port: int) -> None:
    with trio.fail_after(10):
        while (await trio.to_thread.run_sync(_get, port, "/healthz/ready"))[0] != 200:  # noqa: ASYNC110
            await trio.sleep(0.05)


async def test_admin_ctl_metrics_readiness_reload_and_drain(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    process = WaypointProcess(settings, FakeCA.ephemeral())
    async with trio.open_nursery() as nursery:
        await nursery.start(process.run)
        admin = process.bound["admin"][1]
        await _until_ready(process.bound["readiness"][1])

        status, body = await trio.to_thread.run_sync(_get, admin, "/config_dump")
        dump = json.loads(body)
        assert status == 200 and dump["waypoint"] == "shop/waypoint"
        assert [r["name"] for r in dump["routes"]] == ["web-route"]
        assert [p["name"] for p in dump["l7Policies"]] == ["no-admin"]
        assert dump["identity"] == "spiffe://cluster.local/ns/shop/sa/waypoint"

        url = f"http://127.0.0.1:{admin}"
        code, text = await trio.to_thread.run_sync(_ctl, "--admin", url, "routes")
        assert code == 0 and "web-route" in text and "web:80=3" in text, text
        code, text = await trio.to_thread.run_sync(_ctl, "--admin", url, "l7-policies")
        assert code == 0 and "no-admin" in text and "DENY" in text and "Service/web" in text
        code, text = await trio.to_thread.run_sync(
            _ctl, "--admin", url, "explain", "--to", "10.96.0.10:80", "--method", "GET",
            "--path", "/admin/x", "-H", "x-user: bob",
        )  # fmt: skip
        assert code == 0 and "shop/no-admin" in text and "answer: 403" in text, text
        code, text = await trio.to_thread.run_sync(
            _ctl, "--admin", url, "explain", "--to", "10.96.0.10:80", "--path", "/ok"
        )
        assert code == 0 and "route shop/web-route.0: shop/web:80 weight 3" in text, text
        assert "timeout 2.0 s" in text
        status, _ = await trio.to_thread.run_sync(_get, admin, "/explain_request?to=nope:80")
        assert status == 400

        status, metrics = await trio.to_thread.run_sync(_get, process.bound["stats"][1], "/metrics")
        assert status == 200 and b"istio_requests_total" in metrics

        # A changed file is reloaded; a broken edit keeps the last good configuration.
        (tmp_path / "l7" / "web.yaml").write_text(L7.replace("no-admin", "no-admin-2"))
        await _until(lambda: process.reloads >= 1)
        assert [p.name for p in process.state.config.policies] == ["no-admin-2"]
        (tmp_path / "l7" / "web.yaml").write_text(L7.replace("action: DENY", "action: NOPE"))
        await _until(lambda: process.last_error is not None)
        assert "action" in str(process.last_error)
        assert [p.name for p in process.state.config.policies] == ["no-admin-2"]

        # /quitquitquit drains: the listener closes and run() returns.
        req = urllib.request.Request(f"{url}/quitquitquit", method="POST")
        await trio.to_thread.run_sync(lambda: urllib.request.urlopen(req, timeout=5).read())
    # The nursery exited on its own: the drain ended with the process cancelling itself.


def test_bad_settings_fail_before_anything_starts(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    (tmp_path / "l7" / "web.yaml").write_text("apiVersion: security.istio.io/v1\n" + "kind: x: y")
    with pytest.raises(ConfigError):
        WaypointProcess(settings, FakeCA.ephemeral())
    with pytest.raises(ConfigError, match="exactly one"):
        WaypointSettings(
            gateway=settings.gateway, identity=settings.identity, local_config=None
        ).validate()


def _args(**kw: object) -> argparse.Namespace:
    base: dict[str, object] = dict.fromkeys(
        ("gateway", "namespace", "service_account", "cluster", "cluster_prefix", "local_config",
         "config", "listen", "admin", "stats", "readiness"),
    )  # fmt: skip
    base.update(kw)
    return argparse.Namespace(**base)


def test_settings_from_flags_and_istios_environment() -> None:
    env = {"POD_NAMESPACE": "shop", "SERVICE_ACCOUNT": "wp", "GATEWAY_NAME": "waypoint"}
    s = settings_from(_args(local_config="m.yaml"), env)
    assert s.identity == Identity("cluster.local", "shop", "wp")
    assert s.gateway == WaypointRef("shop", "waypoint") and s.listen == ("0.0.0.0", 15008)
    s = settings_from(_args(local_config="m", service_account="x", listen="127.0.0.1:1"), env)
    assert s.identity.service_account == "x" and s.listen == ("127.0.0.1", 1)
    with pytest.raises(ConfigError, match="SERVICE_ACCOUNT"):
        settings_from(_args(), {"GATEWAY_NAME": "w"})


def test_cli_exits_2_with_one_line_on_bad_configuration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli_main(
        ["waypoint", "--gateway", "w", "--service-account", "w", "--local-config", "/nope.yaml"]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("ztunnel waypoint: configuration error")
    assert len(err.strip().splitlines()) == 1


def test_the_waypoint_asks_the_istio_ca_for_its_own_identity(tmp_path: Path) -> None:
    # As Istio's waypoint: its own token, its own identity, never ImpersonatedIdentity (a
    # waypoint is not a node agent; `ca serve` refuses impersonation from it).
    env = {
        "CA_ADDRESS": "https://10.244.0.2:15012",
        "CA_ROOT_CA": str(tmp_path / "root.pem"),
        "AUTH_TOKEN": str(tmp_path / "token"),
        "PROXY_MODE": "shared",  # an agent setting: ignored by the waypoint
    }
    ca = waypoint_ca(env)
    assert isinstance(ca, IstioCAClient)
    assert ca.config.impersonate is False
    assert ca.config.token_path == tmp_path / "token"
    assert isinstance(waypoint_ca({"FAKE_CA": "true"}), FakeCA)
    with pytest.raises(ConfigError, match="no certificate authority"):
        waypoint_ca({})
