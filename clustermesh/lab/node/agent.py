"""The lab's kubelet: registers a Node, renews its Lease, and runs the Pods bound to it.

One process per lab node, in the host namespace, acting on its node's namespaces:

- the Node object (labels, podCIDR, addresses, capacity, conditions, daemon endpoint) and
  its Lease in ``kube-node-lease``, renewed every 10 s;
- per Pod: a network namespace with an IP from the podCIDR and a veth to the node, a cgroup
  under the node's cgroup (so the node's socket-LB applies), volumes, /etc/hosts and
  /etc/resolv.conf, and one process per container started through ``sandbox.py``;
- probes (httpGet/tcpSocket from a socket made inside the pod's namespace, exec through the
  sandbox), restarts with crash-loop backoff, graceful deletion, the status a kubelet reports;
- a forwarder whose listening socket lives in the node namespace (127.0.0.1:<API port>) and
  whose upstream connections go to the API server on the host's 127.0.0.1, for kube-proxy
  and hostNetwork pods;
- an HTTPS server on 127.0.0.1 for the API server (``kubectl logs`` / ``exec``), server.py.

A restarted node agent adopts the pods it finds running (state in ``<state-dir>/pods``).

Cut the way kubelet is: this module is the node agent (its watches of pods and Services, the pod
workers it keeps, /etc/hosts); pod_worker.py runs one pod, container.py one container, runtime.py
starts and enters processes, prober.py probes, status_manager.py writes every pod's status (one
task), volumes.py makes and refreshes volumes (with the ConfigMap/Secret cache), node_status.py owns
the Node and its Lease, forwarder.py the API forwarder, server.py the HTTPS server, records.py what
survives a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

from clustermesh.lab.netns import NetnsError
from clustermesh.lab.node import node_status
from clustermesh.lab.node.api import APIError, NodeAPI
from clustermesh.lab.node.container import Container
from clustermesh.lab.node.forwarder import start_api_forwarder
from clustermesh.lab.node.node_status import NodeStatus
from clustermesh.lab.node.pod_worker import PodWorker, remove_sandbox
from clustermesh.lab.node.prober import Prober
from clustermesh.lab.node.records import NodeConfig, Obj, PodRecord
from clustermesh.lab.node.server import ContainerNotFound, NodeServer
from clustermesh.lab.node.status_manager import StatusManager
from clustermesh.lab.node.volumes import VolumeManager

log = logging.getLogger("clustermesh.lab.node")


class NodeAgent:
    def __init__(self, cfg: NodeConfig) -> None:
        self.cfg = cfg
        self.api = NodeAPI.from_kubeconfig(cfg.kubeconfig, cfg.context)
        self.workers: dict[str, PodWorker] = {}
        self.finished: set[str] = set()  # pods this agent has stopped and removed
        self.services: dict[str, Obj] = {}
        self.capacity = node_status.capacity(cfg.max_pods)
        self.volumes = VolumeManager(self.api, self.capacity, cfg.state_dir / "made-paths.json")
        self.prober = Prober()
        self.statuses = StatusManager()
        self.node = NodeStatus(cfg, self.api, self.capacity)
        self.server = NodeServer(self, cfg.port, cfg.tls_cert, cfg.tls_key, cfg.client_ca)
        self._tasks: list[asyncio.Task[Any]] = []
        self._hosts_dirty = asyncio.Event()
        self._forwarders: list[asyncio.AbstractServer] = []

    # -------------------------------------------------------------- Containers (server.py)

    def _find(self, namespace: str, pod: str, container: str | None) -> Container:
        worker = next((w for w in self.workers.values() if w.namespace == namespace and w.name == pod), None)
        if worker is None:
            raise ContainerNotFound(f"pod {namespace}/{pod} is not running on node {self.cfg.name}")
        if container is None:
            if len(worker.containers) != 1:
                names = ", ".join(c.name for c in worker.containers)
                raise ContainerNotFound(f"pod {namespace}/{pod} has several containers: choose one of {names}")
            return worker.containers[0]
        for c in [*worker.containers, *worker.init_containers]:
            if c.name == container:
                return c
        raise ContainerNotFound(f"container {container} is not valid for pod {pod}")

    def log_path(self, namespace: str, pod: str, container: str | None, previous: bool) -> Path:
        c = self._find(namespace, pod, container)
        path = c.worker.dir / f"{c.name}.previous.log" if previous else c.log_path
        if not path.exists():
            what = "previous terminated container" if previous else "container"
            raise ContainerNotFound(f'{what} "{c.name}" in pod "{pod}" has no logs yet')
        return path

    def exec_argv(self, namespace: str, pod: str, container: str | None, command: list[str]) -> list[str]:
        return self._find(namespace, pod, container).enter_argv(command)

    # -------------------------------------------------------------- pods

    async def final_delete(self, namespace: str, name: str, uid: str) -> None:
        """The kubelet's last word on a pod: DELETE with grace 0 for exactly this uid. Without it
        the pod stays Terminating, so it is retried until the API server answers (404 or 409:
        already gone or replaced)."""
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0, "preconditions": {"uid": uid}}
        for attempt in range(120):
            try:
                await self.api.request("DELETE", f"/api/v1/namespaces/{namespace}/pods/{name}", body)
                return
            except APIError as exc:
                if exc.status in (404, 409):
                    return
                if attempt == 0:
                    log.warning("[%s/%s] final delete: %s; retrying", namespace, name, exc)
            await asyncio.sleep(1)
        log.error("[%s/%s] final delete failed for 2 minutes; the pod stays Terminating", namespace, name)

    def services_snapshot(self) -> list[Obj]:
        """The Services now, for another thread: the services loop owns ``services``; ``list()`` of a
        dict's values copies it without letting another Python thread in between."""
        return list(self.services.values())

    def services_of(self, namespace: str) -> list[Obj]:
        return [s for s in self.services_snapshot()
                if s["metadata"].get("namespace") == namespace
                or (s["metadata"]["name"] == "kubernetes" and s["metadata"].get("namespace") == "default")]

    # -------------------------------------------------------------- IPs

    def allocate_ip(self) -> str:
        net = ipaddress.ip_network(self.cfg.pod_cidr)
        used = {w.record.ip for w in self.workers.values() if not w.host_network}
        for host in list(net.hosts())[1:]:
            if str(host) not in used:
                return str(host)
        raise NetnsError(f"no free address left in {self.cfg.pod_cidr}")

    def release(self, worker: PodWorker) -> None:
        if self.workers.get(worker.uid) is worker:
            del self.workers[worker.uid]

    # -------------------------------------------------------------- pods

    async def _pods_loop(self) -> None:
        path = "/api/v1/pods"
        query = f"fieldSelector=spec.nodeName%3D{self.cfg.name}"
        async for kind, obj in self.api.watch(path, query):
            try:
                if kind == "SYNC":
                    seen = {pod["metadata"]["uid"] for pod in obj.get("items", [])}
                    for uid in [uid for uid in self.workers if uid not in seen]:
                        self._forget(uid)
                    # Before any new pod starts: an orphan's address and cgroup must be free again.
                    await asyncio.to_thread(self._remove_orphans, seen)
                    for pod in obj.get("items", []):
                        await self._pod_event(pod)
                elif kind in ("ADDED", "MODIFIED"):
                    await self._pod_event(obj)
                elif kind == "DELETED":
                    self._forget(obj["metadata"]["uid"])
            except Exception:  # one pod's trouble must not stop the node
                log.exception("pod event %s %s", kind, obj.get("metadata", {}).get("name", ""))

    def _forget(self, uid: str) -> None:
        """The pod object is gone (force-deleted): stop its containers now, no final DELETE."""
        w = self.workers.get(uid)
        if w is not None:
            w.gone = True
            w.deleting.set()

    async def _pod_event(self, pod: Obj) -> None:
        uid = pod["metadata"]["uid"]
        if uid in self.finished:
            return
        w = self.workers.get(uid)
        if w is not None:
            w.update(pod)
            return
        phase = pod.get("status", {}).get("phase")
        record_path = self.cfg.state_dir / "pods" / uid / "record.json"
        record = PodRecord.load(record_path) if record_path.exists() else None
        if phase in ("Succeeded", "Failed") and record is None:
            if pod["metadata"].get("deletionTimestamp"):
                self.finished.add(uid)
                await self.final_delete(pod["metadata"]["namespace"], pod["metadata"]["name"], uid)
            return
        await self.volumes.prefetch(pod)
        w = PodWorker(self, pod, record)
        self.workers[uid] = w
        w.update(pod)
        w.task = asyncio.create_task(w.run(), name=f"pod {w.key}")
        self.statuses.track(w)

    def _remove_orphans(self, live: set[str]) -> None:
        """Sandboxes left by an earlier run whose pod no longer exists: remove them."""
        pods_dir = self.cfg.state_dir / "pods"
        if not pods_dir.exists():
            return
        for d in pods_dir.iterdir():
            if d.name in live or d.name in self.workers or not (d / "record.json").exists():
                continue
            try:
                record = PodRecord.load(d / "record.json")
            except (OSError, ValueError, TypeError) as exc:
                log.error("unreadable pod record %s: %s; removing it", d, exc)
                shutil.rmtree(d, ignore_errors=True)
                continue
            log.info("[%s/%s] removing the sandbox of a pod that is gone", record.namespace, record.name)
            remove_sandbox(self.cfg.cgroup / f"pod-{record.uid}", record, self.cfg.netns)
            shutil.rmtree(d, ignore_errors=True)

    # -------------------------------------------------------------- services (hosts files)

    async def _services_loop(self) -> None:
        async for kind, obj in self.api.watch("/api/v1/services"):
            if kind == "SYNC":
                self.services = {f"{s['metadata']['namespace']}/{s['metadata']['name']}": s for s in obj["items"]}
            elif kind == "DELETED":
                self.services.pop(f"{obj['metadata']['namespace']}/{obj['metadata']['name']}", None)
            else:
                self.services[f"{obj['metadata']['namespace']}/{obj['metadata']['name']}"] = obj
            self._hosts_dirty.set()

    async def _hosts_loop(self) -> None:
        while True:
            await self._hosts_dirty.wait()
            await asyncio.sleep(0.1)
            self._hosts_dirty.clear()
            for w in list(self.workers.values()):
                if w.sandbox_ready:
                    with contextlib.suppress(OSError):
                        w.write_hosts()

    # -------------------------------------------------------------- main

    async def run(self) -> None:
        self.cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self.cfg.cgroup.mkdir(parents=True, exist_ok=True)
        self._forwarders = await start_api_forwarder(self.cfg.netns, self.cfg.api_port)
        await self.server.start()
        while True:
            try:
                await self.node.register()
                break
            except (APIError, OSError) as exc:
                log.warning("registering node %s: %s; retrying", self.cfg.name, exc)
                await asyncio.sleep(1)
        for name, coro in (("lease", self.node.lease_loop()), ("services", self._services_loop()),
                           ("hosts", self._hosts_loop()), ("pods", self._pods_loop()),
                           ("volumes", self.volumes.refresh_loop(self.workers.values)),
                           ("status", self.statuses.run())):
            self._tasks.append(asyncio.create_task(coro, name=name))
        log.info("node %s ready: pods %s, agent https://127.0.0.1:%d, API forwarded in %s",
                 self.cfg.name, self.cfg.pod_cidr, self.cfg.port, self.cfg.netns)
        done, _ = await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            log.error("task %s ended: %s", t.get_name(), t.exception())
        raise SystemExit(1)  # the lab restarts us

    async def close(self) -> None:
        """Stop serving; pods keep running (a restarted agent adopts them)."""
        for t in self._tasks:
            t.cancel()
        for w in self.workers.values():
            if w.task:
                w.task.cancel()
        await self.server.stop()
        for forwarder in self._forwarders:
            forwarder.close()
        await self.api.close()


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="clustermesh lab node-agent", description=__doc__.split("\n")[0])
    p.add_argument("--kubeconfig", required=True)
    p.add_argument("--context")
    p.add_argument("--node", required=True)
    p.add_argument("--netns", required=True)
    p.add_argument("--address", required=True)
    p.add_argument("--pod-cidr", required=True)
    p.add_argument("--cgroup", required=True)
    p.add_argument("--state-dir", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--tls-cert", required=True)
    p.add_argument("--tls-key", required=True)
    p.add_argument("--client-ca", required=True)
    p.add_argument("--api-port", type=int, required=True)
    p.add_argument("--pod-prefix", required=True)
    p.add_argument("--drain-delay", type=float, default=1.0)
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    cfg = NodeConfig(name=a.node, kubeconfig=a.kubeconfig, context=a.context, netns=a.netns, address=a.address,
                     pod_cidr=a.pod_cidr, cgroup=Path(a.cgroup), state_dir=Path(a.state_dir), port=a.port,
                     tls_cert=Path(a.tls_cert), tls_key=Path(a.tls_key), client_ca=Path(a.client_ca),
                     api_port=a.api_port, pod_prefix=a.pod_prefix, drain_delay=a.drain_delay)
    agent = NodeAgent(cfg)

    async def amain() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        runner = asyncio.create_task(agent.run())
        await asyncio.wait({runner, asyncio.ensure_future(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
        runner.cancel()
        await agent.close()

    asyncio.run(amain())
    return 0


if __name__ == "__main__":
    sys.exit(main())
