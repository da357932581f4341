"""The ztunnel side of istio-cni's ZDS protocol as a state machine (sans-IO, no trio).

Theory of operation (reference §2.4; ZT src/inpod/statemanager.rs): istio-cni sends,
one at a time and each waiting for our Ack, every pod it has (``AddWorkload`` with the
pod's netns fd, or ``KeepWorkload`` when it has no netns for it), then
``SnapshotSent``; after that only Add and Del. ``ZdsState`` holds the pods across
connections (their fds stay open while the pods run) and decides each Ack:

- Add: the pod is held (in the snapshot set until SnapshotSent). The same uid with the
  same netns (dev, inode) is idempotent; a different netns means the sandbox was
  recreated and replaces it. ``workload_info`` is required.
- Keep: only before SnapshotSent; keeps a held pod through the reconcile.
- Del: after SnapshotSent the pod is dropped at once (its proxy is drained
  immediately: its veth is gone); before, it only leaves the snapshot set.
- SnapshotSent: every held pod not named since the connection started is dropped.
  A second one, or a Keep after it, is a ``ProtocolError``: NACK and end the stream.

fds are owned by the state: an fd that leaves is put on ``retired`` with the state
version from which no snapshot references it; the driver closes it once the consumer
is done with that version (it may be opening ``/proc/self/fd/<n>`` until then).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError

from ztunnel.errors import ZtunnelError
from ztunnel.model.identity import DEFAULT_CLUSTER_ID
from ztunnel.model.pod import NetnsRef, Pod, PodSnapshot
from ztunnel.proto import zds_pb2

SOURCE = "zds"
NetnsIdent = tuple[int, int]  # (st_dev, st_ino) of the netns


class ProtocolError(ZtunnelError):
    """istio-cni broke the protocol: NACK, then end the stream."""


class ReadError(ZtunnelError):
    """A message we cannot take (bad fd count or type, truncated, undecodable): NACK,
    then end the stream (as ztunnel: "failure to read message")."""


@dataclass(eq=False)
class HeldPod:
    cni_uid: str  # AddWorkload.uid (the Kubernetes pod UID)
    pod: Pod
    fd: int
    ident: NetnsIdent
    generation: int  # bumps whenever the pod's proxy must be (re)started


@dataclass(frozen=True, slots=True)
class AddOutcome:
    pod: Pod
    generation: int
    started: bool  # False: idempotent, the running proxy stays


@dataclass
class ZdsState:
    cluster_id: str = DEFAULT_CLUSTER_ID
    node: str = ""
    pods: dict[str, HeldPod] = field(default_factory=dict)  # by cni uid
    version: int = 0  # bumps whenever the published pod set changes
    retired: list[tuple[int, int]] = field(default_factory=list)  # (fd, from version)
    snapshot_received: bool = False
    _named: set[str] = field(default_factory=set)
    _generations: int = 0

    def new_connection(self) -> None:
        """A (re)connection: istio-cni sends its whole snapshot again."""
        self.snapshot_received = False
        self._named = set()

    def snapshot(self) -> PodSnapshot:
        return PodSnapshot(tuple(h.pod for h in self.pods.values()), None, SOURCE)

    def held(self) -> Iterator[HeldPod]:
        return iter(self.pods.values())

    # -- messages ---------------------------------------------------------------------

    def add(self, add: zds_pb2.AddWorkload, fd: int, ident: NetnsIdent) -> AddOutcome:
        """Take ``fd`` (always: on error it is retired unpublished)."""
        if not add.uid or not add.HasField("workload_info"):
            self._retire(fd, published=False)
            raise ProtocolError("AddWorkload needs a uid and workload_info")
        info = add.workload_info
        pod = Pod(
            uid=f"{self.cluster_id}//Pod/{info.namespace}/{info.name}",
            name=info.name,
            namespace=info.namespace,
            service_account=info.service_account or "default",
            node=self.node,
            netns=NetnsRef(f"/proc/self/fd/{fd}", ephemeral=True),
            in_mesh=True,  # istio-cni decided: it sends only ambient pods
            k8s_uid=add.uid,
        )
        if not self.snapshot_received:
            self._named.add(add.uid)
        current = self.pods.get(add.uid)
        if current is not None and current.ident == ident:
            self._retire(fd, published=False)  # the duplicate; ours stays
            return AddOutcome(current.pod, current.generation, started=False)
        if current is not None:  # a new sandbox for the same pod
            self._drop(add.uid)
        for other in [h for h in self.pods.values() if h.pod.uid == pod.uid]:
            self._drop(other.cni_uid)  # same name, old pod UID: that sandbox is gone
        self._generations += 1
        self.pods[add.uid] = HeldPod(add.uid, pod, fd, ident, self._generations)
        self.version += 1
        return AddOutcome(pod, self._generations, started=True)

    def touch(self) -> None:
        """Publish the same pods again (the consumer re-tries what failed)."""
        self.version += 1

    def keep(self, keep: zds_pb2.KeepWorkload) -> None:
        if self.snapshot_received:
            raise ProtocolError("KeepWorkload after SnapshotSent")
        self._named.add(keep.uid)

    def delete(self, uid: str) -> bool:
        """Whether the published pod set changed."""
        if not self.snapshot_received:
            self._named.discard(uid)
            return False
        return self._drop(uid)

    def snapshot_sent(self) -> bool:
        """Reconcile; whether the published pod set changed."""
        if self.snapshot_received:
            raise ProtocolError("a second SnapshotSent")
        self.snapshot_received = True
        stale = [uid for uid in self.pods if uid not in self._named]
        for uid in stale:
            self._drop(uid)
        self._named = set()
        return bool(stale)

    # -- fds --------------------------------------------------------------------------

    def _drop(self, uid: str) -> bool:
        held = self.pods.pop(uid, None)
        if held is None:
            return False
        self.version += 1
        self._retire(held.fd, published=True)
        return True

    def _retire(self, fd: int, *, published: bool) -> None:
        # An fd never put in a snapshot can go at once (version 0 <= anything consumed).
        self.retired.append((fd, self.version if published else 0))

    def closable(self, consumed: int) -> list[int]:
        """Retired fds no snapshot up to version ``consumed`` references: take them."""
        ready = [fd for fd, since in self.retired if since <= consumed]
        self.retired = [(fd, since) for fd, since in self.retired if since > consumed]
        return ready

    def release_all(self) -> list[int]:
        """Every fd held or retired (the client is stopping)."""
        fds = [fd for fd, _ in self.retired] + [h.fd for h in self.pods.values()]
        self.retired, self.pods = [], {}
        return fds


def decode_request(data: bytes) -> zds_pb2.WorkloadRequest:
    try:
        request = zds_pb2.WorkloadRequest.FromString(data)
    except (DecodeError, ValueError) as exc:
        raise ReadError(f"undecodable WorkloadRequest: {exc}") from exc
    if request.WhichOneof("payload") is None:
        raise ReadError("WorkloadRequest without a payload")
    return request


def check_fds(kind: str, fds: list[int]) -> int | None:
    """The netns fd an Add must carry (exactly one); any other message carries none."""
    if kind == "add":
        if len(fds) != 1:
            raise ReadError(f"AddWorkload must carry exactly 1 fd, got {len(fds)}")
        return fds[0]
    if fds:
        raise ReadError(f"unexpected fd(s) with {kind}: {len(fds)}")
    return None


def ack(error: str = "") -> bytes:
    return zds_pb2.WorkloadResponse(ack=zds_pb2.Ack(error=error)).SerializeToString()


def hello() -> bytes:
    return zds_pb2.ZdsHello(version=zds_pb2.V1).SerializeToString()
