"""In-pod enrollment: which of this node's pods are in the mesh, and their proxies' lifecycle.

For every snapshot of the cluster the controller (1) replaces the agent's workload state
(pods, services, policies from the file and ``--policies``) and (2) reconciles this node's
pods. A pod is enrolled when ``is_enrolled`` says so (namespace labelled
``istio.io/dataplane-mode=ambient``, pod not opted out). Enrolling holds one fd of the pod's
netns, installs istio-cni's in-pod iptables rules (idempotent, reconciling what a previous
agent left) and starts a ``WorkloadProxy`` whose every socket lives in that netns, marked
0x539. Un-enrolling drains the proxy, then removes exactly our rules and closes the fd.

Between snapshots the controller re-checks every pod's netns identity (inode + dev), so a
sandbox recreated under the same name is re-enrolled, and retries pods whose proxy could
not bind every 5 s (they stay pending: readiness reports them).

On agent shutdown the rules are deliberately left in place, as istio-cni does: a pod whose
agent is gone fails closed (its traffic is redirected to ports nobody listens on) instead
of silently leaving the mesh; the next agent reuses the rules and takes over. If the pod
left the mesh while no agent ran, the next agent removes the rules it finds there instead.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
import trio
import yaml

from ztunnel.cluster.spec import ClusterSpec, PodSpec, load_spec
from ztunnel.cluster.state import is_enrolled, pod_uid
from ztunnel.config import Config, WorkloadInfo
from ztunnel.enroll.layout import AttachedCluster, attach, attached_state
from ztunnel.enroll.source import ClusterFileSource, PodSource
from ztunnel.errors import ConfigError, ZtunnelError
from ztunnel.model.authorization import Authorization
from ztunnel.model.workload import Service, Workload
from ztunnel.policy.istio import attach_policies, translate_documents
from ztunnel.proxy.sockets import NetnsSocketFactory
from ztunnel.proxy.workload_proxy import ProxyAddresses, WorkloadProxy
from ztunnel.redirect import iptables
from ztunnel.redirect.netns import NETNS_RUN_DIR, NetNamespace

if TYPE_CHECKING:
    from ztunnel.agent import Agent

log = structlog.get_logger("ztunnel.enroll")

RETRY_INTERVAL = 5.0  # ztunnel retries a pod whose proxy failed to start every 5 s
PENDING_KEY = "proxy"  # the agent's "not reconciled yet" readiness entry
Ident = tuple[int, int]


def pending_key(pod_key: str) -> str:
    return f"pod {pod_key}"


def netns_ident(name: str) -> Ident | None:
    """(dev, inode) of a named netns, None if it does not exist (no fd needed)."""
    try:
        st = os.stat(NETNS_RUN_DIR / name)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def inpod_config(config: Config) -> iptables.InpodConfig:
    return iptables.InpodConfig(
        outbound_port=config.outbound_addr[1],
        inbound_plaintext_port=config.inbound_plaintext_addr[1],
        inbound_port=config.inbound_addr[1],
        mark=config.packet_mark,
    )


# -- workload state ------------------------------------------------------------------------


def read_policy_docs(policy_dir: str) -> list[Any]:
    """Every document under ``policy_dir``, each file parsed once and validated (errors name
    the file and field)."""
    files = sorted(p for p in Path(policy_dir).rglob("*") if p.suffix in (".yaml", ".yml"))
    docs: list[Any] = []
    for file in files:
        if not file.is_file():
            continue
        try:
            file_docs = [d for d in yaml.safe_load_all(file.read_text()) if d is not None]
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(str(file), "", f"cannot read policies: {exc}") from exc
        translate_documents(file_docs, source=str(file))  # fail fast, naming this file
        docs += file_docs
    return docs


def cluster_model(
    cluster: AttachedCluster, extra_policy_docs: Sequence[Any] = ()
) -> tuple[list[Workload], list[Service], list[Authorization]]:
    """Workloads, services and policies of a snapshot (raises ConfigError on a bad policy)."""
    workloads, services, labels = attached_state(cluster)
    translated = translate_documents(
        [*cluster.spec.policies, *extra_policy_docs], source=cluster.spec.source
    )
    for warning in translated.warnings:
        log.warning("policy skipped", message=warning)
    attached, policies = attach_policies(workloads, labels, translated)
    return attached, services, policies


def _info(spec: PodSpec) -> WorkloadInfo:
    return WorkloadInfo(spec.namespace, spec.name, spec.service_account)


# -- per-pod state -------------------------------------------------------------------------


@dataclass
class EnrolledPod:
    """One pod we hold: its netns fd, and its proxy once it started."""

    spec: PodSpec
    netns_name: str
    netns: NetNamespace
    ident: Ident
    proxy: WorkloadProxy | None = None
    retry_at: float = 0.0

    @property
    def key(self) -> str:
        return self.spec.key

    @property
    def uid(self) -> str:
        return pod_uid(self.spec)

    def info(self) -> WorkloadInfo:
        return _info(self.spec)


@dataclass
class _Draining:
    done: trio.Event = field(default_factory=trio.Event)


class EnrollmentController:
    """Reconciles this node's pods against the newest snapshot, every ``poll`` seconds."""

    def __init__(
        self,
        agent: Agent,
        source: PodSource,
        initial: ClusterSpec,
        prefix: str,
        *,
        policy_docs: Sequence[Any] = (),
        poll: float = 0.5,
        retry_interval: float = RETRY_INTERVAL,
    ) -> None:
        self.agent = agent
        self.source = source
        self.prefix = prefix
        self.node = agent.config.node_name
        self.policy_docs = list(policy_docs)
        self.poll = poll
        self.retry_interval = retry_interval
        self.rules = inpod_config(agent.config)
        self.cluster = attach(initial, prefix)
        self._applied: ClusterSpec | None = None
        # The last snapshot whose state went into the store: pods are reconciled against it,
        # so enrollment never follows a snapshot whose policies were rejected.
        self._good: AttachedCluster | None = None
        self.pods: dict[str, EnrolledPod] = {}
        self._draining: dict[str, _Draining] = {}
        self._blocked: dict[str, str] = {}  # wanted pods we cannot open: key -> reason
        self._checked: dict[str, Ident] = {}  # not-in-mesh pods checked for stranded rules
        self._wake = trio.Event()
        self._nursery: trio.Nursery | None = None

    @property
    def nursery(self) -> trio.Nursery:
        if self._nursery is None:
            raise RuntimeError("EnrollmentController.run has not started")
        return self._nursery

    # -- service ---------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await self.reconcile()
                self.agent.pending.pop(PENDING_KEY, None)
                nursery.start_soon(self._follow_source)
                task_status.started()
                while True:
                    with trio.move_on_after(self.poll):
                        await self._wake.wait()
                    self._wake = trio.Event()
                    await self.reconcile()
        finally:
            # Rules stay installed on purpose (fail closed); only our fds go away.
            for pod in self.pods.values():
                pod.netns.close()

    async def _follow_source(self) -> None:
        async for spec in self.source:
            if spec == self.cluster.spec:
                continue
            try:
                cluster = attach(spec, self.prefix)
            except Exception as exc:  # a bad snapshot must never end the agent
                log.error(
                    "cannot attach to cluster snapshot; keeping the last good one",
                    source=spec.source,
                    error=repr(exc),
                )
                continue
            self.cluster = cluster
            self._wake.set()

    # -- reconciling -----------------------------------------------------------------

    async def reconcile(self) -> None:
        """One pass: state from the newest snapshot, then every pod of this node.

        Pods follow one snapshot for the whole pass (``self.cluster`` may change at every
        await), and only one whose state was applied: store and enrollment stay in step.
        """
        cluster = self._apply_state()
        if cluster is None:
            return
        spec = cluster.spec
        mine = [p for p in spec.pods if p.node == self.node]
        wanted = {p.key: p for p in mine if is_enrolled(spec, p)}
        for key in [k for k in self.pods if k not in wanted]:
            gone = key not in cluster.pods
            self._start_unenroll(self.pods.pop(key), graceful=not gone, uninstall=True)
        for key in [k for k in self._blocked if k not in wanted]:
            del self._blocked[key]
            self.agent.pending.pop(pending_key(key), None)
        for pod in wanted.values():
            await self._reconcile_pod(cluster, pod)
        others = [
            p.key
            for p in mine
            if p.key not in wanted and p.key not in self.pods and p.key not in self._draining
        ]
        await self._remove_stranded(cluster, others)

    def _apply_state(self) -> AttachedCluster | None:
        """Apply the newest snapshot's state once; return the last cleanly applied snapshot."""
        cluster = self.cluster
        if self._applied is cluster.spec:
            return self._good
        self._applied = cluster.spec
        try:
            workloads, services, policies = cluster_model(cluster, self.policy_docs)
        except ConfigError as exc:
            log.warning(
                "cluster policies rejected; keeping the previous state",
                field=exc.field,
                problem=exc.problem,
            )
            return self._good
        except Exception as exc:  # a snapshot we cannot model must never end the agent
            log.error(
                "cluster state rejected; keeping the previous state",
                source=cluster.spec.source,
                error=repr(exc),
            )
            return self._good
        self.agent.store.replace_all(workloads, services, policies)
        self._good = cluster
        log.info(
            "cluster state applied",
            workloads=len(workloads),
            services=len(services),
            policies=len(policies),
        )
        return cluster

    async def _reconcile_pod(self, cluster: AttachedCluster, spec: PodSpec) -> None:
        name = cluster.pods[spec.key].netns
        ident = netns_ident(name)
        held = self.pods.get(spec.key)
        if held is not None and (held.ident != ident or held.info() != _info(spec)):
            # A new sandbox (or a changed identity): the old proxy's netns is dead or wrong.
            log.info("pod sandbox changed, re-enrolling", pod=spec.key)
            self._start_unenroll(self.pods.pop(spec.key), graceful=False, uninstall=False)
            held = None
        if ident is None:
            self._block(spec.key, f"netns {name} not found")
            return
        if held is None:
            await self._wait_drained(spec.key)
            held = self._open(spec, name)
            if held is None:
                return
            self.pods[spec.key] = held
        if held.proxy is None and trio.current_time() >= held.retry_at:
            await self._enroll(held)

    def _block(self, key: str, reason: str) -> None:
        """A wanted pod we cannot even open: not ready (no proxy), logged once per reason."""
        self.agent.pending[pending_key(key)] = reason
        if self._blocked.get(key) != reason:
            self._blocked[key] = reason
            log.warning("pod cannot be enrolled; will retry", pod=key, reason=reason)

    def _open(self, spec: PodSpec, name: str) -> EnrolledPod | None:
        try:
            ns = NetNamespace.named(name)
            ident = ns.ident
        except (OSError, ZtunnelError) as exc:
            self._block(spec.key, f"cannot open netns {name}: {exc}")
            return None
        self._blocked.pop(spec.key, None)  # pending stays until the proxy runs
        return EnrolledPod(spec, name, ns, ident)

    async def _enroll(self, pod: EnrolledPod) -> None:
        try:
            changed = await trio.to_thread.run_sync(iptables.install, pod.netns, self.rules)
            proxy = self._make_proxy(pod)
            await self.agent.start_proxy(self.nursery, proxy)
        except Exception as exc:  # one pod's failure must never end the agent
            reason = f"failure to start proxy: {exc}"
            self.agent.pending[pending_key(pod.key)] = reason
            pod.retry_at = trio.current_time() + self.retry_interval
            log.error(
                "pod enrollment failed; retrying",
                pod=pod.key,
                error=str(exc),
                retry_in=self.retry_interval,
            )
            return
        pod.proxy = proxy
        self.agent.pending.pop(pending_key(pod.key), None)
        log.info(
            "pod enrolled",
            pod=pod.key,
            uid=pod.uid,
            netns=pod.netns_name,
            rules="installed" if changed else "reused",
            transparent=proxy.transparent,
        )

    def _make_proxy(self, pod: EnrolledPod) -> WorkloadProxy:
        cfg = self.agent.config
        return WorkloadProxy(
            self.agent.ctx,
            pod.info(),
            NetnsSocketFactory(pod.netns, cfg.packet_mark),
            ProxyAddresses(
                outbound=cfg.outbound_addr,
                inbound=cfg.inbound_addr,
                inbound_plaintext=cfg.inbound_plaintext_addr,
            ),
            uid=pod.uid,
            orig_src=cfg.enable_orig_src,
        )

    # -- un-enrolling ----------------------------------------------------------------

    def _start_unenroll(self, pod: EnrolledPod, *, graceful: bool, uninstall: bool) -> None:
        self.agent.pending.pop(pending_key(pod.key), None)
        draining = self._draining[pod.key] = _Draining()
        self.nursery.start_soon(self._unenroll, pod, graceful, uninstall, draining)

    async def _unenroll(
        self, pod: EnrolledPod, graceful: bool, uninstall: bool, draining: _Draining
    ) -> None:
        """Drain first (replies of spoofed connections need our routing), then remove rules."""
        # Every failure is logged and the next step still runs: one pod must never end the agent.
        try:
            if pod.proxy is not None:
                deadline = self.agent.config.connection_termination_deadline if graceful else 0.0
                try:
                    await self.agent.stop_proxy(pod.uid, deadline)
                except Exception as exc:
                    log.error("could not stop pod proxy", pod=pod.key, error=repr(exc))
            if uninstall:
                try:
                    await trio.to_thread.run_sync(iptables.uninstall, pod.netns, self.rules)
                except Exception as exc:
                    log.warning("could not remove pod rules", pod=pod.key, error=str(exc))
            log.info("pod un-enrolled", pod=pod.key, rules="removed" if uninstall else "left")
        finally:
            pod.netns.close()
            draining.done.set()
            if self._draining.get(pod.key) is draining:
                del self._draining[pod.key]

    async def _wait_drained(self, key: str) -> None:
        draining = self._draining.get(key)
        if draining is not None:
            await draining.done.wait()

    async def _remove_stranded(self, cluster: AttachedCluster, keys: list[str]) -> None:
        """Remove our rules from pods that left the mesh while no agent held them.

        Otherwise their traffic stays redirected to ports nobody listens on, forever. Each
        netns is checked once (a recreated sandbox has a new ident and is checked again).
        """
        self._checked = {k: v for k, v in self._checked.items() if k in keys}
        for key in keys:
            name = cluster.pods[key].netns
            seen = netns_ident(name)
            if seen is None or self._checked.get(key) == seen:
                continue
            try:
                ident, removed = await trio.to_thread.run_sync(self._strip_rules, name)
            except Exception as exc:  # retried next pass: stranded rules black-hole the pod
                log.warning("could not check a pod for stranded rules", pod=key, error=str(exc))
                continue
            self._checked[key] = ident  # the fd's ident: the netns we really checked
            if removed:
                log.info("removed redirection rules of a pod no longer in the mesh", pod=key)

    def _strip_rules(self, name: str) -> tuple[Ident, bool]:
        """(ident, whether our rules were there and are now removed); runs in a thread."""
        with NetNamespace.named(name) as ns:
            ident = ns.ident
            if iptables.installed(ns).empty:
                return ident, False
            iptables.uninstall(ns, self.rules)
            return ident, True


# -- wiring into the agent -----------------------------------------------------------------


def attach_cluster_source(
    agent: Agent,
    cluster_file: str,
    cluster_prefix: str | None,
    policy_dir: str | None,
    *,
    poll: float = 0.5,
) -> EnrollmentController:
    """Validate the cluster file, node and policies; register the controller with the agent.

    Raises ConfigError before anything starts: an invalid file (naming the field), no
    prefix, a NODE_NAME that is not a node of the file, or a bad policy.
    """
    spec = load_spec(cluster_file)
    if not cluster_prefix:
        raise ConfigError(
            "--cluster-prefix",
            "",
            "required with --cluster (the prefix the cluster was built with)",
        )
    node = agent.config.node_name
    if node not in spec.nodes:
        raise ConfigError(
            "NODE_NAME", node, f"not a node of {cluster_file} (nodes: {', '.join(spec.nodes)})"
        )
    docs = read_policy_docs(policy_dir) if policy_dir is not None else []
    cluster = attach(spec, cluster_prefix)
    workloads, services, policies = cluster_model(cluster, docs)  # fail fast on bad policies
    agent.store.replace_all(workloads, services, policies)
    source = ClusterFileSource(cluster_file, poll=poll)
    controller = EnrollmentController(
        agent, source, spec, cluster_prefix, policy_docs=docs, poll=poll
    )
    agent.extra_services.append(controller.run)
    return controller
