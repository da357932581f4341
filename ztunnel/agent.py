"""The agent: one root nursery that starts every service of a node agent.

Services: the certificate manager, the admin / metrics / readiness servers,
and the workload proxies (one in dedicated mode; one per enrolled pod in shared
mode, where the enrollment controller decides which and the agent, as its
``ProxyHost``, runs them). Each input comes from a local source or from Istio's
control plane (docs/control-plane.md): state from the local config / cluster file, the
Kubernetes API or from istiod over xDS (``attach_xds``), pods from the cluster file, the
Kubernetes API or from istio-cni over ZDS (``attach_pod_source``), certificates from a
CA key held here or from an Istio CA (``make_ca``). SIGTERM, SIGINT and POST /quitquitquit
all start the same graceful drain: listeners close at once, open connections get
CONNECTION_TERMINATION_DEADLINE seconds, then the agent exits.
"""

from __future__ import annotations

import contextlib
import datetime
import enum
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
import trio

from ztunnel import __version__
from ztunnel.admin.server import serve_admin, serve_metrics, serve_readiness
from ztunnel.config import Config, ProxyMode, RedirectMode, WorkloadInfo
from ztunnel.errors import ConfigError
from ztunnel.hbone import reclaim
from ztunnel.identity.ca import CertificateAuthority, FakeCA, FileCA
from ztunnel.identity.errors import CAError
from ztunnel.identity.manager import SecretManager
from ztunnel.model.address import format_hostport
from ztunnel.model.identity import Identity
from ztunnel.model.pod import MeshState, Pod
from ztunnel.policy.query import explain_connection
from ztunnel.proxy.context import ProxyContext
from ztunnel.proxy.policy_watch import watch_policies
from ztunnel.proxy.sockets import LocalSocketFactory, NetnsSocketFactory, SocketFactory
from ztunnel.proxy.workload_proxy import ProxyAddresses, WorkloadProxy
from ztunnel.redirect.base import NoRedirector, Redirector, RedirectPorts
from ztunnel.redirect.netns import NetNamespace
from ztunnel.sources.dump import policy_to_dump, service_to_dump, workload_to_dump
from ztunnel.sources.kubernetes import access_configured as k8s_access_configured
from ztunnel.sources.localconfig import LocalConfig, load_local_config, load_local_config_file
from ztunnel.state.store import StateStore
from ztunnel.telemetry.connections import ConnectionTracker
from ztunnel.telemetry.logging import configure_logging
from ztunnel.telemetry.metrics import Metrics
from ztunnel.workers import count as workers_count
from ztunnel.workers.group import ProxyGroup, RunningProxy
from ztunnel.workers.pool import WorkerPool
from ztunnel.workers.zygote import Zygote

if TYPE_CHECKING:
    # Each mode's modules are imported where the configuration selects the mode, so an
    # agent that does not use them never loads them (nor lightkube, httpx, protobuf, the
    # gRPC engine, iptables/eBPF code): ~10 MiB RSS and ~0.3 s of start-up.
    from ztunnel.enroll.controller import EnrollmentController
    from ztunnel.sources.kubernetes.annotate import Annotator
    from ztunnel.sources.kubernetes.source import KubernetesPodSource
    from ztunnel.sources.xds import XdsClient
    from ztunnel.sources.zds import ZdsClient

log = structlog.get_logger("ztunnel.agent")

STARTUP_PENDING = "proxy"  # readiness waits for the first proxy / the first enrollment pass
# Makes the sockets of a pod's proxy: (pod netns, SO_MARK). Tests use local sockets.
PodSocketFactory = Callable[[NetNamespace, int], SocketFactory]


def make_ca(config: Config) -> CertificateAuthority:
    """The certificate authority the config names: the Istio CA (CA_ADDRESS, or istiod at
    XDS_ADDRESS), else a CA key held here (CA_DIR, FAKE_CA: standalone)."""
    target = config.ca_target
    if target is not None:
        from ztunnel.identity.istio_ca import IstioCAClient, ca_config

        shared = config.proxy_mode is ProxyMode.SHARED  # pods' identities: impersonated
        return IstioCAClient(ca_config(config, target, shared=shared))
    if config.ca_dir:
        try:
            return FileCA.load(config.ca_dir)
        except (OSError, ValueError, CAError) as exc:
            raise ConfigError("CA_DIR", config.ca_dir, f"cannot load the CA: {exc}") from exc
    if config.fake_ca:
        return FakeCA.ephemeral(config.trust_domain)
    raise ConfigError(
        "CA_DIR",
        "",
        "no certificate authority: set CA_ADDRESS (an Istio CA, e.g. `ztunnel ca serve`), "
        "CA_DIR (see `ztunnel ca init DIR`) or FAKE_CA=true",
    )


def load_static_config(config: Config) -> LocalConfig | None:
    if config.local_xds_path:
        return load_local_config_file(config.local_xds_path)
    if config.local_xds:
        return load_local_config(config.local_xds, "LOCAL_XDS")
    return None


def redirect_ports(config: Config) -> RedirectPorts:
    return RedirectPorts(
        outbound=config.outbound_addr[1],
        inbound_plaintext=config.inbound_plaintext_addr[1],
        inbound=config.inbound_addr[1],
        mark=config.packet_mark,
    )


class Pending(dict[str, str]):
    """What readiness waits for (reason by key), mirrored into istio_pending_proxy_count.

    Keys of pods whose proxy could not start yet begin with ``pod ``.
    """

    def __init__(self, on_change: Callable[[int], None]) -> None:
        super().__init__()
        self._on_change = on_change

    def _changed(self) -> None:
        self._on_change(sum(1 for key in self if key.startswith("pod ")))

    def __setitem__(self, key: str, value: str) -> None:
        super().__setitem__(key, value)
        self._changed()

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        self._changed()

    def pop(self, key: str, default: Any = None) -> Any:
        value = super().pop(key, default)
        self._changed()
        return value


class Agent:
    def __init__(
        self,
        config: Config,
        *,
        ca: CertificateAuthority,
        store: StateStore | None = None,
        static: LocalConfig | None = None,
        metrics: Metrics | None = None,
        pod_sockets: PodSocketFactory = NetnsSocketFactory,
    ) -> None:
        self.config = config
        self.store = store if store is not None else StateStore()
        self.static = static
        if static is not None:
            self.store.replace_all(static.workloads, static.services, static.policies)
        self.metrics = metrics if metrics is not None else Metrics()
        store_ = self.store
        # The label cache starts over with every state change (workloads, services, policies).
        self.tracker = ConnectionTracker(self.metrics, generation=lambda: store_.version)
        self.ca = ca
        self.secrets = SecretManager(ca, ttl=datetime.timedelta(seconds=config.secret_ttl))
        self.ctx = ProxyContext(config, self.store, self.secrets, self.tracker)
        self.proxies: dict[str, RunningProxy] = {}
        self.identities: dict[str, Identity] = {}  # by proxy uid: the certificate it uses
        self._pod_sockets = pod_sockets
        self._unwatch_policies = watch_policies(self.store, self.tracker)
        self.pending = Pending(self.metrics.pending_proxies.set)
        self.pending[STARTUP_PENDING] = "workload proxies not started"
        self.bound: dict[str, tuple[str, int]] = {}
        self._cancel: Callable[[], None] | None = None
        self._draining = False
        self.extra_services: list[Callable[..., Any]] = []
        # Sources' own readiness (xDS synced, istio-cni connected): a reason, or None.
        self.readiness_checks: list[Callable[[], str | None]] = []
        # config_dump's "controlPlane" object: each client's state by name.
        self.dump_sections: dict[str, Callable[[], Any]] = {}
        # An IstioCAClient can exist only once its module is loaded: no import for the others.
        istio_ca = sys.modules.get("ztunnel.identity.istio_ca")
        if istio_ca is not None and isinstance(ca, istio_ca.IstioCAClient):
            self.dump_sections["ca"] = ca.dump
        # Shared mode: the enrollment controller's view of the pods' redirection.
        self.redirection: Callable[[], dict[str, Any]] | None = None
        # Data-plane worker processes (docs/architecture.md "Worker processes"): unset is 1
        # here, the CPU quota when the agent owns its process (run_forever).
        self.worker_count = workers_count.resolve(
            config.worker_threads, lambda: workers_count.EMBEDDED_DEFAULT
        )
        self.workers: WorkerPool | None = None
        self._zygote: Zygote | None = None  # run_forever forks it; embedded: the pool starts one

    @classmethod
    def from_config(
        cls,
        config: Config,
        *,
        cluster_file: str | None = None,
        cluster_prefix: str | None = None,
        policy_dir: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Agent:
        """Validate everything that can be validated before starting (raises ConfigError).

        ``env``: the process environment, for what Config does not hold (the Kubernetes
        client's ``KUBECONFIG`` and in-cluster variables); None = none of it.
        """
        static = load_static_config(config)
        if config.xds_address:
            from ztunnel.sources.xds import xds_config

            xds_config(config).target()  # a bad XDS_ADDRESS is named as such (CA defaults to it)
            if policy_dir is not None:
                raise ConfigError(
                    "--policies", policy_dir, "policies come from istiod (XDS_ADDRESS)"
                )
        agent = cls(config, ca=make_ca(config), static=static)
        if config.xds_address:
            attach_xds(agent)
        if config.proxy_mode is ProxyMode.SHARED:
            attach_pod_source(agent, cluster_file, cluster_prefix, policy_dir, env or {})
        elif policy_dir is not None:
            from ztunnel.policy.istio import load_policy_dir

            result = load_policy_dir(policy_dir)
            for warning in result.warnings:
                log.warning("policy", message=warning)
            for translated in result.policies:
                agent.store.upsert_policy(translated.authorization)
        return agent

    # -- running ---------------------------------------------------------------

    def run_forever(self) -> int:
        """Run until drained. Raises ConfigError when a listener cannot bind at start."""
        configure_logging(self.config.log_level, self.config.log_format)
        self.worker_count = workers_count.resolve(self.config.worker_threads)
        if self.worker_count > 1 and threading.active_count() == 1:
            # Before trio (no loop yet), after the imports: workers forked by it share this
            # process's modules (docs/architecture.md "Worker processes"). Never with a
            # thread running (a fork copies the locks it holds): the pool execs one then.
            self._zygote = Zygote.fork()
        try:
            trio.run(self._main)
        except BaseExceptionGroup as group:
            startup = _startup_error(group)
            if startup is None:
                raise
            raise startup from None
        finally:
            if self._zygote is not None:  # the pool closes it; not if it never ran
                self._zygote.close()
        return 0

    async def _main(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_signals)
            await self.run()
            # Drained (a signal or POST /quitquitquit): nothing else may keep us alive.
            nursery.cancel_scope.cancel()

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("signal received, draining", signal=signal.Signals(signum).name)
                await self.shutdown()
                return

    def _ended_connections(self) -> int:
        return reclaim.ended_connections() + self.tracker.ended

    async def run(self, *, task_status: trio.TaskStatus[Agent] = trio.TASK_STATUS_IGNORED) -> None:
        """Start every service; ``task_status.started(self)`` once all listeners are bound."""
        with trio.CancelScope() as scope:
            self._cancel = scope.cancel
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                await nursery.start(self.secrets.run)
                # After a burst of this process's HBONE or proxied connections.
                nursery.start_soon(partial(reclaim.run, count=self._ended_connections))
                if self.worker_count > 1:
                    self.workers = self._worker_pool()
                # Admin first: while workers start, readiness answers 503 with "worker N:
                # starting" instead of refusing connections.
                await self._start_admin(nursery)
                if self.workers is not None:
                    await nursery.start(self.workers.run)
                if self.config.proxy_mode is ProxyMode.DEDICATED:
                    await self._start_dedicated(nursery)
                for service in self.extra_services:
                    await nursery.start(service)
                log.info(
                    "agent ready",
                    version=__version__,
                    mode=self.config.proxy_mode.value,
                    workers=self.worker_count,
                    **{k: format_hostport(*v) for k, v in self.bound.items()},
                )
                task_status.started(self)

    async def _start_admin(self, nursery: trio.Nursery) -> None:
        cfg = self.config
        admin = partial(
            serve_admin,
            dump_provider=self.config_dump,
            tracker=self.tracker,
            on_quit=self.request_shutdown,
            explainer=self.explain,
            on_log_filter=self._log_filter_changed,
        )
        for name, addr, serve in (
            ("admin", cfg.admin_addr, admin),
            ("stats", cfg.stats_addr, partial(serve_metrics, metrics=self.metrics)),
            ("readiness", cfg.readiness_addr, partial(serve_readiness, readiness=self.readiness)),
        ):
            with _listener_setting(f"{name}_addr", addr):
                port = await nursery.start(serve, addr)
            self.bound[name] = (addr[0], port)

    def _log_filter_changed(self, spec: str) -> None:
        if self.workers is not None:
            self.workers.set_log_filter(spec)

    def _worker_pool(self) -> WorkerPool:
        pool = WorkerPool(
            self.config,
            self.worker_count,
            store=self.store,
            secrets=self.secrets,
            tracker=self.tracker,
            metrics=self.metrics,
            zygote=self._zygote,
        )
        self.readiness_checks.append(pool.not_ready_reason)
        return pool

    def _new_proxy(
        self,
        info: WorkloadInfo,
        addresses: ProxyAddresses,
        *,
        netns: NetNamespace | None = None,
        uid: str = "",
        orig_src: bool | None = None,
        agent_services: Iterable[int] = (),
    ) -> RunningProxy:
        """The workload's proxy: in this process, or in every worker process."""
        if self.workers is not None:
            return ProxyGroup(
                self.workers,
                info,
                addresses,
                store=self.store,
                secrets=self.secrets,
                netns=netns,
                uid=uid,
                orig_src=orig_src,
                agent_services=agent_services,
            )
        mark = self.config.packet_mark
        factory = LocalSocketFactory(mark) if netns is None else self._pod_sockets(netns, mark)
        return WorkloadProxy(
            self.ctx,
            info,
            factory,
            addresses,
            uid=uid,
            orig_src=orig_src,
            agent_services=agent_services,
        )

    async def _start_dedicated(self, nursery: trio.Nursery) -> None:
        cfg = self.config
        info = cfg.proxy_workload_info
        assert info is not None  # Config.validate guarantees it in dedicated mode
        addresses = ProxyAddresses(
            outbound=cfg.outbound_addr,
            inbound=cfg.inbound_addr,
            inbound_plaintext=cfg.inbound_plaintext_addr,
            socks5=cfg.socks5_addr if cfg.socks5_enabled else None,
        )
        proxy = self._new_proxy(
            info,
            addresses,
            orig_src=cfg.enable_orig_src if cfg.enable_orig_src is not None else False,
            # Admin, metrics and readiness listen in this netns too: no flow may reach them.
            agent_services=[
                port for name in ("admin", "stats", "readiness") if (port := self.bound[name][1])
            ],
        )
        listeners = ", ".join(
            f"{Config.env_names()[f]}={format_hostport(*getattr(cfg, f))}"
            for f in ("outbound_addr", "inbound_addr", "inbound_plaintext_addr")
        )
        try:
            await self.start_proxy(nursery, proxy)
        except OSError as exc:
            # Which of the proxy's listeners failed is not known here (phase 2: the proxy
            # names it); all of them are, so the line still says what to change.
            raise ConfigError(listeners, "", f"cannot listen: {exc.strerror or exc}") from exc

    async def start_proxy(self, nursery: trio.Nursery, proxy: RunningProxy) -> None:
        """Start one workload proxy (raises OSError if a listener cannot bind)."""
        await nursery.start(proxy.run)
        self.proxies[proxy.uid] = proxy
        self.identities[proxy.uid] = self._identity_of(proxy.info)
        self.metrics.active_proxies.set(len(self.proxies))
        self.metrics.proxies_started.inc()
        if self.config.proxy_mode is ProxyMode.DEDICATED:
            # In-pod listeners live in each pod's netns; the enrollment log names them.
            self.bound.update(proxy.bound)
            # Shared mode is ready once the first pass enrolled every pod (mark_reconciled),
            # not when its first pod's proxy runs.
            self.pending.pop(STARTUP_PENDING, None)

    def _identity_of(self, info: WorkloadInfo) -> Identity:
        """The identity the proxy's certificate is for (its workload's, once known)."""
        workload = self.ctx.store.find_workload(info.namespace, info.name, info.service_account)
        if workload is not None:
            return workload.identity
        return Identity(self.config.trust_domain, info.namespace, info.service_account)

    async def stop_proxy(self, uid: str, deadline: float) -> None:
        proxy = self.proxies.pop(uid, None)
        if proxy is None:
            return
        await proxy.drain(deadline)
        self.metrics.active_proxies.set(len(self.proxies))
        self.metrics.proxies_stopped.inc()

    # -- ProxyHost: what the enrollment controller asks of the agent ------------

    def apply_state(self, state: MeshState) -> None:
        self.store.replace_all(state.workloads, state.services, state.policies)

    async def start_pod_proxy(self, pod: Pod, netns: NetNamespace) -> Mapping[str, Any]:
        cfg = self.config
        proxy = self._new_proxy(
            WorkloadInfo(pod.namespace, pod.name, pod.service_account),
            ProxyAddresses(
                outbound=cfg.outbound_addr,
                inbound=cfg.inbound_addr,
                inbound_plaintext=cfg.inbound_plaintext_addr,
            ),
            netns=netns,
            uid=pod.uid,
            orig_src=cfg.enable_orig_src,
        )
        await self.start_proxy(self.nursery, proxy)
        return {"transparent": proxy.transparent}

    async def stop_pod_proxy(self, uid: str, deadline: float) -> None:
        await self.stop_proxy(uid, deadline)

    def release_identity(self, pod: Pod) -> None:
        """Forget the certificate of a pod that left (it stops renewing), unless another
        running proxy (another pod of the same service account) still serves it."""
        identity = self.identities.pop(pod.uid, None)
        if identity is None:
            return  # its proxy never started: it never asked for a certificate
        if pod.uid in self.proxies:
            self.identities[pod.uid] = identity  # restarted meanwhile: still in use
            return
        if identity in (self.identities.get(uid) for uid in self.proxies):
            return
        self.secrets.forget(identity)
        if self.workers is not None:
            self.workers.forget_certificate(identity)
        log.info("certificate forgotten", identity=str(identity), pod=pod.key)

    def mark_pending(self, pod_key: str, reason: str) -> None:
        self.pending[f"pod {pod_key}"] = reason

    def clear_pending(self, pod_key: str) -> None:
        self.pending.pop(f"pod {pod_key}", None)

    def mark_reconciled(self) -> None:
        self.pending.pop(STARTUP_PENDING, None)

    def request_shutdown(self) -> None:
        """Admin /quitquitquit: drain in the background, then exit."""
        self.nursery.start_soon(self.shutdown)

    async def shutdown(self) -> None:
        if self._draining:
            return
        self._draining = True
        deadline = self.config.connection_termination_deadline
        log.info("draining", deadline_seconds=deadline, proxies=len(self.proxies))
        async with trio.open_nursery() as nursery:
            for uid in list(self.proxies):
                nursery.start_soon(self.stop_proxy, uid, deadline)
        log.info("drained, stopping")
        if self._cancel is not None:
            self._cancel()

    # -- inspection ------------------------------------------------------------

    def explain(self, source: str, destination: str) -> dict[str, Any]:
        return explain_connection(self.store, source, destination)

    def readiness(self) -> list[str]:
        """What keeps the agent from being ready: pending pods, missing certificates, and
        the sources' own conditions (xDS not synced, istio-cni not connected)."""
        reasons = [f"{k}: {v}" for k, v in self.pending.items()]
        if self._draining:
            reasons.append("agent: draining")
        reasons += [why for check in self.readiness_checks if (why := check()) is not None]
        for uid, proxy in self.proxies.items():
            if not proxy.certificate_ready.is_set():
                why = proxy.certificate_error or "not yet issued"
                reasons.append(f"certificate {uid}: {why}")
        return sorted(reasons)

    def config_dump(self) -> dict[str, Any]:
        dump = {
            "workloads": [workload_to_dump(w) for w in self.store.workloads()],
            "services": [service_to_dump(s) for s in self.store.services()],
            "policies": [policy_to_dump(p) for p in self.store.policies()],
            "certificates": self.secrets.dump(),
            "staticConfig": self.static.raw if self.static is not None else {},
            "config": self.config.to_dump(),
            "workloadState": self.workload_state(),
            "controlPlane": {name: dump() for name, dump in self.dump_sections.items()},
            **self._redirection_dump(),
        }
        if self.workers is not None:
            dump["workers"] = self.workers.dump()
        return dump

    def _redirection_dump(self) -> dict[str, Any]:
        """``redirection``: the mode and its agent-wide state; each pod's own part goes into
        its ``workloadState`` entry (added by ``workload_state``)."""
        if self.redirection is None:
            return {}
        view = dict(self.redirection())
        view.pop("pods", None)
        return {"redirection": view}

    def workload_state(self) -> dict[str, Any]:
        """Per proxied pod: state and workload info. The admin handler adds each pod's
        open connections from the tracker (and the dump's ``version``)."""
        pods = self.redirection()["pods"] if self.redirection is not None else {}
        return {
            uid: {
                "state": "Up",
                "info": {
                    "name": proxy.info.name,
                    "namespace": proxy.info.namespace,
                    "serviceAccount": proxy.info.service_account,
                },
                **({"redirection": pods[uid]} if uid in pods else {}),
            }
            for uid, proxy in self.proxies.items()
        }


@contextlib.contextmanager
def _listener_setting(field_name: str, addr: tuple[str, int]) -> Iterator[None]:
    """A bind failure at start is a configuration error naming the setting and address."""
    try:
        yield
    except OSError as exc:
        env = Config.env_names()[field_name]
        where = format_hostport(*addr)
        raise ConfigError(env, where, f"cannot listen: {exc.strerror or exc}") from exc


def _startup_error(group: BaseExceptionGroup[BaseException]) -> ConfigError | None:
    """The ConfigError a failed start left in trio's exception groups, if that is all
    there is (anything else is a bug and keeps its traceback)."""
    matched, rest = group.split(ConfigError)
    if matched is None or rest is not None:
        return None
    leaf: BaseException = matched
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    assert isinstance(leaf, ConfigError)
    return leaf


def attach_cluster_source(
    agent: Agent,
    cluster_file: str,
    cluster_prefix: str | None,
    policy_dir: str | None,
    *,
    poll: float = 0.5,
) -> EnrollmentController:
    """Shared mode from a cluster file: validate the file, prefix, node and policies, and
    register the enrollment controller (with the configured redirector) with the agent.

    Raises ConfigError before anything starts: an invalid file (naming the field), no
    prefix, a NODE_NAME that is not a node of the file, or a bad policy.
    """
    from ztunnel.enroll.controller import EnrollmentController
    from ztunnel.sources.clusterfile.source import ClusterFileSource

    cfg = agent.config
    if cfg.xds_address or cfg.inpod_uds:
        used = "XDS_ADDRESS" if cfg.xds_address else "INPOD_UDS"
        raise ConfigError(
            "--cluster",
            cluster_file,
            f"the cluster file brings its own pods and mesh state; it cannot be combined "
            f"with {used} (istiod / istio-cni)",
        )
    source, initial = ClusterFileSource.open(
        cluster_file, cluster_prefix, cfg.node_name, policy_dir=policy_dir, poll=poll
    )
    controller = EnrollmentController(
        source,
        agent_redirector(cfg),
        agent,
        initial=initial,
        drain_deadline=cfg.connection_termination_deadline,
        poll=poll,
    )
    register_controller(agent, controller)
    return controller


def agent_redirector(config: Config) -> Redirector:
    """The configured redirector (iptables unless set), prepared: raises ConfigError when
    eBPF mode cannot run."""
    from ztunnel.redirect.modes import make_redirector

    mode = config.redirect_mode or RedirectMode.IPTABLES
    return make_redirector(mode, redirect_ports(config), pin_dir=Path(config.bpf_pin_dir))


def register_controller(agent: Agent, controller: EnrollmentController) -> None:
    """Run the controller with the agent and show its pods' redirection in config_dump."""
    agent.extra_services.append(controller.run)
    agent.redirection = controller.redirection


class PodSourceKind(enum.Enum):
    CLUSTER_FILE = "cluster-file"
    ISTIO_CNI = "istio-cni"
    KUBERNETES = "kubernetes"


def pod_source_kind(
    config: Config, cluster_file: str | None, env: Mapping[str, str]
) -> PodSourceKind | None:
    """Which pod source shared mode uses, the first configured: ``--cluster``, istio-cni
    (INPOD_UDS, or its default path under istiod), the Kubernetes API (``KUBECONFIG`` or
    in-cluster: the DaemonSet's case). None: no source."""
    if cluster_file is not None:
        return PodSourceKind.CLUSTER_FILE
    if config.zds_path is not None:
        return PodSourceKind.ISTIO_CNI
    if k8s_access_configured(env):
        return PodSourceKind.KUBERNETES
    return None


def attach_pod_source(
    agent: Agent,
    cluster_file: str | None,
    cluster_prefix: str | None,
    policy_dir: str | None,
    env: Mapping[str, str],
) -> EnrollmentController:
    """Shared mode's pod source (``pod_source_kind``), registered with the agent; raises
    ConfigError when there is none or its settings are unusable."""
    cfg = agent.config
    kind = pod_source_kind(cfg, cluster_file, env)
    if kind is PodSourceKind.CLUSTER_FILE:
        assert cluster_file is not None
        return attach_cluster_source(agent, cluster_file, cluster_prefix, policy_dir)
    if kind is PodSourceKind.ISTIO_CNI:
        assert cfg.zds_path is not None
        if policy_dir is not None:
            raise ConfigError("--policies", policy_dir, "policies come from istiod (XDS_ADDRESS)")
        return attach_zds_source(agent, cfg.zds_path)[1]
    if kind is PodSourceKind.KUBERNETES:
        if policy_dir is not None:
            why = "policies come from the Kubernetes API (security.istio.io)"
            raise ConfigError("--policies", policy_dir, why)
        return attach_kubernetes_source(agent, env)[1]
    raise ConfigError(
        "PROXY_MODE",
        "shared",
        "shared (in-pod) mode needs a pod source: the Kubernetes API (KUBECONFIG, or "
        "in-cluster), --cluster FILE, or istio-cni (INPOD_UDS) with istiod (XDS_ADDRESS); "
        "for a single workload use PROXY_MODE=dedicated with PROXY_WORKLOAD_INFO",
    )


def attach_kubernetes_source(
    agent: Agent, env: Mapping[str, str], **source_options: Any
) -> tuple[KubernetesPodSource, EnrollmentController]:
    """Pods, workloads, services and policies from the Kubernetes API (docs/kubernetes.md):
    the agent installs the redirection and marks each pod it enrolled with the
    redirection annotation. Raises ConfigError for unusable cluster access."""
    from ztunnel.enroll.controller import EnrollmentController
    from ztunnel.sources import kubernetes as k8s
    from ztunnel.sources.kubernetes.annotate import Annotator

    cfg = agent.config
    if cfg.local_xds_path or cfg.local_xds:
        local = "LOCAL_XDS_PATH" if cfg.local_xds_path else "LOCAL_XDS"
        raise ConfigError(
            local, "", "the mesh state comes from the Kubernetes API (KUBECONFIG / in-cluster)"
        )
    source = k8s.from_config(cfg, env, **source_options)
    annotator = Annotator(source.client, source.pod_object)
    controller = EnrollmentController(
        source,
        agent_redirector(cfg),
        agent,
        drain_deadline=cfg.connection_termination_deadline,
        on_start=annotator.enrolled,
        on_leave=annotator.left,
    )
    agent.extra_services.append(partial(_serve_kubernetes, source, annotator, controller))
    agent.redirection = controller.redirection
    agent.readiness_checks.append(source.not_ready_reason)
    agent.dump_sections["kubernetes"] = lambda: {**source.dump(), "annotations": annotator.dump()}
    return source, controller


async def _serve_kubernetes(
    source: KubernetesPodSource,
    annotator: Annotator,
    controller: EnrollmentController,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Started at once, so the agent serves readiness ("waiting for the Kubernetes API")
    while the first list runs; the client is closed when the agent stops."""
    task_status.started()
    log.info("pod source: kubernetes", server=source.where, node=source.settings.node_name)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(source.run)
            nursery.start_soon(annotator.run)
            nursery.start_soon(controller.run)
    finally:
        with trio.CancelScope(shield=True):
            await source.aclose()


def attach_zds_source(
    agent: Agent, path: str, **client_options: Any
) -> tuple[ZdsClient, EnrollmentController]:
    """Pods from istio-cni: it decides enrollment and installs the redirection (so no
    redirector here), we acknowledge each Add once the pod's proxy started or failed."""
    from ztunnel.enroll.controller import EnrollmentController
    from ztunnel.sources.zds import ZdsClient

    cfg = agent.config
    zds = ZdsClient(
        path, cluster_id=cfg.cluster_id, node=cfg.node_name, report_starts=True, **client_options
    )
    controller = EnrollmentController(
        zds,
        NoRedirector(),
        agent,
        # A pod that left the snapshot (Del) counts as deleted: it drains at once.
        drain_deadline=cfg.connection_termination_deadline,
        on_start=lambda pod, error: zds.report(pod.uid, error),
    )
    agent.extra_services += [zds.run, controller.run]
    agent.redirection = controller.redirection
    agent.readiness_checks.append(lambda: _prefixed("istio-cni", zds.not_ready_reason()))
    agent.dump_sections["zds"] = zds.dump
    return zds, controller


def attach_xds(agent: Agent) -> XdsClient:
    """Workloads, services and policies from istiod into the agent's store; readiness
    waits for the first sync (ztunnel's "state manager")."""
    from ztunnel.sources.xds import XdsClient, xds_config, xds_node

    client = XdsClient(xds_config(agent.config), agent.store, xds_node(agent.config))
    agent.extra_services.insert(0, client.run)  # before the pod source: state first
    agent.readiness_checks.append(client.not_ready_reason)
    agent.dump_sections["xds"] = client.dump
    return client


def _prefixed(what: str, reason: str | None) -> str | None:
    return None if reason is None else f"{what}: {reason}"


__all__ = [
    "Agent",
    "PodSourceKind",
    "WorkloadInfo",
    "attach_cluster_source",
    "attach_kubernetes_source",
    "attach_pod_source",
    "attach_xds",
    "attach_zds_source",
    "make_ca",
    "pod_source_kind",
    "register_controller",
]
