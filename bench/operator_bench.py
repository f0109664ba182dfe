#!/usr/bin/env python3
"""Operator benchmark: N global Services with M endpoints each, on a real
kube-apiserver and etcd (started here, on 127.0.0.1, and stopped at the end).

Prints:
- the time to create the objects (API server side, for scale);
- the time from operator start to the full export (every record written and
  the "synced" marker in);
- p50/p99 latency from an EndpointSlice change (the PATCH returning) to the
  operator's write of that Service's record in etcd, over --samples changes.

usage: .venv/bin/python bench/operator_bench.py [--services 1000] [--endpoints 10] [--samples 200]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from clustermesh import schema  # noqa: E402
from clustermesh.kvstore import KVClient  # noqa: E402
from clustermesh.lab.servers import ControlPlane, EtcdServer, free_port  # noqa: E402
from tests.kubeapi import KubeAPI  # noqa: E402

CLUSTER = "bench"
NS = "bench"


def endpoints(svc: int, m: int) -> list[dict]:
    return [{"addresses": [f"10.{200 + i}.{svc // 256}.{svc % 256}"], "conditions": {"ready": True}} for i in range(m)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("operator_args", nargs="*", help="extra operator flags (after --)")
    args = parser.parse_args()
    extra_args = args.operator_args
    n, m = args.services, args.endpoints

    work = Path(tempfile.mkdtemp(prefix="clustermesh-bench-"))
    print(f"[bench] control plane and store in {work}", flush=True)
    cp = ControlPlane(work / "cp", name=CLUSTER, controller_manager=False)
    store = EtcdServer(work / "store", name="store")
    operator: subprocess.Popen[bytes] | None = None
    try:
        cp.start()
        store.start()
        kubectl = ["kubectl", "--kubeconfig", str(cp.kubeconfig)]
        subprocess.run([*kubectl, "apply", "-f", str(REPO / "crds")], check=True, capture_output=True)
        subprocess.run(
            [*kubectl, "wait", "--for=condition=Established", "crd/clustermeshes.clustermesh.io"],
            check=True,
            capture_output=True,
        )
        api = KubeAPI.for_control_plane(cp)
        api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})

        print(f"[bench] creating {n} global services with {m} endpoints each", flush=True)
        t0 = time.perf_counter()
        for i in range(n):
            api.create(
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "metadata": {
                        "name": f"svc-{i}",
                        "namespace": NS,
                        "annotations": {"service.cilium.io/global": "true"},
                    },
                    "spec": {"ports": [{"name": "http", "port": 80, "protocol": "TCP"}]},
                }
            )
            api.create(
                {
                    "kind": "EndpointSlice",
                    "metadata": {
                        "name": f"svc-{i}-1",
                        "namespace": NS,
                        "labels": {"kubernetes.io/service-name": f"svc-{i}"},
                    },
                    "addressType": "IPv4",
                    "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                    "endpoints": endpoints(i, m),
                }
            )
            if (i + 1) % 250 == 0:
                print(f"        {i + 1}/{n}", flush=True)
        create_s = time.perf_counter() - t0

        kv = KVClient(store.url)
        log = (work / "operator.log").open("wb")
        t_start = time.perf_counter()
        operator = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "clustermesh.cli",
                "operator",
                "--kubeconfig",
                str(cp.kubeconfig),
                "--etcd",
                store.url,
                "--cluster-name",
                CLUSTER,
                "--cluster-id",
                "1",
                "--metrics-port",
                str(free_port()),
                *extra_args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        marker = schema.synced_key(CLUSTER, schema.SERVICES_PREFIX)
        prefix = schema.services_cluster_prefix(CLUSTER)
        while True:
            if operator.poll() is not None:
                raise SystemExit(f"operator exited; see {work / 'operator.log'}")
            if kv.get(marker) is not None:
                count = len(kv.list_prefix(prefix).items)
                if count >= n:
                    break
            time.sleep(0.05)
        export_s = time.perf_counter() - t_start
        for line in (work / "operator.log").read_text().splitlines():
            if "exporting cluster" in line or "first full export" in line or "metrics and" in line:
                print("        operator:", line.split(" ", 1)[1][:150], flush=True)

        print(f"[bench] measuring {args.samples} EndpointSlice changes", flush=True)
        seen: dict[str, float] = {}
        lock = threading.Lock()
        watch = kv.watch_prefix(prefix, start_revision=kv.revision() + 1)

        def consume() -> None:
            for ev in watch:
                if ev.kind == "put" and ev.value:
                    now = time.perf_counter()
                    for ip in json.loads(ev.value)["backends"]:
                        with lock:
                            seen.setdefault(ip, now)

        threading.Thread(target=consume, daemon=True).start()
        latencies = []
        rng = random.Random(7)
        # Distinct services: a second change to one record within --min-write-interval
        # (0.25 s) is deliberately delayed by the coalescing, which is not the latency asked here.
        picks = rng.sample(range(n), min(args.samples, n))
        for s, i in enumerate(picks):
            eps = endpoints(i, m)
            # a fresh, unique address per sample: its first appearance in etcd is the write
            new_ip = f"10.99.{s // 256}.{s % 256}"
            eps[0]["addresses"] = [new_ip]
            api.patch("EndpointSlice", NS, f"svc-{i}-1", {"endpoints": eps})
            t_patch = time.perf_counter()
            deadline = t_patch + 10
            while time.perf_counter() < deadline:
                with lock:
                    if new_ip in seen:
                        latencies.append(seen[new_ip] - t_patch)
                        break
                time.sleep(0.001)
            else:
                print(f"        sample {s}: no write within 10s", flush=True)
            time.sleep(0.02)
        watch.cancel()

        latencies.sort()
        p50 = statistics.median(latencies) * 1000
        p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000
        print()
        print(f"services x endpoints           : {n} x {m}")
        print(f"create objects (API server)    : {create_s:.1f} s")
        print(f"operator start -> full export  : {export_s:.2f} s  ({n / export_s:.0f} services/s)")
        print(f"slice change -> etcd write p50 : {p50:.1f} ms")
        print(f"slice change -> etcd write p99 : {p99:.1f} ms  ({len(latencies)}/{args.samples} samples)")
        return 0
    finally:
        if operator is not None:
            operator.kill()
            operator.wait()
        store.stop()
        cp.stop()
        subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    sys.exit(main())
