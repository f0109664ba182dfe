"""``clustermesh lab up``: a local cluster on this machine, no Docker.

Today: one control plane (etcd, kube-apiserver, controller-manager, scheduler),
its state store (etcd) and the store's grpc-proxy, the ClusterMesh CRD applied
and a ClusterMesh object naming the cluster. The lab issue grows this into the
two-cluster Star Wars demo with node namespaces, agents and pods.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from clustermesh.lab.servers import CACHE, ControlPlane, EtcdGrpcProxy, EtcdServer, ServerError

REPO = Path(__file__).resolve().parents[2]


def _say(step: int, total: int, text: str) -> None:
    print(f"[lab {step}/{total}] {text}", flush=True)


def run_lab(args: argparse.Namespace) -> int:
    if args.lab_command != "up":
        print("usage: clustermesh lab up [--no-wait]", file=sys.stderr)
        return 2
    base = Path(args.dir) if args.dir else CACHE / "lab"
    cdir = base / args.name
    if cdir.exists():
        subprocess.run(["rm", "-rf", str(cdir)], check=True)
    total = 5
    started: list[ControlPlane | EtcdServer | EtcdGrpcProxy] = []
    try:
        _say(1, total, f"control plane of {args.name} (etcd, kube-apiserver, controller-manager, scheduler)")
        t0 = time.monotonic()
        cp = ControlPlane(cdir / "control-plane", name=args.name, scheduler=True)
        started.append(cp)
        cp.start()
        print(f"        kube-apiserver ready at {cp.url} in {time.monotonic() - t0:.1f}s")
        _say(2, total, "state store (etcd) and its grpc-proxy")
        store = EtcdServer(cdir / "store", name=f"{args.name}-store")
        started.append(store)
        store.start()
        proxy = EtcdGrpcProxy(cdir / "store", store.url, namespace="")
        started.append(proxy)
        proxy.start()
        _say(3, total, "ClusterMesh CRD")
        kubectl = ["kubectl", "--kubeconfig", str(cp.kubeconfig)]
        subprocess.run([*kubectl, "apply", "-f", str(REPO / "crds")], check=True)
        subprocess.run(
            [*kubectl, "wait", "--for=condition=Established", "crd/clustermeshes.clustermesh.io", "--timeout=30s"],
            check=True, stdout=subprocess.DEVNULL,
        )
        _say(4, total, f"ClusterMesh 'default' for cluster {args.name} (id {args.id})")
        manifest = (
            "apiVersion: clustermesh.io/v1alpha1\nkind: ClusterMesh\nmetadata: {name: default}\n"
            f"spec:\n  localCluster: {{name: {args.name}, id: {args.id}}}\n"
            f"  store: {{endpoints: ['{store.url}']}}\n"
        )
        subprocess.run([*kubectl, "apply", "-f", "-"], input=manifest.encode(), check=True)
        _say(5, total, "ready")
        print(
            f"\n  kubectl --kubeconfig {cp.kubeconfig} get ns\n"
            f"  kubectl --kubeconfig {cp.kubeconfig} get clustermesh\n"
            f"  state store:  {store.url}    (remote readers: grpc-proxy {proxy.url})\n"
            f"  operator:     clustermesh operator --kubeconfig {cp.kubeconfig} --etcd {store.url}\n"
            f"  logs:         {cdir}\n",
            flush=True,
        )
        if args.no_wait:
            return 0
        print("Press Ctrl-C to stop the lab.", flush=True)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            while not stop.wait(2):
                cp.check_running()
        except KeyboardInterrupt:
            pass
        return 0
    except (ServerError, subprocess.CalledProcessError) as exc:
        print(f"lab: {exc}", file=sys.stderr)
        return 1
    finally:
        print("[lab] stopping", flush=True)
        for server in reversed(started):
            server.stop()
