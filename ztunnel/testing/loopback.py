"""A loopback mesh: two dedicated-mode agents on their own 127.x addresses.

Used by the loopback integration tests and by ``bench/``: agent A proxies the
"client" workload at ``<base>.1`` (traffic enters through its SOCKS5 listener),
agent B proxies the "server" workload at ``<base>.2`` where an app listens. A
service ``echo.<ns>.svc.cluster.local`` has a VIP at ``<base>.100``. Each run
picks a random ``127.a.b`` base so parallel runs never collide.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from ztunnel.agent import Agent
from ztunnel.config import Config
from ztunnel.identity.ca import CertificateAuthority, FakeCA
from ztunnel.sources.localconfig import load_local_config

APP_PORT = 8080
SERVICE_PORT = 80


def random_base() -> str:
    return f"127.{random.randint(1, 254)}.{random.randint(1, 254)}"


def mesh_yaml(base: str, *, server_protocol: str = "HBONE", namespace: str = "default") -> str:
    return f"""
workloads:
- uid: cluster1//v1/Pod/{namespace}/client
  name: client
  namespace: {namespace}
  serviceAccount: client
  workloadIps: ["{base}.1"]
  protocol: HBONE
  node: node-a
  services: {{}}
- uid: cluster1//v1/Pod/{namespace}/server
  name: server
  namespace: {namespace}
  serviceAccount: server
  workloadIps: ["{base}.2"]
  protocol: {server_protocol}
  node: node-b
  services:
    "{namespace}/echo.{namespace}.svc.cluster.local":
      {SERVICE_PORT}: {APP_PORT}
services:
- name: echo
  namespace: {namespace}
  hostname: echo.{namespace}.svc.cluster.local
  vips: ["/{base}.100"]
  ports:
    {SERVICE_PORT}: {APP_PORT}
"""


def agent_env(ip: str, workload: str, *, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a dedicated-mode agent listening on ``ip`` (fixed data ports,
    ephemeral admin/metrics/readiness ports, SOCKS5 on)."""
    env = {
        "PROXY_MODE": "dedicated",
        "PROXY_WORKLOAD_INFO": workload,
        "UNSTABLE_ENABLE_SOCKS5": "true",
        "ZTUNNEL_OUTBOUND_ADDR": f"{ip}:15001",
        "ZTUNNEL_INBOUND_ADDR": f"{ip}:15008",
        "ZTUNNEL_INBOUND_PLAINTEXT_ADDR": f"{ip}:15006",
        "ZTUNNEL_SOCKS5_ADDR": f"{ip}:15080",
        "ZTUNNEL_ADMIN_ADDR": f"{ip}:0",
        "ZTUNNEL_STATS_ADDR": f"{ip}:0",
        "ZTUNNEL_READINESS_ADDR": f"{ip}:0",
        "PACKET_MARK": "0",
        "CONNECTION_TERMINATION_DEADLINE": "1s",
    }
    env.update(extra or {})
    return env


def agent_config(ip: str, workload: str, *, extra: dict[str, str] | None = None) -> Config:
    return Config.from_sources(agent_env(ip, workload, extra=extra))


@dataclass
class LoopbackMesh:
    base: str
    client_agent: Agent
    server_agent: Agent
    ca: CertificateAuthority

    @property
    def client_ip(self) -> str:
        return f"{self.base}.1"

    @property
    def server_ip(self) -> str:
        return f"{self.base}.2"

    @property
    def vip(self) -> str:
        return f"{self.base}.100"

    @property
    def socks5(self) -> tuple[str, int]:
        return self.client_agent.bound["socks5"]


@asynccontextmanager
async def loopback_mesh(
    *,
    base: str | None = None,
    yaml_text: str | None = None,
    ca: CertificateAuthority | None = None,
    extra_env: dict[str, str] | None = None,
    client_env: dict[str, str] | None = None,
    server_env: dict[str, str] | None = None,
) -> AsyncIterator[LoopbackMesh]:
    """Run both agents for the duration of the block (yaml_text may use ``{base}``);
    ``extra_env`` goes to both, ``client_env`` / ``server_env`` to one of them."""
    base = base or random_base()
    text = (yaml_text or mesh_yaml(base)).replace("{base}", base)
    ca = ca or FakeCA.ephemeral()
    agents = []
    for ip, workload, own in (
        (f"{base}.1", "default/client/client", client_env),
        (f"{base}.2", "default/server/server", server_env),
    ):
        static = load_local_config(text, "loopback mesh")
        env = {**(extra_env or {}), **(own or {})}
        agents.append(Agent(agent_config(ip, workload, extra=env), ca=ca, static=static))
    async with trio.open_nursery() as nursery:
        for agent in agents:
            await nursery.start(agent.run)
        try:
            yield LoopbackMesh(base, agents[0], agents[1], ca)
        finally:
            nursery.cancel_scope.cancel()


class Socks5Refused(ConnectionError):
    def __init__(self, reply: int) -> None:
        super().__init__(f"SOCKS5 request refused with reply code {reply}")
        self.reply = reply


async def socks5_connect(
    proxy: tuple[str, int], host: str, port: int, *, local_ip: str | None = None
) -> trio.SocketStream:
    """Open a connection to host:port through a SOCKS5 proxy (no auth).

    ``local_ip`` is the client's source address (the client workload's IP on loopback).
    """
    import ipaddress
    import struct

    stream = await trio.open_tcp_stream(*proxy, local_address=local_ip)
    try:
        await stream.send_all(b"\x05\x01\x00")
        if await _read_exactly(stream, 2) != b"\x05\x00":
            raise ConnectionError("SOCKS5 proxy refused the no-auth method")
        try:
            ip = ipaddress.ip_address(host)
            addr = (b"\x01" if ip.version == 4 else b"\x04") + ip.packed
        except ValueError:
            addr = b"\x03" + bytes([len(host)]) + host.encode()
        await stream.send_all(b"\x05\x01\x00" + addr + struct.pack("!H", port))
        head = await _read_exactly(stream, 4)
        if head[1] != 0:
            raise Socks5Refused(head[1])
        await _read_exactly(stream, (4 if head[3] == 1 else 16) + 2)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream


async def _read_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        if not chunk:
            raise ConnectionError("SOCKS5 proxy closed the connection")
        buf += chunk
    return buf
