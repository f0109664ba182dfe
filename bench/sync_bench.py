#!/usr/bin/env python3
"""Agent sync benchmark: how fast a change reaches a node's socket-LB maps, by cluster size.

For each size N (--services), on this machine: a real kube-apiserver for the local cluster with N
global Services (one local endpoint each), three remote clusters' stores (one etcd, a grpc-proxy per
cluster, the records written as their operators write them) with the same N Services (one backend
each), and the agent (in this process, with the real socket-LB on a cgroup of its own). Prints:

- cold start: agent start -> every Service programmed with all its backends;
- remote change -> map: a remote record gains or loses a backend (the etcd put returning) until the
  agent's map write for it has returned, p50/p99 over --samples changes;
- local change -> map: an EndpointSlice gains or loses an endpoint (the PATCH returning) until the
  map write has returned;
- agent CPU time per change (this process, so it includes the bench's own put/PATCH) and the
  agent's resident memory (this process's RSS growth from before the agent started; a standalone
  agent process adds its interpreter and libraries, about 70 MB, to that).

Needs root (BPF, cgroup v2). usage: .venv/bin/python bench/sync_bench.py [--services 100,1000,10000]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from clustermesh import schema  # noqa: E402
from clustermesh.agent.agent import Agent, AgentConfig  # noqa: E402
from clustermesh.datapath import hooks  # noqa: E402
from clustermesh.datapath.model import Backend, ServiceSpec  # noqa: E402
from clustermesh.kube import KubeClient  # noqa: E402
from clustermesh.kvstore import KVClient  # noqa: E402
from clustermesh.lab.mesh import cgroup2_root  # noqa: E402
from clustermesh.lab.netns import remove_cgroup  # noqa: E402
from clustermesh.lab.servers import ControlPlane, EtcdGrpcProxy, EtcdServer  # noqa: E402
from clustermesh.schema import ClusterConfig, ClusterService, PortConfig  # noqa: E402
from tests.kubeapi import KubeAPI  # noqa: E402

NS = "bench"
LOCAL = ("bench-1", 1)
REMOTES = [("bench-2", 2), ("bench-3", 3), ("bench-4", 4)]
HTTP = {"http": PortConfig("TCP", 8080)}


def say(text: str) -> None:
    print(f"[bench] {text}", flush=True)


def remote_ip(cid: int, i: int, extra: int = 0) -> str:
    return f"10.{100 + 10 * extra + cid}.{i // 250}.{i % 250 + 1}"


def local_ip(i: int, extra: int = 0) -> str:
    return f"10.{200 + extra}.{i // 250}.{i % 250 + 1}"


class TimedLB:
    """The socket-LB, noting when each map write returned and what it wrote (by frontend IP).

    It passes the agent's hint through, so the agent takes the path it takes in production
    (a change looks only at the frontends it moved), and it keeps no more per write than that.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.cond = threading.Condition()
        self.state: dict[str, ServiceSpec] = {}  # what the maps hold, as the writes said
        self.writes: list[tuple[float, dict[str, ServiceSpec | None]]] = []

    def load(self) -> Any:
        return self.inner.load()

    def read(self) -> Any:
        return self.inner.read()

    def close(self) -> None:
        self.inner.close()

    def program(self, specs: Any, changed_hint: Any = None) -> Any:
        ops = self.inner.program(specs, changed_hint)
        done = time.perf_counter()
        if changed_hint is None:
            wrote: dict[str, ServiceSpec | None] = {
                str(s.frontend.ip): s for s in (specs.values() if isinstance(specs, Mapping) else specs)}
        else:
            wrote = {str(f.ip): specs.get(f) for f in changed_hint}
        with self.cond:
            if changed_hint is None:
                self.state = {}
            for ip, spec in wrote.items():
                if spec is None:
                    self.state.pop(ip, None)
                else:
                    self.state[ip] = spec
            self.writes.append((done, wrote))
            del self.writes[:-64]
            self.cond.notify_all()
        return ops

    def wait_for(self, since: float, ip: str, check: Callable[[ServiceSpec | None], bool],
                 timeout: float = 60) -> float:
        """When the first map write after ``since`` that wrote the frontend ``ip`` passing ``check``
        returned."""
        deadline = time.perf_counter() + timeout
        seen = 0.0
        with self.cond:
            while True:
                for done, wrote in self.writes:
                    if done > max(since, seen):
                        seen = done
                        if ip in wrote and check(wrote[ip]):
                            return done
                left = deadline - time.perf_counter()
                if left <= 0:
                    raise TimeoutError("the change did not reach the maps")
                self.cond.wait(left)

    def wait_state(self, check: Callable[[dict[str, ServiceSpec]], bool], timeout: float) -> float:
        """When the write after which the maps pass ``check`` returned (at the latest write seen)."""
        deadline = time.perf_counter() + timeout
        with self.cond:
            while not (self.writes and check(self.state)):
                left = deadline - time.perf_counter()
                if left <= 0:
                    raise TimeoutError("the maps never held the whole state")
                self.cond.wait(left)
            return self.writes[-1][0]


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def has(spec: ServiceSpec | None, backend: Backend) -> bool:
    return spec is not None and backend in spec.backends


def run_size(n: int, samples: int, work: Path) -> dict[str, float]:
    cp = ControlPlane(work / "cp", name="bench-1", controller_manager=False)
    etcd = EtcdServer(work / "store", name="remote-stores")
    proxies: list[EtcdGrpcProxy] = []
    tag = uuid.uuid4().hex[:6]
    cgroup = cgroup2_root() / f"clustermesh-bench-{tag}"
    pin_dir = Path(f"/sys/fs/bpf/clustermesh/bench-{tag}")
    agent: Agent | None = None
    thread: threading.Thread | None = None
    try:
        cp.start()
        etcd.start()
        kubectl = ["kubectl", "--kubeconfig", str(cp.kubeconfig)]
        subprocess.run([*kubectl, "apply", "-f", str(REPO / "crds")], check=True, capture_output=True)
        subprocess.run([*kubectl, "wait", "--for=condition=Established", "crd/clustermeshes.clustermesh.io"],
                       check=True, capture_output=True)
        api = KubeAPI.for_control_plane(cp)
        api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
        say(f"N={n}: {n} global Services with one local endpoint each")
        cluster_ips: list[str] = []
        for i in range(n):
            svc = api.create({"apiVersion": "v1", "kind": "Service", "metadata": {
                "name": f"svc-{i}", "namespace": NS, "annotations": {"service.cilium.io/global": "true"}},
                "spec": {"ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}})
            cluster_ips.append(svc["spec"]["clusterIP"])
            api.create({"kind": "EndpointSlice", "metadata": {
                "name": f"svc-{i}-1", "namespace": NS, "labels": {"kubernetes.io/service-name": f"svc-{i}"}},
                "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                "endpoints": [{"addresses": [local_ip(i)], "conditions": {"ready": True}}]})
            if (i + 1) % 1000 == 0:
                say(f"  {i + 1}/{n}")
        say(f"N={n}: 3 remote stores with the same {n} Services, behind a grpc-proxy each")
        kv = KVClient(etcd.url)
        for name, cid in REMOTES:
            prefix = f"{name}/"
            puts = {prefix + schema.cluster_config_key(name): ClusterConfig(cid).encode()}
            for i in range(n):
                rec = ClusterService(name, NS, f"svc-{i}", cid, frontends={"10.97.0.1": HTTP},
                                     backends={remote_ip(cid, i): HTTP})
                puts[prefix + rec.key] = rec.encode()
            for marker in (schema.SERVICES_PREFIX, schema.NODES_PREFIX):
                puts[prefix + schema.synced_key(name, marker)] = schema.rfc3339_now()
            kv.apply(puts, [])
            proxies.append(EtcdGrpcProxy(work / f"proxy-{name}", etcd.url, namespace=prefix).start())
        mesh = {"apiVersion": "clustermesh.io/v1alpha1", "kind": "ClusterMesh", "metadata": {"name": "default"},
                "spec": {"localCluster": {"name": LOCAL[0], "id": LOCAL[1]},
                         "clusters": [{"name": name, "id": cid, "endpoints": [p.url]}
                                      for (name, cid), p in zip(REMOTES, proxies, strict=True)]}}
        subprocess.run([*kubectl, "apply", "-f", "-"], input=json.dumps(mesh).encode(), check=True,
                       capture_output=True)

        cgroup.mkdir()
        lbs: list[TimedLB] = []

        def factory(local_id: int) -> TimedLB:
            from clustermesh.datapath import SocketLB

            # As the agent runs it: compiled by a child process (clang's memory is not the agent's).
            lbs.append(TimedLB(SocketLB(str(cgroup), str(pin_dir), local_id, compile_in_child=True)))
            return lbs[-1]

        base_rss = rss_kib()
        t0 = time.perf_counter()
        agent = Agent(AgentConfig(node=f"bench-{tag}", cgroup=str(cgroup), pin_dir=str(pin_dir)),
                      KubeClient(str(cp.kubeconfig)), factory)
        agent.start()
        thread = threading.Thread(target=agent.run, name="agent", daemon=True)
        thread.start()
        lb = lbs[0]
        every = set(cluster_ips)
        programmed = lb.wait_state(lambda state: state.keys() == every
                                   and all(len(s.backends) == 4 for s in state.values()), timeout=600)
        cold = programmed - t0
        rss = (rss_kib() - base_rss) / 1024
        say(f"N={n}: programmed {n} Services x 4 backends {cold:.2f}s after the agent started; RSS grew "
            f"{rss:.0f} MB from {base_rss / 1024:.0f} MB (this process: Python, its libraries, the bench's clients)")

        rng = random.Random(n)
        remote_lat: list[float] = []
        local_lat: list[float] = []
        cpu0 = cpu_seconds()
        name, cid = REMOTES[0]
        i = 0
        for k in range(samples):
            add = k % 2 == 0  # add a backend to a random Service, then remove it again
            if add:
                i = rng.randrange(n)
            extra = Backend(remote_ip(cid, i, 1), 8080, cid)
            backends = {remote_ip(cid, i): HTTP} | ({remote_ip(cid, i, 1): HTTP} if add else {})
            rec = ClusterService(name, NS, f"svc-{i}", cid, frontends={"10.97.0.1": HTTP}, backends=backends)
            before = time.perf_counter()
            kv.put(f"{name}/" + rec.key, rec.encode())
            start = time.perf_counter()  # the put returned: the agent may be done already
            done = lb.wait_for(before, cluster_ips[i], lambda spec, add=add, extra=extra: has(spec, extra) == add)
            remote_lat.append(max(0.0, done - start))
        for k in range(samples):
            add = k % 2 == 0
            if add:
                i = rng.randrange(n)
            extra = Backend(local_ip(i, 1), 8080, LOCAL[1])
            endpoints = [{"addresses": [local_ip(i)], "conditions": {"ready": True}}]
            if add:
                endpoints.append({"addresses": [local_ip(i, 1)], "conditions": {"ready": True}})
            before = time.perf_counter()
            api.patch("EndpointSlice", NS, f"svc-{i}-1", {"endpoints": endpoints})
            start = time.perf_counter()
            done = lb.wait_for(before, cluster_ips[i], lambda spec, add=add, extra=extra: has(spec, extra) == add)
            local_lat.append(max(0.0, done - start))
        cpu = (cpu_seconds() - cpu0) / (2 * samples)
        return {"n": n, "cold": cold, "rss": rss, "cpu_ms": cpu * 1000,
                "remote_p50": pct(remote_lat, 0.5) * 1000, "remote_p99": pct(remote_lat, 0.99) * 1000,
                "local_p50": pct(local_lat, 0.5) * 1000, "local_p99": pct(local_lat, 0.99) * 1000}
    finally:
        if agent is not None:
            agent.request_stop()
            if thread is not None:
                thread.join(30)
            agent.stop()
        if cgroup.exists():
            hooks.destroy(cgroup, pin_dir)
            remove_cgroup(cgroup)
        for proxy in proxies:
            proxy.stop()
        etcd.stop()
        cp.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--services", default="100,1000,10000", help="comma-separated sizes")
    parser.add_argument("--samples", type=int, default=100, help="changes of each kind per size")
    args = parser.parse_args()
    rows = []
    for n in (int(x) for x in args.services.split(",")):
        with tempfile.TemporaryDirectory(prefix="clustermesh-sync-bench-") as tmp:
            rows.append(run_size(n, args.samples, Path(tmp)))
    print()
    print("| global services (x 3 remotes) | remote change p50 / p99 | local change p50 / p99 | agent CPU per change "
          "| agent RSS | cold start to programmed |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['n']:,} | {r['remote_p50']:.1f} / {r['remote_p99']:.1f} ms | {r['local_p50']:.1f} / "
              f"{r['local_p99']:.1f} ms | {r['cpu_ms']:.1f} ms | {r['rss']:.0f} MB | {r['cold']:.2f} s |")
    print(f"({args.samples} changes of each kind per size; each change alternately adds and removes a backend)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
