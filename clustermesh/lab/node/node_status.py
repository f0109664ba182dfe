"""Node status and lease of the lab's kubelet: the Node object (labels, podCIDR, addresses, capacity,
conditions, daemon endpoint) registered once, its status posted every 30 s, and its Lease in
``kube-node-lease`` renewed every 10 s."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import platform
import time
from pathlib import Path

from clustermesh.lab.node.api import APIError, NodeAPI
from clustermesh.lab.node.records import NodeConfig, Obj, micro_now, now

log = logging.getLogger("clustermesh.lab.node")
LEASE_SECONDS = 40
RENEW_SECONDS = 10


def capacity(max_pods: int) -> dict[str, str]:
    return {"cpu": str(os.cpu_count() or 2), "memory": f"{_mem_kib()}Ki", "pods": str(max_pods),
            "ephemeral-storage": "10Gi"}


class NodeStatus:
    def __init__(self, cfg: NodeConfig, api: NodeAPI, capacity: dict[str, str]) -> None:
        self.cfg = cfg
        self.api = api
        self.capacity = capacity
        self.started = now()

    def node_object(self) -> Obj:
        labels = {"kubernetes.io/hostname": self.cfg.name, "kubernetes.io/os": "linux",
                  "kubernetes.io/arch": _arch(),
                  "beta.kubernetes.io/os": "linux", **self.cfg.labels}
        return {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": self.cfg.name, "labels": labels},
                "spec": {"podCIDR": self.cfg.pod_cidr, "podCIDRs": [self.cfg.pod_cidr]}}

    def status(self, ready: bool = True) -> Obj:
        t = now()

        def cond(kind: str, status: str, reason: str, message: str) -> Obj:
            return {"type": kind, "status": status, "reason": reason, "message": message,
                    "lastHeartbeatTime": t, "lastTransitionTime": self.started}

        return {
            "addresses": [{"type": "InternalIP", "address": self.cfg.address},
                          {"type": "Hostname", "address": self.cfg.name},
                          # The API server reaches this agent here (--kubelet-preferred-address-types).
                          {"type": "InternalDNS", "address": "127.0.0.1"}],
            "capacity": self.capacity, "allocatable": self.capacity,
            "conditions": [
                cond("MemoryPressure", "False", "KubeletHasSufficientMemory",
                     "kubelet has sufficient memory available"),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
                cond("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
                cond("Ready", "True" if ready else "False", "KubeletReady",
                     "clustermesh lab node agent is posting ready status"),
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.cfg.port}},
            "nodeInfo": {"machineID": _machine_id(), "systemUUID": self.cfg.name, "bootID": _boot_id(),
                         "kernelVersion": platform.release(), "osImage": "clustermesh lab (Debian host)",
                         "containerRuntimeVersion": "clustermesh-lab://0.1", "kubeletVersion": "v1.20.2",
                         "kubeProxyVersion": "v1.20.2", "operatingSystem": "linux",
                         "architecture": _arch()},
        }

    async def register(self) -> None:
        try:
            await self.api.request("POST", "/api/v1/nodes", self.node_object())
            log.info("registered node %s", self.cfg.name)
        except APIError as exc:
            if exc.status != 409:
                raise
            await self.api.patch(f"/api/v1/nodes/{self.cfg.name}",
                                 {"metadata": {"labels": self.node_object()["metadata"]["labels"]}})
        await self.api.patch(f"/api/v1/nodes/{self.cfg.name}/status", {"status": self.status()})

    async def lease_loop(self) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.cfg.name}"
        last_status = 0.0
        while True:
            try:
                body = {"spec": {"holderIdentity": self.cfg.name, "leaseDurationSeconds": LEASE_SECONDS,
                                 "renewTime": micro_now()}}
                try:
                    await self.api.patch(path, body, "merge")
                except APIError as exc:
                    if exc.status != 404:
                        raise
                    node = await self.api.get(f"/api/v1/nodes/{self.cfg.name}")
                    await self.api.request("POST", "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", {
                        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                        "metadata": {"name": self.cfg.name, "ownerReferences": [{
                            "apiVersion": "v1", "kind": "Node", "name": self.cfg.name,
                            "uid": node["metadata"]["uid"]}]},
                        **body})
                if time.monotonic() - last_status > 30:
                    await self.api.patch(f"/api/v1/nodes/{self.cfg.name}/status", {"status": self.status()})
                    last_status = time.monotonic()
            except (APIError, OSError) as exc:
                log.warning("lease: %s", exc)
                last_status = 0.0
            await asyncio.sleep(RENEW_SECONDS)


def _arch() -> str:
    """GOARCH names, as a kubelet reports them."""
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


def _mem_kib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1])
    return 4 * 1024 * 1024


def _machine_id() -> str:
    with contextlib.suppress(OSError):
        return Path("/etc/machine-id").read_text().strip()
    return "lab"


def _boot_id() -> str:
    with contextlib.suppress(OSError):
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return "lab"

