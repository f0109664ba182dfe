#!/usr/bin/env python3
"""Hop benchmark: where the time goes between an EndpointSlice PATCH in lab-2 and lab-1's socket-LB map.

    .venv/bin/python bench/hop_bench.py [--services 100,2000,10000] [--samples 40] [--modes cache,direct]
                                        [--lab-dir DIR] [--keep] [--pause-kube-proxy]

Runs as root in the lab as deploy/ installs it (``clustermesh lab up``, 2 clusters x 2 nodes; its own unless
``--lab-dir`` names a running one). The components write their hop times (``clustermesh/trace.py``: wall
clock, one machine) once the bench sets ``CLUSTERMESH_TRACE`` on the store pods' operators and the agents
(a rollout); the store Deployments are scaled to one replica, so that each hop has one owner and the
figures follow one path. Services: N selector-less global Services in namespace ``hop`` of both clusters,
one endpoint each in its own cluster (sizes are cumulative: 100, then 1,900 more, ...).

Per change (sequential; one Service of lab-2 at a time): ``add`` PATCHes a second endpoint into the
Service's EndpointSlice in lab-2, ``remove`` takes it out right after the add reached the map. The hops,
each from the first time the previous one happened for that Service:

    api       PATCH sent -> lab-2's operator got the EndpointSlice event (API server, watch, kopf)
    export    -> lab-2's operator sent the etcd transaction with the record (export, writer)
    remote    (cache) -> lab-1's cache got lab-2's record (etcd commit, watch, grpc-proxy, NodePort)
    cache     (cache) -> lab-1's cache sent the transaction with its copy
    watch     -> lab-1's first node's agent got the record (etcd commit and watch, from its own store with
              the cache, else from lab-2's through its grpc-proxy)
    map       -> the agent's datapath step with the Service returned (merge, plan, map writes)
    total     PATCH sent -> map

Prints p50 / p99 per hop (ms) for each size, mode and change; progress on stderr. ``--modes`` switches
lab-1 between the cache (ClusterMesh ``spec.cache.enabled``) and direct mode (the agents read lab-2's
store; the deploy/direct RBAC is applied) on the running lab. Nothing connects to a lab address from the
host: the bench talks to the API servers (127.0.0.1) and reads the trace files.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from failover_bench import BenchError, Kube, Lab, say  # noqa: E402

from clustermesh import trace  # noqa: E402
from clustermesh.kube import KubeClient  # noqa: E402
from clustermesh.lab.mesh import STORE_NODE_PORT  # noqa: E402

NS = "hop"
SYSTEM = "clustermesh-system"
CLIENT, SERVER = "lab-1", "lab-2"
GLOBAL = {"service.cilium.io/global": "true"}
STORE_PORT = 2379  # the store pods' grpc-proxy (deploy/base/store.yaml)
HOPS = {
    "direct": [("api", SERVER, "operator", "k8s-event"), ("export", SERVER, "operator", "etcd-write"),
               ("watch", CLIENT, "agent", "watch-event"), ("map", CLIENT, "agent", "map-write")],
    "cache": [("api", SERVER, "operator", "k8s-event"), ("export", SERVER, "operator", "etcd-write"),
              ("remote", CLIENT, "operator", "watch-event"), ("cache", CLIENT, "operator", "cache-write"),
              ("watch", CLIENT, "agent", "watch-event"), ("map", CLIENT, "agent", "map-write")],
}


def ip(cluster: int, i: int, extra: bool = False) -> str:
    """Endpoint addresses inside each cluster's pod range (10.244/16, 10.245/16); nothing connects to them."""
    return f"10.{243 + cluster}.{(100 if extra else 0) + i // 250}.{i % 250 + 1}"


class Api:
    """Raw REST on one lab API server (EndpointSlices are v1beta1 on the lab's 1.20)."""

    def __init__(self, kubeconfig: Path, context: str) -> None:
        self.kube = KubeClient(str(kubeconfig), context)
        self.slices = f"/apis/discovery.k8s.io/{self.kube.endpointslice_version()}"

    def call(self, method: str, path: str, body: dict[str, Any] | None = None,
             content_type: str = "application/json") -> int:
        headers = {**self.kube._headers(), "Content-Type": content_type}
        resp = self.kube.api.rest_client.request(method, self.kube.configuration.host + path, headers=headers,
                                                 body=body, _request_timeout=60)
        if resp.status >= 300 and resp.status != 409:
            raise BenchError(f"{method} {path}: {resp.status} {resp.data[:300]!r}")
        return int(resp.status)

    def create(self, cluster: int, i: int) -> None:
        name = f"svc-{i}"
        self.call("POST", f"/api/v1/namespaces/{NS}/services", {
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "annotations": GLOBAL},
            "spec": {"ports": [{"name": "http", "port": 80}]}})
        self.call("POST", f"{self.slices}/namespaces/{NS}/endpointslices", self.slice(cluster, i, False))

    def slice(self, cluster: int, i: int, extra: bool) -> dict[str, Any]:
        addresses = [ip(cluster, i)] + ([ip(cluster, i, extra=True)] if extra else [])
        return {"apiVersion": self.slices.removeprefix("/apis/"), "kind": "EndpointSlice",
                "metadata": {"name": f"svc-{i}-1", "labels": {"kubernetes.io/service-name": f"svc-{i}"}},
                "addressType": "IPv4", "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
                "endpoints": [{"addresses": [a], "conditions": {"ready": True}} for a in addresses]}

    def set_extra(self, cluster: int, i: int, extra: bool) -> None:
        body = {"endpoints": self.slice(cluster, i, extra)["endpoints"]}
        self.call("PATCH", f"{self.slices}/namespaces/{NS}/endpointslices/svc-{i}-1", body,
                  "application/merge-patch+json")


@dataclass
class Traces:
    """Every trace line so far, read incrementally from ``<dir>/<cluster>/*.trace``."""

    root: Path
    offsets: dict[Path, int] = field(default_factory=dict)
    # (cluster, role, hop, ref) -> times
    seen: dict[tuple[str, str, str, str], list[float]] = field(default_factory=lambda: defaultdict(list))
    agent_file: str = ""  # the file prefix of the one agent timed (lab-1's first node)

    def read(self) -> None:
        for path in self.root.glob("*/*.trace"):
            cluster, name = path.parent.name, path.name
            role = "agent" if name.startswith(self.agent_file) else "other-agent" if name.startswith("agent-") \
                else "operator"
            with path.open("rb") as f:
                f.seek(self.offsets.get(path, 0))
                data = f.read()
            end = data.rfind(b"\n") + 1
            self.offsets[path] = self.offsets.get(path, 0) + end
            for line in data[:end].decode().splitlines():
                stamp, hop, ref = line.split(" ", 2)
                self.seen[(cluster, role, hop, ref)].append(float(stamp))

    def first_after(self, cluster: str, role: str, hop: str, ref: str, t: float) -> float | None:
        return min((x for x in self.seen.get((cluster, role, hop, ref), ()) if x >= t), default=None)


def pause_kube_proxies(lab: Lab, sig: int) -> int:
    """SIGSTOP (or SIGCONT) every kube-proxy of the lab; how many. kube-proxy is on no hop timed here,
    but at 10,000 Services per cluster its iptables resyncs (4 of them, 20,000 Services each) take both
    cores of this machine and starve everything that is timed."""
    out = subprocess.run(["pgrep", "-f", f"kube-proxy .*{lab.directory}"], capture_output=True, text=True).stdout
    pids = [int(x) for x in out.split()]
    for pid in pids:
        os.kill(pid, sig)
    return len(pids)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


class Bench:
    def __init__(self, lab: Lab, trace_dir: Path) -> None:
        self.lab = lab
        self.kube = Kube(lab.kubeconfig)
        self.api = {c: Api(lab.kubeconfig, c) for c in (CLIENT, SERVER)}
        self.trace_dir = trace_dir
        self.count = 0
        self.extra: dict[int, bool] = {}  # lab-2's Services with a second endpoint now
        node = sorted(n["metadata"]["name"] for n in self.kube.json(CLIENT, "get", "nodes")["items"])[0]
        self.node = node
        self.traces = Traces(trace_dir, agent_file=f"agent-{node}-")

    def prepare(self) -> None:
        """Trace on (a rollout), one store replica per cluster, the bench's namespace."""
        for ctx in (CLIENT, SERVER):
            folder = self.trace_dir / ctx
            folder.mkdir(parents=True, exist_ok=True)
            # The store pods' operator runs as a non-root user.
            for d in (self.trace_dir.parent, self.trace_dir):
                d.chmod(0o755)
            folder.chmod(0o1777)
            setting = f"{trace.ENV}={folder}"
            say(f"{ctx}: tracing into {folder}; one store replica")
            self.kube.run(ctx, "-n", SYSTEM, "scale", "deployment/clustermesh-store", "--replicas=1")
            self.kube.run(ctx, "-n", SYSTEM, "set", "env", "deployment/clustermesh-store", "-c", "operator", setting)
            self.kube.run(ctx, "-n", SYSTEM, "set", "env", "daemonset/clustermesh-agent", "-c", "agent", setting)
            self.kube.run(ctx, "create", "namespace", NS, check=False)
        for ctx in (CLIENT, SERVER):
            for what in ("deployment/clustermesh-store", "daemonset/clustermesh-agent"):
                self.kube.run(ctx, "-n", SYSTEM, "rollout", "status", what, "--timeout=300s", timeout=320)

    def wait_for_kube_proxy(self, timeout: float = 600) -> None:
        """Until every node's kube-proxy sends the store Service to the store pods running now: the
        rollout replaced them, and a kube-proxy paused before it synced (at 10,000 Services a sync
        takes it many seconds) would keep the NodePort on the old pods."""
        deadline = time.monotonic() + timeout
        nodes = self.lab.state()["nodes"]
        for ctx in (CLIENT, SERVER):
            pods = self.kube.json(ctx, "get", "pods", "-n", SYSTEM, "-l", "app.kubernetes.io/name=clustermesh-store")
            ips = [p["status"].get("podIP") for p in pods["items"] if p["metadata"].get("deletionTimestamp") is None]
            for name, node in nodes.items():
                if node["cluster"] != ctx:
                    continue
                while True:
                    rules = subprocess.run(["ip", "netns", "exec", node["netns"], "iptables-save", "-t", "nat"],
                                           capture_output=True, text=True, timeout=60).stdout
                    # The store Service's endpoint rule (another Service's stale rule may name a
                    # reused pod IP on another port).
                    if all(ip and f"--to-destination {ip}:{STORE_PORT}" in rules for ip in ips):
                        break
                    if time.monotonic() > deadline:
                        raise BenchError(f"{name}'s kube-proxy does not know {ctx}'s store pods {ips}")
                    time.sleep(1)
        say("every kube-proxy knows the store pods")

    def mode(self, mode: str) -> None:
        say(f"{CLIENT}: {mode} mode")
        if mode == "direct":
            self.kube.run(CLIENT, "apply", "-f", str(REPO / "deploy" / "direct" / "agent-remotes-rbac.yaml"))
        patch = {"spec": {"cache": {"enabled": mode == "cache"}}}
        self.kube.run(CLIENT, "patch", "clustermesh", "default", "--type=merge", "-p", json.dumps(patch))
        # The agents switch once their new connections are ready: settled when the timed agent's
        # connections go only where the mode says (its node's namespace, read from the host), and a
        # change made then reaches its map.
        deadline = time.monotonic() + 300
        while not self.reads_only(mode):
            if time.monotonic() > deadline:
                raise BenchError(f"{CLIENT}'s agent did not switch to {mode} mode in 300 s")
            time.sleep(0.5)
        self.change(self.count - 1, not self.extra.get(self.count - 1, False), mode, timeout=120)

    def reads_only(self, mode: str) -> bool:
        """The timed agent's etcd connections: to its own store's Service (2379) with the cache, to
        lab-2's NodePort (STORE_NODE_PORT) without."""
        netns = self.lab.state()["nodes"][self.node]["netns"]
        out = subprocess.run(["ip", "netns", "exec", netns, "ss", "-Htn", "state", "established"],
                             capture_output=True, text=True, timeout=30).stdout
        ports = {line.split()[-1].rsplit(":", 1)[-1] for line in out.splitlines() if line.strip()}
        local, remote = "2379" in ports, str(STORE_NODE_PORT) in ports
        return (local and not remote) if mode == "cache" else (remote and not local)

    def existing(self) -> int:
        """How many of the bench's Services a running lab (``--lab-dir``) has in both clusters already
        (svc-0 .. svc-N-1, each with its slice): a second run on it skips their creation."""
        counts = []
        for ctx in (CLIENT, SERVER):
            out = self.kube.json(ctx, "get", "endpointslices", "-n", NS)["items"]
            names = {s["metadata"]["name"] for s in out}
            n = 0
            while f"svc-{n}-1" in names:
                n += 1
            counts.append(n)
        n = min(counts)
        if n:
            # A mode switch toggles the last Service's second endpoint: start it from one endpoint.
            self.api[SERVER].set_extra(2, n - 1, False)
        return n

    def grow(self, total: int) -> None:
        if total <= self.count:
            return
        say(f"creating Services {self.count}..{total - 1} in both clusters")
        start = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            for cluster, ctx in ((1, CLIENT), (2, SERVER)):
                list(pool.map(lambda i, c=cluster, x=ctx: self.api[x].create(c, i), range(self.count, total)))
        self.count = total
        say(f"  created in {time.monotonic() - start:.0f} s; waiting for lab-1's agent to have them all")
        ref = f"{NS}/svc-{total - 1}"
        deadline = time.monotonic() + 900
        while True:
            self.traces.read()
            if self.traces.seen.get((CLIENT, "agent", "map-write", ref)):
                break
            if time.monotonic() > deadline:
                raise BenchError(f"{ref} never reached {self.node}'s maps")
            time.sleep(0.5)
        time.sleep(5)  # the tail of the export and of kube-proxy's sync

    def change(self, i: int, extra: bool, mode: str, timeout: float = 30) -> dict[str, float]:
        """PATCH, then wait until every hop of this change is traced; its hops (ms)."""
        t0 = time.time()
        self.api[SERVER].set_extra(2, i, extra)
        self.extra[i] = extra
        deadline = time.monotonic() + timeout
        while True:
            self.traces.read()
            got = self.hops(mode, i, t0)
            if got is not None:
                return got
            if time.monotonic() > deadline:
                raise BenchError(f"{NS}/svc-{i}: not every hop traced in {timeout:.0f} s; traces under "
                                 f"{self.trace_dir}")
            time.sleep(0.002)

    def hops(self, mode: str, i: int, t0: float) -> dict[str, float] | None:
        ref = f"{NS}/svc-{i}"
        out, last = {}, t0
        for name, cluster, role, hop in HOPS[mode]:
            t = self.traces.first_after(cluster, role, hop, ref, last)
            if t is None:
                return None
            out[name], last = (t - last) * 1000, t
        out["total"] = (last - t0) * 1000
        return out

    def sample(self, mode: str, samples: int) -> dict[str, list[dict[str, float]]]:
        got: dict[str, list[dict[str, float]]] = {"add": [], "remove": []}
        step = max(1, self.count // samples)
        for k in range(samples):
            i = (k * step) % self.count
            for change, extra in (("add", True), ("remove", False)):
                got[change].append(self.change(i, extra, mode))
        return got


def row(size: int, mode: str, change: str, samples: list[dict[str, float]]) -> str:
    names = [h[0] for h in HOPS["cache"]] + ["total"]
    cells = []
    for name in names:
        values = [s[name] for s in samples if name in s]
        cells.append(f"{pct(values, 0.5):.1f} / {pct(values, 0.99):.1f}" if values else "-")
    return f"| {size} | {mode} | {change} | {len(samples)} | " + " | ".join(cells) + " |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--services", default="100,2000,10000")
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--modes", default="cache,direct")
    parser.add_argument("--lab-dir", type=Path)
    parser.add_argument("--keep", action="store_true", help="leave the lab this bench started running")
    parser.add_argument("--pause-kube-proxy", action="store_true",
                        help="SIGSTOP the lab's kube-proxies for the run (on no timed hop; at 10,000 Services "
                             "their iptables resyncs starve this 2-core machine)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="clustermesh-hop-bench-", dir="/var/tmp"))
    modes = args.modes.split(",")
    # A lab of its own starts in the first mode: switching a running lab's agents works, but one
    # mode per lab keeps every figure free of the switch (run the bench once per mode).
    lab = (Lab(args.lab_dir, own=False) if args.lab_dir
           else Lab.start(root, args.keep, extra=("--direct",) if modes[0] == "direct" else ()))
    print("| Services | mode | change | samples | api | export | remote | cache | watch | map | total |")
    print("| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |", flush=True)
    # SIGTERM ends the run through the finally below (kube-proxies continued, an own lab taken down).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        bench = Bench(lab, root / "trace")
        bench.prepare()
        if not lab.own:
            bench.count = bench.existing()
            if bench.count:
                say(f"{bench.count} Services already in both clusters: not created again")
        if args.pause_kube_proxy:
            bench.wait_for_kube_proxy()
            # Only now: the rollout replaced the store pods, and a paused kube-proxy would keep
            # sending their Service to the old ones. From here on no pod of the mesh is replaced.
            say(f"kube-proxy paused ({pause_kube_proxies(lab, signal.SIGSTOP)} processes)")
        bench.grow(1)
        for size in (int(x) for x in args.services.split(",")):
            bench.grow(size)
            for mode in modes:
                bench.mode(mode)
                say(f"{size} Services, {mode}: {args.samples} adds and removes")
                got = bench.sample(mode, args.samples)
                for change in ("add", "remove"):
                    print(row(size, mode, change, got[change]), flush=True)
    finally:
        if args.pause_kube_proxy:
            pause_kube_proxies(lab, signal.SIGCONT)
        if lab.own and not args.keep:
            lab.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
