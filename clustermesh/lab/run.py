"""``clustermesh lab up``: a local cluster on this machine, no Docker.

Today: one control plane (etcd, kube-apiserver, controller-manager, scheduler),
its state store (etcd with TLS and auth) behind a TLS grpc-proxy that remote
clusters may only read through, the CRDs, a ClusterMesh object, and the
operator exporting into the store. The lab issue grows this into the
two-cluster Star Wars demo with node namespaces, agents and pods.

Everything listens on 127.0.0.1; nothing here connects anywhere else.
"""

from __future__ import annotations

import argparse
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from clustermesh.lab.pki import CertificateAuthority
from clustermesh.lab.servers import (
    CACHE,
    ControlPlane,
    EtcdGrpcProxy,
    EtcdServer,
    Process,
    ServerError,
    free_port,
)

REPO = Path(__file__).resolve().parents[2]
STEPS = 6


def _say(step: int, text: str) -> None:
    print(f"[lab {step}/{STEPS}] {text}", flush=True)


def _wait_synced(kubectl: list[str], operator: Process, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not operator.running:
            raise ServerError(f"the operator exited; see {operator.log_path}:\n{operator.tail()}")
        out = subprocess.run(
            [*kubectl, "get", "clustermesh", "default", "-o",
             "jsonpath={.status.conditions[?(@.type=='Synced')].status}"],
            capture_output=True, text=True, check=False,
        ).stdout
        if out == "True":
            return
        time.sleep(0.5)
    raise ServerError(f"the operator did not report Synced within {timeout:.0f}s; see {operator.log_path}")


def run_lab(args: argparse.Namespace) -> int:
    if args.lab_command != "up":
        print("usage: clustermesh lab up [--no-wait]", file=sys.stderr)
        return 2
    base = Path(args.dir) if args.dir else CACHE / "lab"
    cdir = base / args.name
    if cdir.exists():
        subprocess.run(["rm", "-rf", str(cdir)], check=True)
    started: list[ControlPlane | EtcdServer | EtcdGrpcProxy | Process] = []
    try:
        _say(1, f"control plane of {args.name} (etcd, kube-apiserver, controller-manager, scheduler)")
        t0 = time.monotonic()
        cp = ControlPlane(cdir / "control-plane", name=args.name, scheduler=True)
        started.append(cp)
        cp.start()
        print(f"        kube-apiserver ready at {cp.url} in {time.monotonic() - t0:.1f}s", flush=True)

        _say(2, "state store: etcd with TLS and auth, and the read-only grpc-proxy for remote clusters")
        pki = CertificateAuthority(cdir / "store-pki")
        store = EtcdServer(cdir / "store", name=f"{args.name}-store", pki=pki)
        started.append(store)
        store.start()
        password = secrets.token_urlsafe(18)
        store.enable_auth({"remote": (password, ["cilium/"])})
        creds = cdir / "remote-credentials"
        creds.write_text(f"user=remote\npassword={password}\nca={pki.cert_path}\n")
        creds.chmod(0o600)
        proxy = EtcdGrpcProxy(cdir / "store", store.url, namespace="", pki=pki,
                              backend_cert=pki.issue("proxy-backend", "", server=False))
        started.append(proxy)
        proxy.start()

        _say(3, "CRDs")
        kubectl = ["kubectl", "--kubeconfig", str(cp.kubeconfig)]
        subprocess.run([*kubectl, "apply", "-f", str(REPO / "crds")], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(
            [*kubectl, "wait", "--for=condition=Established", "crd/clustermeshes.clustermesh.io", "--timeout=30s"],
            check=True, stdout=subprocess.DEVNULL,
        )

        _say(4, f"ClusterMesh 'default' for cluster {args.name} (id {args.id})")
        manifest = (
            "apiVersion: clustermesh.io/v1alpha1\nkind: ClusterMesh\nmetadata: {name: default}\n"
            f"spec:\n  localCluster: {{name: {args.name}, id: {args.id}}}\n"
            f"  store: {{endpoints: ['{store.url}']}}\n"
        )
        subprocess.run([*kubectl, "apply", "-f", "-"], input=manifest.encode(), check=True,
                       stdout=subprocess.DEVNULL)

        _say(5, "operator: exporting global services and nodes into the store")
        assert store.admin is not None
        metrics_port = free_port()
        operator = Process(
            "operator",
            [sys.executable, "-m", "clustermesh.cli", "operator", "--kubeconfig", str(cp.kubeconfig),
             "--etcd", store.url, "--etcd-ca", str(pki.cert_path), "--etcd-cert", str(store.admin.cert),
             "--etcd-key", str(store.admin.key), "--metrics-port", str(metrics_port)],
            cdir / "operator.log",
        )
        started.append(operator)
        operator.start()
        _wait_synced(kubectl, operator)

        _say(6, "ready")
        print(
            f"\n  kubectl --kubeconfig {cp.kubeconfig} get ns\n"
            f"  kubectl --kubeconfig {cp.kubeconfig} get clustermesh\n"
            f"  kubectl --kubeconfig {cp.kubeconfig} annotate service NAME service.cilium.io/global=true\n"
            f"  state store:   {store.url} (written by the operator as etcd user root)\n"
            f"  remote access: grpc-proxy {proxy.url}, read-only user in {creds}\n"
            f"  metrics:       http://127.0.0.1:{metrics_port}/metrics\n"
            f"  logs:          {cdir}\n",
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
                if not operator.running:
                    raise ServerError(f"the operator exited; see {operator.log_path}")
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
