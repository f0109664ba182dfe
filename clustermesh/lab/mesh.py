"""The lab: N small but real Kubernetes clusters on this machine, meshed.

Per cluster ``lab-i``: etcd + kube-apiserver + kube-controller-manager + kube-scheduler,
its state store (etcd with TLS and auth) behind a read-only TLS grpc-proxy, the operator,
and M nodes. A node is a network namespace on a shared underlay with its own cgroup,
running kube-proxy (iptables mode, in the node namespace), the clustermesh agent
(socket-LB on the node's cgroup, routes in the node namespace) and the node agent (the
lab's kubelet, ``node/agent.py``) that runs the Pods the scheduler binds to the node.

Every process the lab starts lives in the cgroup ``<root>/system`` and is supervised:
one that dies is restarted with backoff and reported. Pods live under the node cgroups.
Everything the lab makes is named after one tag and recorded in ``state.json`` before it
is made, so ``clustermesh lab down`` removes it all, also after the supervisor died.

Servers listen on 127.0.0.1 in the host namespace; nodes, pods and the underlay live in
lab namespaces with no route out of the machine. The host never connects to a lab address.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clustermesh.connect import connect, load_side
from clustermesh.datapath.hooks import pin_dir_for
from clustermesh.kube import UNROUTABLE_EXTENSION, KubeClient, KubeNotFound
from clustermesh.lab.netns import (
    API_VIP,
    UNDERLAY_CIDR,
    LabNode,
    NetnsError,
    Underlay,
    ip,
    masquerade_pods,
)
from clustermesh.lab.pki import CertificateAuthority
from clustermesh.lab.servers import (
    ControlPlane,
    EtcdGrpcProxy,
    EtcdServer,
    Process,
    ServerError,
    find_binary,
    free_port,
)
from clustermesh.lab.supervise import Supervised
from clustermesh.lab.teardown import process_start, teardown

REPO = Path(__file__).resolve().parents[2]
STORE_NODE_PORT = 32391
LAB_NATIVE_CIDR = "10.0.0.0/8"  # every lab cluster's pod and Service CIDRs (10.244+N, 10.95+N)
Say = Callable[[int, int, str], None]


def cgroup2_root() -> Path:
    for line in Path("/proc/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[2] == "cgroup2":
            return Path(parts[1])
    raise ServerError("no cgroup v2 mount; mount one: mount -t cgroup2 none /sys/fs/cgroup/unified")


@dataclass
class LabNodeInfo:
    cluster: LabCluster
    index: int
    netns: LabNode
    port: int  # the node agent's HTTPS port

    @property
    def name(self) -> str:
        return f"{self.cluster.name}-node-{self.index}"

    @property
    def pod_cidr(self) -> str:
        return self.netns.pod_cidr

    @property
    def cgroup(self) -> Path:
        return self.cluster.mesh.cgroup_root / self.name

    @property
    def pin_dir(self) -> Path:
        return pin_dir_for(f"{self.name}-{self.cluster.mesh.tag}")


@dataclass
class LabCluster:
    mesh: LabMesh
    index: int
    cp: ControlPlane | None = None
    store: EtcdServer | None = None
    proxy: EtcdGrpcProxy | None = None
    pki: CertificateAuthority | None = None
    password: str = ""
    nodes: list[LabNodeInfo] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"lab-{self.index}"

    @property
    def directory(self) -> Path:
        return self.mesh.directory / self.name

    @property
    def pod_cidr(self) -> str:
        return f"10.{243 + self.index}.0.0/16"

    @property
    def service_cidr(self) -> str:
        return f"10.{95 + self.index}.0.0/16"

    def kube(self) -> KubeClient:
        assert self.cp is not None
        return KubeClient(str(self.cp.kubeconfig))

    def kubectl(self, *args: str, stdin: str | None = None, timeout: float = 120) -> str:
        assert self.cp is not None
        res = subprocess.run(["kubectl", "--kubeconfig", str(self.cp.kubeconfig), *args], input=stdin,
                             capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0:
            raise ServerError(f"kubectl {' '.join(args)} ({self.name}): {res.stderr.strip()}")
        return res.stdout


class LabMesh:
    def __init__(self, directory: Path, clusters: int = 2, nodes: int = 2, say: Say | None = None,
                 report: Callable[[str], None] | None = None, from_manifests: bool = False,
                 direct: Collection[str] = ()) -> None:
        self.directory = directory
        # The mesh's own components as users install them (deploy/ applied with kubectl, run by the
        # node agents as Pods), instead of processes the lab starts and supervises.
        self.from_manifests = from_manifests
        # The clusters installed from deploy/ without the cache: their agents read every remote's store
        # themselves (deploy/direct's RBAC). A mesh may mix both modes.
        self.direct = frozenset(direct)
        self.tag = uuid.uuid4().hex[:5]
        self.clusters = [LabCluster(self, i) for i in range(1, clusters + 1)]
        self.nodes_per_cluster = nodes
        self.say: Say = say or (lambda step, total, text: print(f"[lab {step}/{total}] {text}", flush=True))
        self.report = report or (lambda text: print(f"[lab] {text}", flush=True))
        self.underlay = Underlay(f"cml-{self.tag}-underlay")
        self.cgroup_root = cgroup2_root() / f"clustermesh-lab-{self.tag}"
        self.system_cgroup = self.cgroup_root / "system"
        self.supervised: list[Supervised] = []

    @property
    def state_path(self) -> Path:
        return self.directory / "state.json"

    @property
    def kubeconfig(self) -> Path:
        return self.directory / "kubeconfig"

    # ------------------------------------------------------------ up

    STEPS = 6

    def up(self) -> None:
        self.write_state()  # first: whatever is made from here on, lab down can find
        self.system_cgroup.mkdir(parents=True, exist_ok=True)
        self.say(1, self.STEPS, f"{len(self.clusters)} control planes (etcd, kube-apiserver, "
                                "controller-manager, scheduler)")
        for c in self.clusters:
            c.cp = ControlPlane(c.directory / "control-plane", name=c.name, pod_cidr=c.pod_cidr,
                                service_cidr=c.service_cidr, scheduler=True, cgroup=self.system_cgroup,
                                advertise_address=API_VIP)
            c.cp.start()
            self._supervise(*c.cp.processes())
            c.kubectl("apply", "-f", str(REPO / "crds"))
            # The API server's endpoint reconciler is off (it would advertise an address it does not
            # listen on): the `kubernetes` Service's endpoint is the forwarder on every node.
            c.kubectl("apply", "-f", "-", stdin=json.dumps({
                "apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "kubernetes", "namespace": "default"},
                "subsets": [{"addresses": [{"ip": API_VIP}],
                             "ports": [{"name": "https", "port": c.cp.port, "protocol": "TCP"}]}]}))
        for c in self.clusters:
            c.kubectl("wait", "--for=condition=Established", "crd/clustermeshes.clustermesh.io", "--timeout=60s")
        self.write_kubeconfig()

        if self.from_manifests:
            self.say(2, self.STEPS, f"{self.nodes_per_cluster} nodes per cluster: network namespaces on one "
                                    "underlay, node agents (the lab's kubelet), kube-proxy")
            self._make_nodes()
            self.say(3, self.STEPS, "deploy/ in every cluster: clustermesh certs, then kubectl apply -k "
                                    "deploy/overlays/lab (store Deployment, agent DaemonSet, RBAC"
                                    + (f", and deploy/direct in {', '.join(sorted(self.direct))}: agents may "
                                       "read the remotes' Secrets)" if self.direct else ")"))
            for c in self.clusters:
                self._deploy(c)
            self.say(4, self.STEPS, "ClusterMesh objects (remotes reach the store's NodePort; "
                                    + self._modes()
                                    + "), clustermesh connect between every pair")
            for c in self.clusters:
                self._mesh_object_for_deploy(c)
            self._connect_all()
            self.say(5, self.STEPS, "waiting for the store and agent Pods (kubectl -n clustermesh-system get pods)")
            for c in self.clusters:
                self._wait_deployed(c)
        else:
            self.say(2, self.STEPS, "state stores (etcd, TLS, auth) and read-only grpc-proxies")
            for c in self.clusters:
                self._start_store(c)
            self.say(3, self.STEPS, "ClusterMesh objects, access Secrets, clustermesh connect between every pair")
            for c in self.clusters:
                self._mesh_objects(c)
            self._connect_all()
            self.say(4, self.STEPS, f"{self.nodes_per_cluster} nodes per cluster: network namespaces on one "
                                    "underlay, node agents (the lab's kubelet), kube-proxy")
            self._make_nodes()
            self.say(5, self.STEPS, "clustermesh operators and agents")
            for c in self.clusters:
                self._start_operator(c)
                for node in c.nodes:
                    self._start_agent(node)
        self.say(6, self.STEPS, "waiting for every operator to export and every agent to connect")
        for c in self.clusters:
            self._wait_synced(c)

    def _start_store(self, c: LabCluster) -> None:
        c.pki = CertificateAuthority(c.directory / "store-pki")
        c.store = EtcdServer(c.directory / "store", name=f"{c.name}-store", pki=c.pki, cgroup=self.system_cgroup)
        c.store.start()
        c.password = secrets.token_urlsafe(18)
        c.store.enable_auth({"remote": (c.password, ["cilium/"])})
        c.proxy = EtcdGrpcProxy(c.directory / "store", c.store.url, namespace="", name=f"{c.name}-proxy",
                                pki=c.pki, backend_cert=c.pki.issue("proxy-backend", "", server=False),
                                cgroup=self.system_cgroup)
        c.proxy.start()
        self._supervise(c.store.process, c.proxy.process)

    def _make_nodes(self) -> None:
        self.underlay.create()
        for c in self.clusters:
            for j in range(1, self.nodes_per_cluster + 1):
                node = LabNodeInfo(c, j, LabNode(f"cml-{self.tag}-{c.name}-n{j}", self.underlay,
                                                 f"192.168.100.{10 * c.index + j}",
                                                 f"10.{243 + c.index}.{j}.0/24", port=f"n{c.index}{j}-{self.tag}"),
                                   port=free_port())
                c.nodes.append(node)
                node.netns.create()
                node.cgroup.mkdir(parents=True, exist_ok=True)
            self._route_between_nodes(c)
            for node in c.nodes:
                self._start_node_agent(node)
                self._start_kube_proxy(node)
        self.write_state()
        for c in self.clusters:
            self._wait_nodes_ready(c)

    # ------------------------------------------------------------ deploy/ (--from-manifests)

    def _deploy(self, c: LabCluster) -> None:
        """What a user does on a cluster: make the store's Secrets with `clustermesh certs`, then
        `kubectl apply -k` an overlay of deploy/overlays/lab that only says which lab this is."""
        assert c.cp is not None
        overlay = c.directory / "deploy"
        secrets_dir = overlay / "secrets"
        addresses = [f"--ip={n.netns.address}" for n in c.nodes]
        res = subprocess.run([sys.executable, "-m", "clustermesh.cli", "certs", "--cluster", c.name, *addresses,
                              "--pki-dir", str(c.directory / "store-pki"), "--in-cluster-ca",
                              "--output-dir", str(secrets_dir)],
                             capture_output=True, text=True, timeout=120, cwd=REPO)
        if res.returncode != 0:
            raise ServerError(f"clustermesh certs for {c.name}: {res.stderr.strip()}")
        base = os.path.relpath(REPO / "deploy" / "overlays" / "lab", overlay)
        kustomization: dict[str, Any] = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "resources": [base, *sorted(f"secrets/{p.name}" for p in secrets_dir.glob("*.yaml"))],
            "configMapGenerator": [{"name": "clustermesh-lab", "namespace": "clustermesh-system",
                                    "behavior": "merge", "literals": [f"tag={self.tag}"]}],
            # This machine's cgroup v2 mount and the source tree's BPF programs.
            "patches": [{"patch": json.dumps({
                "apiVersion": "apps/v1", "kind": "DaemonSet",
                "metadata": {"name": "clustermesh-agent", "namespace": "clustermesh-system"},
                "spec": {"template": {"spec": {
                    "containers": [{"name": "agent", "env": [{"name": "CLUSTERMESH_BPF_DIR",
                                                              "value": str(REPO / "bpf")}]}],
                    "volumes": [{"name": "cgroup", "hostPath": {"path": str(cgroup2_root()),
                                                                "type": "Directory"}}]}}}})}],
        }
        if c.name in self.direct:
            kustomization["components"] = [os.path.relpath(REPO / "deploy" / "direct", overlay)]
        (overlay / "kustomization.yaml").write_text(json.dumps(kustomization, indent=2))
        c.kubectl("apply", "-k", str(overlay), timeout=180)

    def _modes(self) -> str:
        names = [c.name for c in self.clusters]
        direct = [n for n in names if n in self.direct]
        cached = [n for n in names if n not in self.direct]
        if not direct:
            return "agents read every remote from their store pods' cache"
        if not cached:
            return "agents read each remote's store directly"
        return (f"agents of {', '.join(cached)} read every remote from their store pods' cache, "
                f"agents of {', '.join(direct)} read each remote's store directly")

    def _mesh_object_for_deploy(self, c: LabCluster) -> None:
        # Every node serves the NodePort: readers move to the next address when one fails.
        # No shared access Secret: connect gives each peer its own reader from this store's CA.
        access = {"endpoints": [f"https://{n.netns.address}:{STORE_NODE_PORT}" for n in c.nodes]}
        # By default the agents read every remote from this cluster's store pods, which cache them
        # (KVStoreMesh); --direct: from each remote's store.
        mesh = {"apiVersion": "clustermesh.io/v1alpha1", "kind": "ClusterMesh", "metadata": {"name": "default"},
                "spec": {"localCluster": {"name": c.name, "id": c.index}, "access": access,
                         "cache": {"enabled": c.name not in self.direct}}}
        c.kubectl("apply", "-f", "-", stdin=json.dumps(mesh))

    def _wait_deployed(self, c: LabCluster) -> None:
        for what in ("deployment/clustermesh-store", "daemonset/clustermesh-agent"):
            try:
                c.kubectl("-n", "clustermesh-system", "rollout", "status", what, "--timeout=240s", timeout=260)
            except ServerError as exc:
                raise ServerError(f"{exc}; see kubectl --context {c.name} -n clustermesh-system get pods, "
                                  f"and logs under {c.directory / 'nodes'}/<node>/pods") from exc

    def _supervise(self, *processes: Process) -> None:
        for p in processes:
            self.supervised.append(Supervised(p, self.report, self.hold_dir))

    def _start(self, name: str, argv: list[str], log: Path) -> None:
        proc = Process(name, argv, log, cgroup=self.system_cgroup)
        sup = Supervised(proc, self.report, self.hold_dir)
        sup.start()
        self.supervised.append(sup)

    def write_kubeconfig(self) -> Path:
        parts = []
        for c in self.clusters:
            assert c.cp is not None
            parts.append(json.loads(c.cp.write_kubeconfig(c.directory / "kubeconfig", context=c.name).read_text()))
        merged = merged_kubeconfig(parts)
        self.kubeconfig.write_text(json.dumps(merged, indent=2))
        self.kubeconfig.chmod(0o600)
        return self.kubeconfig

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
        kubes = {}
        for c in self.clusters:
            assert c.cp is not None
            kubes[c.name] = KubeClient(str(c.cp.kubeconfig))
        for i, a in enumerate(self.clusters):
            for b in self.clusters[i + 1:]:
                if self.from_manifests:  # one reader per peer, from each store's CA (clustermesh certs)
                    connect(load_side(kubes[a.name], "default", a.directory / "store-pki"),
                            load_side(kubes[b.name], "default", b.directory / "store-pki"))
                else:  # stores the lab made itself, with one shared reader
                    connect(load_side(kubes[a.name], "default"), load_side(kubes[b.name], "default"),
                            per_peer=False)

    def _route_between_nodes(self, c: LabCluster) -> None:
        """The lab's CNI between the nodes of one cluster: each node's pod CIDR via its underlay
        address (routes to other clusters' pods are the clustermesh agent's)."""
        for node in c.nodes:
            for other in c.nodes:
                if other is not node:
                    ip("route", "replace", other.pod_cidr, "via", other.netns.address, netns=node.netns.netns)
            # A node has no default route (nothing may leave the lab), so the node's own processes
            # (hostNetwork pods) need one for ClusterIPs to get as far as kube-proxy's DNAT; what
            # no rule rewrites dies on lo instead of leaving.
            ip("route", "replace", c.service_cidr, "dev", "lo", netns=node.netns.netns)
            # Pods reaching other nodes (a store pod's cache reading another cluster's NodePort) do
            # so from the node's address, as with a real CNI; no route to this node's pods needed.
            masquerade_pods(node.netns.netns, node.pod_cidr, LAB_NATIVE_CIDR)

    def _start_node_agent(self, node: LabNodeInfo) -> None:
        c = node.cluster
        assert c.cp is not None
        serving = c.cp.pki.issue(f"node-agent-{node.name}", node.name, ips=("127.0.0.1",), client=False)
        self._start(f"{node.name}-node-agent", [
            sys.executable, "-m", "clustermesh.lab.node.agent", "--kubeconfig", str(c.cp.kubeconfig),
            "--node", node.name, "--netns", node.netns.netns, "--address", node.netns.address,
            "--pod-cidr", node.pod_cidr, "--cgroup", str(node.cgroup),
            "--state-dir", str(c.directory / "nodes" / node.name), "--port", str(node.port),
            "--tls-cert", str(serving.cert), "--tls-key", str(serving.key), "--client-ca", str(c.cp.pki.cert_path),
            "--api-port", str(c.cp.port), "--pod-prefix", f"cml-{self.tag}-{node.name}",
        ], c.directory / "nodes" / f"{node.name}-node-agent.log")

    def _start_kube_proxy(self, node: LabNodeInfo) -> None:
        """kube-proxy in iptables mode, in the node's namespace, leaving the host alone: no
        conntrack sysctls (host-wide), rules only in the node namespace; it reaches the API
        server through the node agent's forwarder on the node's 127.0.0.1."""
        c = node.cluster
        assert c.cp is not None
        self._start(f"{node.name}-kube-proxy", [
            "ip", "netns", "exec", node.netns.netns, find_binary("kube-proxy"),
            f"--kubeconfig={c.cp.kubeconfig}", f"--hostname-override={node.name}", "--proxy-mode=iptables",
            f"--cluster-cidr={c.pod_cidr}", "--conntrack-max-per-core=0",
            "--conntrack-tcp-timeout-established=0", "--conntrack-tcp-timeout-close-wait=0",
            "--metrics-bind-address=127.0.0.1:10249", "--healthz-bind-address=127.0.0.1:10256",
            f"--bind-address={node.netns.address}", "--iptables-sync-period=30s", "--iptables-min-sync-period=0s",
        ], c.directory / "nodes" / f"{node.name}-kube-proxy.log")

    def _start_operator(self, c: LabCluster) -> None:
        assert c.cp is not None and c.store is not None and c.store.admin is not None and c.pki is not None
        self._start(f"{c.name}-operator", [
            sys.executable, "-m", "clustermesh.cli", "operator", "--kubeconfig", str(c.cp.kubeconfig),
            "--etcd", c.store.url, "--etcd-ca", str(c.pki.cert_path), "--etcd-cert", str(c.store.admin.cert),
            "--etcd-key", str(c.store.admin.key), "--metrics-port", str(free_port()), "--heartbeat-interval", "10",
        ], c.directory / "operator.log")

    def _start_agent(self, node: LabNodeInfo) -> None:
        c = node.cluster
        assert c.cp is not None
        self._start(f"{node.name}-agent", [
            sys.executable, "-m", "clustermesh.cli", "agent", "--kubeconfig", str(c.cp.kubeconfig),
            "--node", node.name, "--cgroup", str(node.cgroup), "--pin-dir", str(node.pin_dir),
            "--routes", f"netns:{node.netns.netns}", "--grace-period", "5", "--heartbeat-timeout", "60",
            "--metrics-port", str(free_port()),
        ], c.directory / "nodes" / f"{node.name}-agent.log")

    def _wait_nodes_ready(self, c: LabCluster, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        ready: set[str] = set()
        kube = c.kube()
        while time.monotonic() < deadline:
            # Ready, and the node lifecycle controller has lifted the not-ready taint (pods schedule).
            ready = {n["metadata"]["name"] for n in kube.get("/api/v1/nodes")["items"]
                     if any(cond["type"] == "Ready" and cond["status"] == "True"
                            for cond in n.get("status", {}).get("conditions", []))
                     and not any(t["key"].startswith("node.kubernetes.io/not-ready")
                                 for t in n.get("spec", {}).get("taints") or [])}
            if ready >= {n.name for n in c.nodes}:
                return
            time.sleep(0.3)
        missing = sorted({n.name for n in c.nodes} - ready)
        raise ServerError(f"{c.name}: nodes {', '.join(missing)} not Ready after {timeout:.0f}s; see "
                          f"{c.directory / 'nodes'}/<node>-node-agent.log")

    def _wait_synced(self, c: LabCluster, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        want = len(self.clusters) - 1
        kube = c.kube()
        while time.monotonic() < deadline:
            try:
                status = kube.get("/apis/clustermesh.io/v1alpha1/clustermeshes/default").get("status", {})
            except KubeNotFound:  # the operator creates it
                status = {}
            ready = [r for r in status.get("remotes", []) if r.get("ready")]
            synced = any(cond.get("type") == "Synced" and cond.get("status") == "True"
                         for cond in status.get("conditions", []))
            if synced and len(ready) >= want:
                return
            time.sleep(0.5)
        # The logs outlive the lab's teardown: the files, not kubectl logs.
        where = c.directory / ("nodes/*/pods/*/operator.log" if self.from_manifests else "operator.log")
        raise ServerError(f"{c.name}: the operator did not report Synced with {want} ready remotes in {timeout:.0f}s; "
                          f"see {where}")

    # ------------------------------------------------------------ supervision

    def check(self) -> None:
        for sup in list(self.supervised):
            sup.check()

    def processes(self) -> list[Supervised]:
        return list(self.supervised)

    # ------------------------------------------------------------ state and down

    @property
    def hold_dir(self) -> Path:
        return self.directory / "hold"

    def state(self) -> dict[str, Any]:
        return {
            "tag": self.tag, "supervisor": os.getpid(), "supervisor_start": process_start(os.getpid()),
            "directory": str(self.directory),
            "kubeconfig": str(self.kubeconfig), "cgroup_root": str(self.cgroup_root),
            "netns_prefix": f"cml-{self.tag}-", "from_manifests": self.from_manifests,
            "direct": sorted(self.direct),
            "nodes": {n.name: {"cluster": c.name, "netns": n.netns.netns, "cgroup": str(n.cgroup),
                               "pin_dir": str(n.pin_dir), "address": n.netns.address, "pod_cidr": n.pod_cidr}
                      for c in self.clusters for n in c.nodes},
            "clusters": {c.name: {"kubeconfig": str(c.directory / "control-plane" / "kubeconfig"),
                                  "state_dirs": str(c.directory / "nodes")} for c in self.clusters},
        }

    def write_state(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state(), indent=2))
        tmp.replace(self.state_path)

    def down(self) -> list[str]:
        self.supervised.clear()
        return teardown(self.state())


__all__ = ["LabCluster", "LabMesh", "NetnsError", "ServerError", "teardown"]


def merged_kubeconfig(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One kubeconfig for every cluster of the lab (the first one current). Each cluster entry marks the
    lab's underlay unroutable: tools that read this kubeconfig (clustermesh status) must not dial the
    nodes' addresses from the host, where they exist only inside the lab's namespaces."""
    merged: dict[str, Any] = {"apiVersion": "v1", "kind": "Config", "clusters": [], "users": [],
                              "contexts": [], "current-context": parts[0]["current-context"]}
    for one in parts:
        for entry in one["clusters"]:
            entry["cluster"]["extensions"] = [{"name": UNROUTABLE_EXTENSION, "extension": {
                "networks": [UNDERLAY_CIDR],
                "reason": "a lab address, reachable only inside the lab's nodes; or clustermesh lab status"}}]
        for key in ("clusters", "users", "contexts"):
            merged[key] += one[key]
    return merged
