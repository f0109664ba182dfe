"""The pod worker of the lab's kubelet: one pod's life on this node, from sandbox (network namespace,
veth, address, cgroup, /etc files) and volumes through init containers and containers to graceful
deletion, and the status a kubelet reports for it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import subprocess
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clustermesh.lab.netns import LabPod, NetnsError, delete_netns, ip, kill_cgroup, remove_cgroup
from clustermesh.lab.node import pod_status, spec
from clustermesh.lab.node.api import APIError
from clustermesh.lab.node.container import Container
from clustermesh.lab.node.records import ContainerRecord, Obj, PodRecord, now

if TYPE_CHECKING:
    from clustermesh.lab.node.agent import NodeAgent

log = logging.getLogger("clustermesh.lab.node")


def remove_network(record: PodRecord, node_netns: str) -> None:
    """A pod's network namespace and veth; the node's namespace is not the pod's to remove (a
    hostNetwork pod's record names it)."""
    if record.netns == node_netns:
        return
    delete_netns(record.netns)
    with contextlib.suppress(NetnsError):
        ip("link", "del", record.veth, netns=node_netns)


def remove_sandbox(cgroup: Path, record: PodRecord, node_netns: str) -> None:
    """What a pod had on the node besides its folder: its cgroup and its network."""
    remove_cgroup(cgroup)
    remove_network(record, node_netns)


class PodWorker:
    """Everything one pod needs on this node, from sandbox to deletion."""

    def __init__(self, agent: NodeAgent, pod: Obj, record: PodRecord | None) -> None:
        self.agent = agent
        self.pod = pod
        meta = pod["metadata"]
        self.uid: str = meta["uid"]
        self.name: str = meta["name"]
        self.namespace: str = meta.get("namespace", "default")
        self.key = f"{self.namespace}/{self.name}"
        self.adopted = record is not None
        # hostNetwork: the node's own namespace and address, as a kubelet gives them.
        self.host_network = bool(pod["spec"].get("hostNetwork"))
        self.record = record or PodRecord(
            uid=self.uid, namespace=self.namespace, name=self.name,
            netns=agent.cfg.netns if self.host_network else f"{agent.cfg.pod_prefix}-{self.uid[:8]}",
            veth="" if self.host_network else f"cm{self.uid[:8]}", ip="",
        )
        self.init_containers = [
            Container(self, c, self.record.containers.setdefault(c["name"], ContainerRecord()), init=True)
            for c in pod["spec"].get("initContainers") or []]
        self.containers = [Container(self, c, self.record.containers.setdefault(c["name"], ContainerRecord()))
                           for c in pod["spec"].get("containers", [])]
        self.init_done = not self.init_containers
        self.deleting = asyncio.Event()
        self.gone = False
        self.server_status: Obj = pod.get("status", {})
        self.task: asyncio.Task[None] | None = None
        self.sandbox_ready = False

    @property
    def dir(self) -> Path:
        return self.agent.cfg.state_dir / "pods" / self.uid

    @property
    def cgroup(self) -> Path:
        return self.agent.cfg.cgroup / f"pod-{self.uid}"

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / "record.json.tmp"
        tmp.write_text(json.dumps(asdict(self.record)))
        tmp.replace(self.dir / "record.json")

    def grace_period(self) -> float:
        meta_grace = self.pod["metadata"].get("deletionGracePeriodSeconds")
        if meta_grace is not None:
            return float(meta_grace)
        return float(self.pod["spec"].get("terminationGracePeriodSeconds", 30))

    def update(self, pod: Obj) -> None:
        self.pod = pod
        self.server_status = pod.get("status", {})
        for c in self.containers:
            c.spec = next((s for s in pod["spec"]["containers"] if s["name"] == c.name), c.spec)
        for c in self.init_containers:
            c.spec = next((s for s in pod["spec"].get("initContainers") or [] if s["name"] == c.name), c.spec)
        if pod["metadata"].get("deletionTimestamp"):
            self.deleting.set()

    # -------------------------------------------------------------- sandbox

    def etc_files(self) -> dict[str, str]:
        etc = self.dir / "etc"
        return {name: str(etc / name) for name in ("hosts", "resolv.conf", "hostname")}

    def write_hosts(self) -> None:
        etc = self.dir / "etc"
        etc.mkdir(parents=True, exist_ok=True)
        text = spec.hosts_file(self.pod, self.record.ip, self.agent.services_snapshot())
        path = etc / "hosts"
        # In place: the containers see this inode through a bind mount.
        with path.open("a+") as f:
            f.seek(0)
            if f.read() != text:
                f.seek(0)
                f.write(text)  # over the old text, then cut: a reader never finds the file empty
                f.truncate()

    def _make_sandbox(self) -> None:
        cfg = self.agent.cfg
        self.save()
        if not self.host_network and not Path(f"/run/netns/{self.record.netns}").exists():
            try:
                LabPod(self.record.netns, cfg.netns, self.record.ip, self.record.veth).create()
            except (NetnsError, OSError, subprocess.SubprocessError):
                self._remove_network()  # half made: the next try starts from nothing
                raise
        self.cgroup.mkdir(parents=True, exist_ok=True)
        etc = self.dir / "etc"
        etc.mkdir(parents=True, exist_ok=True)
        self.write_hosts()
        (etc / "resolv.conf").write_text(spec.resolv_conf(self.namespace))
        (etc / "hostname").write_text(spec.pod_hostname(self.pod)[0] + "\n")
        self.record.start_time = self.record.start_time or now()
        self.save()

    def _remove_network(self) -> None:
        if not self.host_network:
            remove_network(self.record, self.agent.cfg.netns)

    def _remove_sandbox(self) -> None:
        remove_sandbox(self.cgroup, self.record, self.agent.cfg.netns)

    # -------------------------------------------------------------- lifecycle

    async def run(self) -> None:
        try:
            if await self._prepare():
                self.sandbox_ready = True
                self.agent.statuses.changed(self)
                if await self._run_init_containers():
                    for c in self.containers:
                        c.task = asyncio.create_task(c.run(self.adopted), name=f"{self.key}/{c.name}")
        except asyncio.CancelledError:
            raise
        except Exception:  # the pod stays deletable whatever went wrong
            log.exception("[%s] pod worker failed", self.key)
        await self.deleting.wait()
        await self.terminate()

    async def _run_init_containers(self) -> bool:
        """Each init container in order, to a successful exit; False when one failed for good
        (restartPolicy Never: the pod fails) or the pod is deleted first."""
        for c in self.init_containers:
            c.task = asyncio.create_task(c.run(self.adopted), name=f"{self.key}/{c.name}")
            deleted = asyncio.ensure_future(self.deleting.wait())
            await asyncio.wait({c.task, deleted}, return_when=asyncio.FIRST_COMPLETED)
            deleted.cancel()
            if self.deleting.is_set():
                return False
            finished = c.record.finished
            if finished is None or finished.get("exitCode") != 0:
                return False
            c.state.ready = True  # a completed init container is reported ready, as a kubelet does
        self.init_done = True
        self.agent.statuses.changed(self)
        return True

    async def _prepare(self) -> bool:
        """Sandbox and volumes, retried every 5 s (a ConfigMap may appear later); False when
        the pod is deleted first."""
        while not self.deleting.is_set():
            try:
                if not self.record.ip:  # on the loop: two pods starting together get two addresses
                    self.record.ip = self.agent.cfg.address if self.host_network else self.agent.allocate_ip()
                await asyncio.to_thread(self._make_sandbox)
                await self.agent.volumes.make(self)
                return True
            except (NetnsError, OSError, spec.ConfigError, APIError, subprocess.SubprocessError) as exc:
                log.error("[%s] sandbox: %s", self.key, exc)
                reason = "CreateContainerConfigError" if isinstance(exc, spec.ConfigError) else "ContainerCreating"
                for c in self.containers:
                    c.state.waiting = (reason, str(exc))
                self.agent.statuses.changed(self)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.deleting.wait(), 5)
        return False

    async def terminate(self) -> None:
        """A kubelet's graceful deletion: not ready, preStop (or the drain delay), stop
        signal, SIGKILL after the grace period, sandbox removed, then the final DELETE."""
        grace = self.grace_period()
        deadline = time.monotonic() + grace
        everyone = [*self.init_containers, *self.containers]
        for c in everyone:
            c.stopping = True
            c.state.ready = False
        await self.push_status()
        if not self.gone and grace > 0:
            # Endpoints leave before the process stops: the EndpointSlice controller drops the
            # pod on its deletionTimestamp, and the socket-LB follows within milliseconds; this
            # pause (a preStop sleep a kubelet does not make, most production pods add one) lets
            # that happen before the server closes its listener.
            hooks = [c for c in self.containers if (c.spec.get("lifecycle") or {}).get("preStop")]
            if hooks:
                await asyncio.gather(*(self.agent.prober.run_hook(c, c.spec["lifecycle"]["preStop"], deadline)
                                       for c in hooks))
            else:
                await asyncio.sleep(min(self.agent.cfg.drain_delay, grace))
        remaining = max(0.0, deadline - time.monotonic())
        for c, result in zip(everyone, await asyncio.gather(*(c.stop(remaining) for c in everyone),
                                                             return_exceptions=True), strict=True):
            if isinstance(result, BaseException):
                log.error("[%s] stopping %s: %s; killing its cgroup", self.key, c.name, result)
            kill_cgroup(c.cgroup)
            if c.task is not None:
                c.task.cancel()
        try:
            await asyncio.to_thread(self._remove_sandbox)
        except Exception:
            log.exception("[%s] removing the sandbox (lab down removes what is left)", self.key)
        self.agent.finished.add(self.uid)  # events still on their way must not make a new worker
        self.agent.release(self)
        if not self.gone:
            await self.agent.final_delete(self.namespace, self.name, self.uid)
        shutil.rmtree(self.dir, ignore_errors=True)
        log.info("[%s] deleted", self.key)

    def status(self) -> Obj:
        state = pod_status.PodState(containers=[c.state for c in self.containers],
                              init_containers=[c.state for c in self.init_containers], init_done=self.init_done,
                              pod_ip=self.record.ip,
                              host_ip=self.agent.cfg.address, start_time=self.record.start_time)
        return pod_status.pod_status(self.pod, state, self.server_status, now())

    async def push_status(self) -> bool:
        """Write our status of the pod; False when the API server refused it (try again later)."""
        if self.gone:
            return True
        status = self.status()
        path = f"/api/v1/namespaces/{self.namespace}/pods/{self.name}/status"
        try:
            updated = await self.agent.api.patch(path, {"metadata": {"uid": self.uid}, "status": status})
            if updated:
                self.server_status = updated.get("status", {})
        except APIError as exc:
            if exc.status == 404:
                self.gone = True
            else:
                log.warning("[%s] status: %s; retrying", self.key, exc)
                return False
        return True

    def needs_status(self) -> bool:
        """True when the server's view differs from ours (e.g. the node controller marked
        the pod not ready while our Lease was late)."""
        ours, theirs = self.status(), self.server_status

        def sig(s: Obj) -> Any:
            return (s.get("phase"), s.get("podIP"),
                    sorted((c["type"], c["status"]) for c in s.get("conditions") or [] if c["type"] != "PodScheduled"),
                    [(c.get("name"), c.get("ready"), c.get("restartCount"), sorted(c.get("state", {})))
                     for c in s.get("containerStatuses") or []])

        return bool(sig(ours) != sig(theirs))

