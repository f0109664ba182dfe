"""The lab: N clusters on this machine, meshed, with the Star Wars demo.

Per cluster ``lab-i``: a control plane, its state store (etcd with TLS and auth)
behind a read-only TLS grpc-proxy, the operator, one node (a network namespace
on a shared underlay, a cgroup, the agent with routes), a rebel-base pod and an
x-wing pod. Each cluster's ClusterMesh names every other cluster, with a Secret
holding that cluster's CA and read-only credentials.

Control-plane servers, stores, proxies, operators and agents run on 127.0.0.1 in
the host namespace; pods, nodes and the underlay live in lab namespaces that have
no route out of the machine. The host namespace never connects to a lab address.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clustermesh.connect import connect, load_side
from clustermesh.datapath import hooks
from clustermesh.datapath.hooks import pin_dir_for
from clustermesh.kube import KubeClient
from clustermesh.lab.kubeapi import KubeAPI
from clustermesh.lab.netns import LabNode, LabPod, Underlay, make_cgroup, remove_cgroup
from clustermesh.lab.pki import CertificateAuthority
from clustermesh.lab.servers import ControlPlane, EtcdGrpcProxy, EtcdServer, Process, ServerError, free_port

REPO = Path(__file__).resolve().parents[2]
SLICE = "rebel-base-lab"


def run_xwing(netns: str, cgroup: Path, cluster_ip: str, count: int, capture: bool) -> subprocess.CompletedProcess[str]:
    """x-wing's requests to rebel-base's ClusterIP, from its pod netns and inside the node's
    cgroup (so that its connect() goes through the node's socket-LB)."""
    procs = cgroup / "cgroup.procs"

    def join_cgroup() -> None:  # runs in the child, before exec
        procs.write_text(str(os.getpid()))

    return subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-m", "clustermesh.lab.demo", "xwing",
         "--url", f"http://{cluster_ip}/", "--count", str(count)],
        preexec_fn=join_cgroup, capture_output=capture, text=True, timeout=120, cwd=REPO, check=False,
    )


def set_base_ready(api: KubeAPI, address: str, ready: bool) -> None:
    """Kill (not ready) or revive a cluster's rebel-base through its EndpointSlice."""
    api.patch("EndpointSlice", "default", SLICE,
              {"endpoints": [{"addresses": [address], "conditions": {"ready": ready}}]})


def cgroup2_root() -> Path:
    for line in Path("/proc/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[2] == "cgroup2":
            return Path(parts[1])
    raise ServerError("no cgroup v2 mount; mount one: mount -t cgroup2 none /sys/fs/cgroup/unified")


@dataclass
class LabCluster:
    index: int
    directory: Path
    tag: str
    name: str = ""
    cp: ControlPlane | None = None
    store: EtcdServer | None = None
    proxy: EtcdGrpcProxy | None = None
    pki: CertificateAuthority | None = None
    password: str = ""
    node: LabNode | None = None
    pods: dict[str, LabPod] = field(default_factory=dict)
    cgroup: Path | None = None
    processes: list[Process] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.name = f"lab-{self.index}"

    @property
    def pod_cidr(self) -> str:
        return f"10.{243 + self.index}.0.0/16"

    @property
    def node_pod_cidr(self) -> str:
        return f"10.{243 + self.index}.1.0/24"

    def pod_ip(self, host: int) -> str:
        return f"10.{243 + self.index}.1.{host}"

    @property
    def node_name(self) -> str:
        return f"{self.name}-node-1"

    @property
    def pin_dir(self) -> Path:
        return pin_dir_for(f"{self.name}-{self.tag}")

    def api(self) -> KubeAPI:
        assert self.cp is not None
        return KubeAPI.for_control_plane(self.cp)

    def kubectl(self, *args: str, stdin: str | None = None) -> str:
        assert self.cp is not None
        res = subprocess.run(["kubectl", "--kubeconfig", str(self.cp.kubeconfig), *args], input=stdin,
                             capture_output=True, text=True, timeout=60)
        if res.returncode != 0:
            raise ServerError(f"kubectl {' '.join(args)} ({self.name}): {res.stderr.strip()}")
        return res.stdout


class LabMesh:
    def __init__(self, directory: Path, clusters: int = 2, affinity: str = "none",
                 say: Any = print) -> None:
        self.directory = directory
        self.tag = uuid.uuid4().hex[:5]
        self.clusters = [LabCluster(i, directory / f"lab-{i}", self.tag) for i in range(1, clusters + 1)]
        self.affinity = affinity
        self.say = say
        self.underlay = Underlay(f"cml-{self.tag}-underlay")
        self.cgroup_root = cgroup2_root() / f"clustermesh-lab-{self.tag}"
        self._created_underlay = False

    # ------------------------------------------------------------ up

    def up(self) -> None:
        total = 6
        self.say(1, total, f"{len(self.clusters)} control planes (etcd, kube-apiserver, controller-manager)")
        for c in self.clusters:
            c.cp = ControlPlane(c.directory / "control-plane", name=c.name, pod_cidr=c.pod_cidr)
            c.cp.start()
            c.kubectl("apply", "-f", str(REPO / "crds"))
            c.kubectl("wait", "--for=condition=Established", "crd/clustermeshes.clustermesh.io", "--timeout=60s")
        self.write_kubeconfig()

        self.say(2, total, "state stores (etcd, TLS, auth) and read-only grpc-proxies")
        for c in self.clusters:
            c.pki = CertificateAuthority(c.directory / "store-pki")
            c.store = EtcdServer(c.directory / "store", name=f"{c.name}-store", pki=c.pki)
            c.store.start()
            c.password = secrets.token_urlsafe(18)
            c.store.enable_auth({"remote": (c.password, ["cilium/"])})
            c.proxy = EtcdGrpcProxy(c.directory / "store", c.store.url, namespace="", pki=c.pki,
                                    backend_cert=c.pki.issue("proxy-backend", "", server=False))
            c.proxy.start()

        self.say(3, total, "ClusterMesh objects, access Secrets, clustermesh connect between every pair")
        for c in self.clusters:
            self._mesh_objects(c)
        self._connect_all()

        self.say(4, total, "nodes: network namespaces on one underlay, cgroups, Node objects")
        self._created_underlay = True  # before create(): a half-made underlay is removed too
        self.underlay.create()
        for c in self.clusters:
            c.node = LabNode(f"cml-{self.tag}-{c.name}-n1", self.underlay, f"192.168.100.{10 + c.index}",
                             c.node_pod_cidr, port=f"n{c.index}-{self.tag}")
            c.cgroup = self.cgroup_root / c.name  # recorded first, so teardown removes it on failure
            c.node.create()
            make_cgroup(self.cgroup_root, c.name)
            self._register_node(c)

        self.say(5, total, "operators and agents")
        for c in self.clusters:
            self._start_operator(c)
            self._start_agent(c)

        self.say(6, total, "the Star Wars demo: rebel-base and x-wing pods")
        for c in self.clusters:
            self._start_pods(c)

    def write_kubeconfig(self) -> Path:
        merged: dict[str, Any] = {"apiVersion": "v1", "kind": "Config", "clusters": [], "users": [],
                                  "contexts": [], "current-context": self.clusters[0].name}
        for c in self.clusters:
            assert c.cp is not None
            one = json.loads(c.cp.write_kubeconfig(c.directory / "kubeconfig", context=c.name).read_text())
            for key in ("clusters", "users", "contexts"):
                merged[key] += one[key]
        path = self.directory / "kubeconfig"
        path.write_text(json.dumps(merged, indent=2))
        path.chmod(0o600)
        return path

    def _mesh_objects(self, c: LabCluster) -> None:
        """Publish how others reach this cluster (spec.access + its Secret), as a real
        deployment would; ``clustermesh connect`` then wires the clusters together."""
        assert c.pki is not None and c.proxy is not None and c.store is not None and c.cp is not None
        # The proxy asks for a client certificate signed by its CA; the identity that counts
        # for etcd is the read-only user, so the certificate carries no name.
        client = c.pki.issue("remote-client", "", server=False)
        KubeClient(str(c.cp.kubeconfig)).put_secret("kube-system", "clustermesh-access", {
            "ca.crt": c.pki.cert_path.read_bytes(), "tls.crt": client.cert.read_bytes(),
            "tls.key": client.key.read_bytes(), "username": b"remote", "password": c.password.encode(),
        })
        mesh = {"apiVersion": "clustermesh.io/v1alpha1", "kind": "ClusterMesh", "metadata": {"name": "default"},
                "spec": {"localCluster": {"name": c.name, "id": c.index}, "store": {"endpoints": [c.store.url]},
                         "access": {"endpoints": [c.proxy.url],
                                    "tls": {"secretName": "clustermesh-access", "secretNamespace": "kube-system"}}}}
        c.kubectl("apply", "-f", "-", stdin=json.dumps(mesh))

    def _connect_all(self) -> None:
        sides = {}
        for c in self.clusters:
            assert c.cp is not None
            sides[c.name] = load_side(KubeClient(str(c.cp.kubeconfig)), "default")
        for i, a in enumerate(self.clusters):
            for b in self.clusters[i + 1:]:
                # Reload: the previous connect changed spec.clusters.
                connect(load_side(sides[a.name].kube, "default"), load_side(sides[b.name].kube, "default"))

    def _register_node(self, c: LabCluster) -> None:
        assert c.node is not None
        api = c.api()
        api.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": c.node_name},
                    "spec": {"podCIDR": c.node_pod_cidr, "podCIDRs": [c.node_pod_cidr]}})
        api.request("PATCH", f"/api/v1/nodes/{c.node_name}/status",
                    {"status": {"addresses": [{"type": "InternalIP", "address": c.node.address},
                                              {"type": "Hostname", "address": c.node_name}]}},
                    "application/merge-patch+json")

    def _start_operator(self, c: LabCluster) -> None:
        assert c.cp is not None and c.store is not None and c.store.admin is not None and c.pki is not None
        op = Process(f"{c.name}-operator", [
            sys.executable, "-m", "clustermesh.cli", "operator", "--kubeconfig", str(c.cp.kubeconfig),
            "--etcd", c.store.url, "--etcd-ca", str(c.pki.cert_path), "--etcd-cert", str(c.store.admin.cert),
            "--etcd-key", str(c.store.admin.key), "--metrics-port", str(free_port()), "--heartbeat-interval", "10",
        ], c.directory / "operator.log")
        op.start()
        c.processes.append(op)

    def _start_agent(self, c: LabCluster) -> None:
        assert c.cp is not None and c.node is not None and c.cgroup is not None
        agent = Process(f"{c.name}-agent", [
            sys.executable, "-m", "clustermesh.cli", "agent", "--kubeconfig", str(c.cp.kubeconfig),
            "--node", c.node_name, "--cgroup", str(c.cgroup), "--pin-dir", str(c.pin_dir),
            "--routes", f"netns:{c.node.netns}", "--grace-period", "5", "--heartbeat-timeout", "60",
            "--metrics-port", str(free_port()),
        ], c.directory / "agent.log")
        agent.start()
        c.processes.append(agent)

    def _start_pods(self, c: LabCluster) -> None:
        assert c.node is not None
        c.kubectl("apply", "-f", str(REPO / "demo" / "starwars" / "rebel-base.yaml"))
        if self.affinity != "none":
            c.kubectl("annotate", "--overwrite", "service", "rebel-base",
                      f"service.cilium.io/affinity={self.affinity}")
        base = LabPod(f"cml-{self.tag}-{c.name}-base", c.node, c.pod_ip(10), port=f"b{c.index}-{self.tag}")
        xwing = LabPod(f"cml-{self.tag}-{c.name}-xwing", c.node, c.pod_ip(20), port=f"x{c.index}-{self.tag}")
        for role, pod in (("rebel-base", base), ("x-wing", xwing)):
            c.pods[role] = pod  # recorded first, so teardown removes a half-made pod too
            pod.create()
        server = Process(f"{c.name}-rebel-base", [
            "ip", "netns", "exec", base.netns, sys.executable, "-m", "clustermesh.lab.demo", "serve",
            "--cluster", c.name, "--pod", "rebel-base-1",
        ], c.directory / "rebel-base.log")
        server.start()
        c.processes.append(server)
        c.api().create({
            "kind": "EndpointSlice",
            "metadata": {"name": SLICE, "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "rebel-base"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
            "endpoints": [{"addresses": [c.pod_ip(10)], "conditions": {"ready": True}}],
        })

    # ------------------------------------------------------------ the demo

    def cluster(self, name: str) -> LabCluster:
        for c in self.clusters:
            if c.name == name:
                return c
        raise ServerError(f"no cluster {name!r} in the lab ({', '.join(c.name for c in self.clusters)})")

    def cluster_ip(self, c: LabCluster) -> str:
        return str(c.api().get("Service", "default", "rebel-base")["spec"]["clusterIP"])

    def xwing(self, name: str, count: int = 10) -> dict[str, Any]:
        """``count`` requests from the x-wing pod of cluster ``name`` to rebel-base's ClusterIP."""
        c = self.cluster(name)
        assert c.cgroup is not None
        res = run_xwing(c.pods["x-wing"].netns, c.cgroup, self.cluster_ip(c), count, capture=True)
        lines = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
        summary = lines[-1] if lines and "summary" in lines[-1] else {"summary": {}, "failed": count}
        return {"answers": lines[:-1], **summary}

    def set_base(self, name: str, ready: bool) -> None:
        """Kill (not ready) or revive the rebel-base of cluster ``name``."""
        c = self.cluster(name)
        set_base_ready(c.api(), c.pod_ip(10), ready)

    def state(self) -> dict[str, Any]:
        return {
            "tag": self.tag, "kubeconfig": str(self.directory / "kubeconfig"),
            "clusters": {c.name: {"kubeconfig": str(c.cp.kubeconfig) if c.cp else None,
                                  "xwing_netns": c.pods["x-wing"].netns if c.pods else None,
                                  "cgroup": str(c.cgroup), "base_ip": c.pod_ip(10)} for c in self.clusters},
        }

    # ------------------------------------------------------------ down

    def down(self) -> None:
        """Remove everything the lab made; each step on its own, so one failure leaves no more behind."""

        def attempt(what: str, fn: Any, *args: Any) -> None:
            try:
                fn(*args)
            except Exception as exc:
                print(f"[lab] teardown: {what}: {exc}", file=sys.stderr)

        for c in self.clusters:
            for proc in reversed(c.processes):
                attempt(f"stop {proc.name}", proc.stop)
        for c in self.clusters:
            if c.cgroup is not None and c.cgroup.exists():
                attempt(f"datapath of {c.name}", hooks.destroy, c.cgroup, c.pin_dir)
            for pod in c.pods.values():
                attempt(f"pod {pod.netns}", pod.delete)
            if c.node is not None:
                attempt(f"node {c.node.netns}", c.node.delete)
        if self._created_underlay:
            attempt("underlay", self.underlay.delete)
        attempt("cgroups", remove_cgroup, self.cgroup_root)
        for c in self.clusters:
            for server in (c.proxy, c.store, c.cp):
                if server is not None:
                    attempt(f"stop {c.name} servers", server.stop)
