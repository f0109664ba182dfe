"""deploy/ against the real test kube-apiserver (1.20, RBAC on) and the store pod's script against a
real etcd and grpc-proxy, with certificates from `clustermesh certs`.

The manifests are built with kubectl's kustomize and sent through `kubectl apply --dry-run=server`,
so the API server's validation and admission see exactly what a user would apply. The RBAC is
applied for real and checked with `kubectl auth can-i --as` for both ServiceAccounts.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import yaml

from clustermesh.certs import CertsConfig, make_secrets
from clustermesh.kube import KubeClient, KubeError
from clustermesh.kvstore import Endpoint, KVClient, KVStoreError, Watch
from clustermesh.lab.node.volumes import write_projected
from clustermesh.lab.servers import free_port
from clustermesh.store.remote_config import remote_config_from_spec
from tests.kubectl import REPO, apply_crds, kubectl
from tests.prereq import require_binary

pytestmark = pytest.mark.integration

DEPLOY = REPO / "deploy"
BUILDS = ["", "base", "overlays/kind", "overlays/lab", "overlays/loadbalancer", "overlays/in-cluster-ca",
          "overlays/direct"]
NAMESPACES = ("clustermesh-system", "clustermesh-remotes")
OPERATOR = "system:serviceaccount:clustermesh-system:clustermesh-operator"
AGENT = "system:serviceaccount:clustermesh-system:clustermesh-agent"


def build(path: str) -> str:
    res = subprocess.run(["kubectl", "kustomize", str(DEPLOY / path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"kubectl kustomize deploy/{path}: {res.stderr}"
    return res.stdout


def for_1_20(manifests: str) -> str:
    """The test API server is 1.20: PodDisruptionBudgets are policy/v1beta1 there (v1 came with 1.21,
    and clusters from 1.25 on serve only v1). The spec fields deploy/ uses are the same in both."""
    docs = [d for d in yaml.safe_load_all(manifests) if d]
    for doc in docs:
        if doc["kind"] == "PodDisruptionBudget" and doc["apiVersion"] == "policy/v1":
            doc["apiVersion"] = "policy/v1beta1"
        if doc["kind"] == "CronJob" and doc["apiVersion"] == "batch/v1":  # batch/v1 came with 1.21
            doc["apiVersion"] = "batch/v1beta1"
    return str(yaml.safe_dump_all(docs))


RBAC_KINDS = ("ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")


@pytest.fixture(scope="module")
def installed(kubeconfig: str) -> Iterator[str]:
    """CRDs, and for real only the base's namespaces (a dry run of what is in them needs them) and
    its RBAC (for can-i): no workloads on the shared API server. Removed afterwards."""
    require_binary("kubectl")
    apply_crds(kubeconfig)
    kubectl(kubeconfig, "wait", "--for=condition=Established", "crd/clusterkopfpeerings.kopf.dev", "--timeout=60s")
    docs = [d for d in yaml.safe_load_all(build("base")) if d]
    namespaces = [d for d in docs if d["kind"] == "Namespace"]
    assert sorted(d["metadata"]["name"] for d in namespaces) == sorted(NAMESPACES)
    rbac = [d for d in docs if d["kind"] in RBAC_KINDS]
    kubectl(kubeconfig, "apply", "-f", "-", stdin=yaml.safe_dump_all(namespaces + rbac))
    try:
        yield kubeconfig
    finally:
        cluster_scoped = [d for d in rbac if d["kind"].startswith("Cluster")]
        kubectl(kubeconfig, "delete", "--ignore-not-found", "-f", "-", stdin=yaml.safe_dump_all(cluster_scoped))
        kubectl(kubeconfig, "delete", "namespace", "--ignore-not-found", "--wait=true", "--timeout=90s",
                *NAMESPACES)


@pytest.mark.parametrize("path", BUILDS)
def test_every_build_passes_a_server_side_dry_run(installed: str, path: str) -> None:
    out = kubectl(installed, "apply", "--dry-run=server", "-f", "-", stdin=for_1_20(build(path)))
    kinds = {line.split("/", 1)[0] for line in out.splitlines()}
    assert {"deployment.apps", "daemonset.apps", "service", "poddisruptionbudget.policy", "configmap",
            "role.rbac.authorization.k8s.io", "clusterrole.rbac.authorization.k8s.io", "namespace",
            "serviceaccount", "priorityclass.scheduling.k8s.io"} <= kinds, out


def test_the_crds_pass_a_server_side_dry_run(installed: str) -> None:
    kubectl(installed, "apply", "--dry-run=server", "-f", str(REPO / "crds"))


def test_top_level_deploy_is_the_base() -> None:
    assert build("") == build("base")


def _objects(path: str) -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(build(path)) if d}


def test_overlays_change_what_they_say_and_nothing_else() -> None:
    base = _objects("base")
    lb = _objects("overlays/loadbalancer")
    assert lb[("Service", "clustermesh-store")]["spec"]["type"] == "LoadBalancer"
    assert base[("Service", "clustermesh-store")]["spec"]["type"] == "NodePort"

    def env(objs: dict[tuple[str, str], dict[str, Any]], name: str) -> str:
        ds = objs[("DaemonSet", "clustermesh-agent")]["spec"]["template"]["spec"]["containers"][0]
        return str(next(e.get("value", "") for e in ds["env"] if e["name"] == name))

    assert env(base, "CLUSTERMESH_ROUTES") == "off"
    assert env(_objects("overlays/kind"), "CLUSTERMESH_ROUTES") == "host"
    lab = _objects("overlays/lab")
    agent = lab[("DaemonSet", "clustermesh-agent")]["spec"]["template"]["spec"]["containers"][0]
    assert "--cgroup=/run/clustermesh/cgroupv2/clustermesh-lab-$(LAB_TAG)/$(NODE_NAME)" in agent["args"]
    assert lab[("PodDisruptionBudget", "clustermesh-store")]["apiVersion"] == "policy/v1beta1"
    for kind_name in base:
        assert kind_name in lab or kind_name[0] == "ConfigMap"  # generated names carry a content hash


def test_the_agent_is_not_privileged_and_gets_its_node_name() -> None:
    ds = _objects("base")[("DaemonSet", "clustermesh-agent")]["spec"]["template"]["spec"]
    assert ds["hostNetwork"] is True
    container = ds["containers"][0]
    ctx = container["securityContext"]
    assert not ctx.get("privileged")
    assert set(ctx["capabilities"]["add"]) >= {"BPF", "NET_ADMIN", "SYS_ADMIN", "PERFMON"}
    env = {e["name"]: e for e in container["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/sys/fs/bpf", "/run/clustermesh/cgroupv2"} <= mounts
    assert {"operator": "Exists"} in ds["tolerations"]


def can_i(kubeconfig: str, who: str, *args: str) -> bool:
    res = subprocess.run(["kubectl", "--kubeconfig", kubeconfig, "auth", "can-i", f"--as={who}", *args],
                         capture_output=True, text=True, timeout=30)
    assert res.stdout.strip() in ("yes", "no"), res.stderr
    return res.stdout.strip() == "yes"


REMOTES = ["-n", "clustermesh-remotes"]
SYSTEM = ["-n", "clustermesh-system"]
LEASES = "leases.coordination.k8s.io"
MESH = "clustermeshes.clustermesh.io"
SLICES = "endpointslices.discovery.k8s.io"
EXPORTS = "serviceexports.multicluster.x-k8s.io"
IMPORTS = "serviceimports.multicluster.x-k8s.io"

OPERATOR_MAY = [
    ("list", "services"), ("watch", "services"), ("list", "nodes"), ("watch", "nodes"),
    ("list", SLICES), ("watch", SLICES), ("get", f"{MESH}/default"), ("watch", MESH),
    ("patch", f"{MESH}/default", "--subresource=status"),
    ("get", "secrets/clustermesh-remote-cluster-2", *REMOTES),
    ("create", LEASES, *SYSTEM), ("get", f"{LEASES}/clustermesh-operator", *SYSTEM),
    ("update", f"{LEASES}/clustermesh-operator", *SYSTEM),
    ("list", "customresourcedefinitions.apiextensions.k8s.io"), ("create", "events", "-n", "default"),
    # MCS-API: exports read and their conditions written; imports, derived Services and their slices kept.
    ("list", EXPORTS), ("watch", EXPORTS), ("patch", EXPORTS, "--subresource=status"),
    ("create", IMPORTS), ("update", IMPORTS, "--subresource=status"), ("delete", IMPORTS),
    ("create", "services"), ("patch", "services"), ("delete", "services"),
    ("create", SLICES), ("update", SLICES), ("delete", SLICES), ("list", "namespaces"),
]
OPERATOR_MAY_NOT = [
    ("create", EXPORTS), ("update", EXPORTS), ("delete", EXPORTS),
    ("create", "namespaces"), ("delete", "namespaces"),
    ("get", "secrets", "-n", "kube-system"), ("get", "secrets", "-n", "clustermesh-system"),
    ("create", "secrets", *REMOTES), ("update", "secrets", *REMOTES), ("list", "secrets", *REMOTES),
    ("patch", f"{MESH}/default"), ("create", MESH), ("delete", f"{MESH}/default"),
    ("patch", "nodes"), ("patch", "clusterkopfpeerings.kopf.dev/clustermesh"),
    ("update", f"{LEASES}/other", *SYSTEM), ("create", LEASES, "-n", "kube-system"),
    ("delete", f"{LEASES}/clustermesh-operator", *SYSTEM),
]
AGENT_MAY = [
    ("list", "services"), ("watch", "services"), ("list", SLICES), ("watch", SLICES),
    ("get", f"{MESH}/default"), ("list", MESH), ("watch", MESH),
    ("get", "secrets/clustermesh-access-local-agents", *SYSTEM),
    ("list", "nodes"), ("watch", "nodes"),
]
AGENT_MAY_NOT = [
    ("create", "services"), ("update", "services"), ("patch", "services"), ("delete", "services"),
    ("get", "secrets", "-n", "kube-system"), ("get", "secrets", "-n", "clustermesh-system"),
    ("get", "secrets/clustermesh-store-tls", *SYSTEM), ("list", "secrets", *SYSTEM),
    # With the cache (the base), no remote's credentials: deploy/overlays/direct grants these.
    ("get", "secrets/clustermesh-remote-cluster-2", *REMOTES), ("watch", "secrets", *REMOTES),
    ("create", "secrets", *REMOTES), ("update", "secrets", *REMOTES), ("delete", "secrets", *REMOTES),
    ("patch", f"{MESH}/default", "--subresource=status"), ("patch", f"{MESH}/default"),
    ("patch", "nodes"), ("create", "events", "-n", "default"), ("patch", "clusterkopfpeerings.kopf.dev/clustermesh"),
]


@pytest.mark.parametrize(("who", "allowed", "checks"), [
    (OPERATOR, True, OPERATOR_MAY), (OPERATOR, False, OPERATOR_MAY_NOT),
    (AGENT, True, AGENT_MAY), (AGENT, False, AGENT_MAY_NOT),
], ids=["operator-may", "operator-may-not", "agent-may", "agent-may-not"])
def test_rbac_is_what_each_component_needs(installed: str, who: str, allowed: bool,
                                           checks: list[tuple[str, ...]]) -> None:
    wrong = [" ".join(check) for check in checks if can_i(installed, who, *check) != allowed]
    assert wrong == [], f"{who} {'refused' if allowed else 'allowed'}: {wrong}"


def service_account_kubeconfig(kubeconfig: str, account: str, folder: Path) -> str:
    """A kubeconfig that authenticates as ``clustermesh-system/<account>`` with its token (the
    1.20 token controller's Secret), to run our own client code under the component's RBAC."""
    deadline = time.monotonic() + 60
    while True:
        names = kubectl(kubeconfig, "-n", "clustermesh-system", "get", "serviceaccount", account,
                        "-o", "jsonpath={.secrets[*].name}").split()
        if names or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert names, f"no token Secret for {account}: is the controller-manager's token controller running?"
    token = base64.b64decode(kubectl(kubeconfig, "-n", "clustermesh-system", "get", "secret", names[0],
                                     "-o", "jsonpath={.data.token}")).decode()
    admin = yaml.safe_load(Path(kubeconfig).read_text())
    config = {"apiVersion": "v1", "kind": "Config", "clusters": admin["clusters"][:1],
              "users": [{"name": account, "user": {"token": token}}],
              "contexts": [{"name": account, "context": {"cluster": admin["clusters"][0]["name"], "user": account}}],
              "current-context": account}
    path = folder / f"{account}.kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_the_agent_reads_a_remote_through_the_cache_with_its_own_rights_and_nothing_else(
        installed: str, tmp_path: Path) -> None:
    """With spec.cache (deploy/'s default) an agent reads remote cluster-2 from its own cluster's
    store, as the local-agents reader `clustermesh certs` made: agent/remote.py through a client that
    is the agent's ServiceAccount reads that Secret, and no remote's."""
    from clustermesh.agent.agent import read_from

    docs = {d.name: d for d in make_secrets(CertsConfig("cluster-1"), tmp_path / "pki")}
    access = docs["clustermesh-access-local-agents"]
    kubectl(installed, "apply", "-f", "-", stdin=yaml.safe_dump(access.manifest()))
    kube = KubeClient(service_account_kubeconfig(installed, "clustermesh-agent", tmp_path))
    entry = {"name": "cluster-2", "id": 2, "endpoints": ["https://172.18.0.3:32391"],
             "tls": {"secretName": "clustermesh-remote-cluster-2", "secretNamespace": "clustermesh-remotes"}}
    spec = {"cache": {"enabled": True}, "clusters": [entry]}
    config = remote_config_from_spec(kube, read_from(entry, spec), tmp_path / "agent", "kube-system")
    assert (config.name, config.user, config.password) == (
        "cluster-2", "local-agents", access.data["password"].decode())
    assert config.endpoints == ("https://clustermesh-store.clustermesh-system.svc:2379",)
    assert config.cert_file and Path(config.cert_file).read_bytes() == access.data["tls.crt"]
    with pytest.raises(KubeError, match="403"):  # direct mode's Secret: not with the cache
        remote_config_from_spec(kube, entry, tmp_path / "agent", "kube-system")
    # RBAC answers before the lookup: 403 whether or not the Secret exists.
    for namespace, name in (("kube-system", "any"), ("clustermesh-system", "clustermesh-store-tls")):
        with pytest.raises(KubeError, match="403"):
            kube.get_secret(namespace, name)


# ----------------------------------------------------------------- the store pod's script


class StorePod:
    """deploy/base/store.sh as the store pod runs it, with the pod's mounts as folders and the
    Secrets' content from `clustermesh certs` (as the kubelet would project them)."""

    def __init__(self, root: Path, readers: tuple[str, ...]) -> None:
        self.root = root
        self.pki = root / "pki"
        self.tls, self.users = root / "tls", root / "users"
        self.ports = {name: free_port() for name in ("client", "init", "peer", "metrics", "proxy", "proxy_metrics")}
        self.env = {
            **os.environ, "STORE_TLS_DIR": str(self.tls), "STORE_USERS_DIR": str(self.users),
            "STORE_DATA_DIR": str(root / "data"), "STORE_CLIENT_PORT": str(self.ports["client"]),
            "STORE_INIT_PORT": str(self.ports["init"]),
            "STORE_PEER_PORT": str(self.ports["peer"]), "STORE_METRICS_ADDR": f"127.0.0.1:{self.ports['metrics']}",
            "PROXY_LISTEN_ADDR": f"127.0.0.1:{self.ports['proxy']}",
            "PROXY_METRICS_ADDR": f"127.0.0.1:{self.ports['proxy_metrics']}", "SYNC_INTERVAL": "1",
        }
        self.processes: list[subprocess.Popen[bytes]] = []
        self.write_secrets(readers)

    def write_secrets(self, readers: tuple[str, ...], rotate: bool = False) -> dict[str, dict[str, bytes]]:
        docs = {d.name: d.data for d in make_secrets(CertsConfig("cluster-1", readers=readers), self.pki, rotate)}
        for folder, name in ((self.tls, "clustermesh-store-tls"), (self.users, "clustermesh-store-users")):
            # As the kubelet updates a mounted Secret: every file of a version at once.
            write_projected(folder, docs[name])
        return docs

    def project(self, kube: KubeClient, namespace: str = "clustermesh-system") -> None:
        """Mount the Secrets as they are on the API server, as the kubelet refreshes them."""
        for folder, name in ((self.tls, "clustermesh-store-tls"), (self.users, "clustermesh-store-users")):
            state = kube.read_secret(namespace, name)
            assert state is not None, name
            write_projected(folder, state.data)

    def script(self, mode: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["sh", str(DEPLOY / "base" / "store.sh"), mode], env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def start(self, mode: str) -> None:
        log = (self.root / f"{mode}.log").open("wb")
        # A session of its own: stop() ends the script and whatever it started (etcd, an etcdctl waiting
        # on a store that is gone).
        self.processes.append(subprocess.Popen(["sh", str(DEPLOY / "base" / "store.sh"), mode], env=self.env,
                                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def stop(self) -> None:
        for proc in reversed(self.processes):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the rest of its group, if any is left
            proc.wait()

    def root_client(self) -> KVClient:
        return KVClient(Endpoint.parse(f"https://127.0.0.1:{self.ports['client']}", str(self.tls / "ca.crt"),
                                       str(self.tls / "root.crt"), str(self.tls / "root.key")), timeout=5)

    def reader(self, access: dict[str, bytes], password: bytes | None = None) -> KVClient:
        """A remote agent's client, built from the access Secret the way agent/remote.py uses it."""
        folder = self.root / f"access-{access['username'].decode()}"
        folder.mkdir(exist_ok=True)
        for key in ("ca.crt", "tls.crt", "tls.key"):
            (folder / key).write_bytes(access[key])
        endpoint = Endpoint.parse(f"https://127.0.0.1:{self.ports['proxy']}", str(folder / "ca.crt"),
                                  str(folder / "tls.crt"), str(folder / "tls.key"))
        return KVClient(endpoint, timeout=5, user=access["username"].decode(),
                        password=(password or access["password"]).decode())


@pytest.fixture
def store_pod(tmp_path: Path) -> Iterator[StorePod]:
    require_binary("etcd")
    require_binary("etcdctl", "run scripts/setup.sh (Debian package etcd-client)")
    pod = StorePod(tmp_path, ("cluster-2", "cluster-3"))
    try:
        yield pod
    finally:
        pod.stop()


def _reads(client: KVClient, key: str, value: str) -> bool:
    return client.get(key) == value


def _wait_for(check: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except KVStoreError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.3)


def test_store_script_gives_each_reader_read_only_access_through_the_proxy(store_pod: StorePod) -> None:
    store_pod.start("etcd")  # enables auth itself before it serves on the port the proxy uses
    store_pod.start("sync")  # adds the readers; the proxy opens only after that
    store_pod.start("proxy")
    access = store_pod.write_secrets(("cluster-2", "cluster-3"))  # a re-run changes nothing
    with store_pod.root_client() as root:
        def written() -> bool:
            root.put("cilium/state/services/v1/cluster-1/ns/svc", "{}")
            return True

        _wait_for(written, "etcd as root")
        root.put("private/key", "no")
    for reader in ("cluster-2", "cluster-3"):
        with store_pod.reader(access[f"clustermesh-access-{reader}"]) as remote:
            _wait_for(partial(_reads, remote, "cilium/state/services/v1/cluster-1/ns/svc", "{}"), "the proxy")
            with pytest.raises(KVStoreError, match=r"(?i)permission"):
                remote.put("cilium/state/services/v1/cluster-1/ns/svc", "tampered")
            with pytest.raises(KVStoreError, match=r"(?i)permission"):
                remote.get("private/key")
    # Without auth on, the proxy's own certificate would be etcd's root: init must have enabled it.
    with store_pod.reader(access["clustermesh-access-cluster-2"], password=b"wrong") as intruder, \
            pytest.raises(KVStoreError, match="authentication failed"):
        intruder.get("cilium/state/services/v1/cluster-1/ns/svc")


def test_store_script_applies_rotated_passwords_and_removed_readers_live(store_pod: StorePod) -> None:
    res = store_pod.script("init")  # and again when etcd starts: a restarted container finds its data
    assert res.returncode == 0, res.stderr
    store_pod.start("etcd")
    store_pod.start("proxy")
    old = store_pod.write_secrets(("cluster-2", "cluster-3"))
    store_pod.start("sync")
    new = store_pod.write_secrets(("cluster-2",), rotate=True)  # cluster-3 revoked, cluster-2 rotated
    assert new["clustermesh-access-cluster-2"]["password"] != old["clustermesh-access-cluster-2"]["password"]

    def read(access: dict[str, bytes]) -> str:
        """"ok", "refused" (etcd said the login is wrong: the one answer that proves a refusal), or the
        error (a store that is away proves nothing)."""
        with store_pod.reader(access) as client:
            try:
                client.get("cilium/.heartbeat")
                return "ok"
            except KVStoreError as exc:
                return "refused" if "authentication failed" in str(exc) else str(exc)

    _wait_for(lambda: read(new["clustermesh-access-cluster-2"]) == "ok", "the rotated password")
    _wait_for(lambda: read(old["clustermesh-access-cluster-3"]) == "refused", "the removed reader to be refused")
    assert read(old["clustermesh-access-cluster-2"]) == "refused"


class Watcher:
    """A remote agent's watch of one prefix, as its WatchStore keeps it: events are kept in order, and a
    stream that breaks is opened again from the revision after the last one seen, so nothing is lost.
    What it cannot get over is a stream that stays open and says nothing."""

    def __init__(self, client: KVClient, prefix: str, after: int) -> None:
        self.client, self.prefix = client, prefix
        self.next_revision = after + 1
        self.values: list[str] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        try:
            self._watch = client.watch_prefix(prefix)  # registered with the proxy before this returns
        except KVStoreError:
            client.close()
            raise
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        watch: Watch | None = self._watch
        while not self._stop.is_set():
            try:
                if watch is None:
                    watch = self._watch = self.client.watch_prefix(self.prefix, start_revision=self.next_revision)
                for event in watch:
                    if event.revision >= self.next_revision:
                        self.values.append(event.value or "")
                        self.next_revision = event.revision + 1
            except KVStoreError as exc:
                self.errors.append(str(exc))
                self._stop.wait(0.2)
            watch = None

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(Exception):
            self._watch.cancel()
        self.client.close()
        self._thread.join(10)


def test_watches_through_the_proxy_keep_delivering_after_a_password_rotation(store_pod: StorePod) -> None:
    """etcd 3.4's grpc-proxy, once a reader's password changed, stopped delivering a range's events to
    every watcher of that range when another watcher joined: open streams, no events, no error, until
    the proxy process was restarted (what `certs --rotate` followed by a new reader did to the lab).
    store.sh restarts the proxy when the readers change; every watcher must get every put."""
    store_pod.start("etcd")
    store_pod.start("sync")
    store_pod.start("proxy")
    old = store_pod.write_secrets(("cluster-2", "cluster-3"))
    prefix = "cilium/state/services/v1/cluster-1/"
    with contextlib.ExitStack() as stack:
        root = stack.enter_context(store_pod.root_client())
        _wait_for(lambda: root.put(prefix + "a", "a") is None, "etcd as root")
        reader = stack.enter_context(store_pod.reader(old["clustermesh-access-cluster-2"]))
        _wait_for(partial(_reads, reader, prefix + "a", "a"), "the proxy")
        before = Watcher(store_pod.reader(old["clustermesh-access-cluster-2"]), prefix, root.revision())
        stack.callback(before.close)

        new = store_pod.write_secrets(("cluster-2", "cluster-3"), rotate=True)

        def logs_in(access: dict[str, bytes]) -> bool:
            with store_pod.reader(access) as client:
                return client.get(prefix + "a") == "a"

        for peer in ("cluster-2", "cluster-3"):
            _wait_for(partial(logs_in, new[f"clustermesh-access-{peer}"]), f"{peer}'s new password")
        watchers: dict[str, Watcher] = {}
        for name, peer in (("b", "cluster-2"), ("c", "cluster-3"), ("d", "cluster-2")):
            # Each joins as a new agent would (its own connection), then something changes.
            after = root.revision()
            holder: list[Watcher] = []

            def joined(peer: str = peer, after: int = after, holder: list[Watcher] = holder) -> bool:
                holder.append(Watcher(store_pod.reader(new[f"clustermesh-access-{peer}"]), prefix, after))
                return True

            _wait_for(joined, f"watcher {name} to be created")
            watchers[name] = holder[-1]
            stack.callback(watchers[name].close)
            root.put(prefix + name, name)
            for seen, watcher in watchers.items():
                deadline = time.monotonic() + 15
                while name not in watcher.values and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert name in watcher.values, (
                    f"watcher {seen} never got {name!r} (got {watcher.values}, errors {watcher.errors[-3:]})")
        for seen, watcher in watchers.items():
            assert watcher.values == [n for n in "bcd" if n >= seen], (seen, watcher.values)


# ----------------------------------------------------------------- one identity per peer, revocation


def etcdctl(pod: StorePod, access: dict[str, bytes], *args: str,
            login: bool = True) -> subprocess.CompletedProcess[str]:
    """etcdctl through the store's grpc-proxy with a peer's certificate, and its login unless not ``login``."""
    folder = pod.root / f"ctl-{access['username'].decode()}"
    folder.mkdir(exist_ok=True)
    for key in ("ca.crt", "tls.crt", "tls.key"):
        (folder / key).write_bytes(access[key])
    argv = ["etcdctl", f"--endpoints=https://127.0.0.1:{pod.ports['proxy']}", f"--cacert={folder / 'ca.crt'}",
            f"--cert={folder / 'tls.crt'}", f"--key={folder / 'tls.key'}", "--dial-timeout=2s",
            "--command-timeout=3s"]
    if login:
        argv.append(f"--user={access['username'].decode()}:{access['password'].decode()}")
    argv += args
    try:
        return subprocess.run(argv, env={**os.environ, "ETCDCTL_API": "3"}, capture_output=True, text=True,
                              timeout=2)  # what is allowed answers in well under a second
    except subprocess.TimeoutExpired as exc:
        # `lease list` has no deadline in etcdctl 3.4: a refused handshake is retried until killed.
        return subprocess.CompletedProcess(argv, -9, exc.stdout or "", exc.stderr or "")


@pytest.fixture
def peers(kubeconfig: str, store_pod: StorePod) -> Iterator[KubeClient]:
    """cluster-1's store Secrets (from `clustermesh certs`) and three ClusterMesh objects standing for
    cluster-1 and its peers cluster-2 and cluster-3, on the shared API server; removed afterwards."""
    from tests.integration.test_connect import mesh
    from tests.kubectl import apply_object

    apply_crds(kubeconfig)
    kube = KubeClient(kubeconfig)
    for namespace in NAMESPACES:
        kube.ensure_namespace(namespace)
    docs = make_secrets(CertsConfig("cluster-1"), store_pod.pki)
    for doc in docs:
        kube.put_secret(doc.namespace, doc.name, doc.data, labels=doc.labels)
    for cid in (1, 2, 3):
        apply_object(kubeconfig, mesh(f"cluster-{cid}", f"cluster-{cid}", cid, access=False))
        kubectl(kubeconfig, "patch", "clustermesh", f"cluster-{cid}", "--type", "merge", "-p",
                json.dumps({"spec": {"access": {"endpoints": [f"https://127.0.0.1:{store_pod.ports['proxy']}"]}}}))
    try:
        yield kube
    finally:
        for cid in (1, 2, 3):
            kubectl(kubeconfig, "delete", "clustermesh", f"cluster-{cid}", "--ignore-not-found")
        kubectl(kubeconfig, "-n", "clustermesh-system", "delete", "secret", "--ignore-not-found",
                "clustermesh-store-tls", "clustermesh-store-users", "clustermesh-access-cluster-2",
                "clustermesh-access-cluster-3")
        kubectl(kubeconfig, "-n", "clustermesh-remotes", "delete", "secret", "--ignore-not-found",
                "clustermesh-remote-cluster-1")


def test_each_peer_gets_its_own_reader_and_a_revoked_one_is_shut_out(store_pod: StorePod, peers: KubeClient) -> None:
    from clustermesh.connect import connect, load_side, revoke

    kube = peers
    access: dict[str, dict[str, bytes]] = {}
    for peer in ("cluster-2", "cluster-3"):
        # The peer reads cluster-1: it gets a reader of its own in cluster-1's store, copied to it.
        connect(load_side(kube, peer), load_side(kube, "cluster-1", store_pod.pki), both_ways=False)
        access[peer] = kube.get_secret("clustermesh-remotes", "clustermesh-remote-cluster-1")
    two, three = access["cluster-2"], access["cluster-3"]
    assert (two["username"], three["username"]) == (b"cluster-2", b"cluster-3")
    assert two["password"] != three["password"] and two["tls.crt"] != three["tls.crt"]
    assert two["tls.key"] != three["tls.key"]

    store_pod.project(kube)
    store_pod.start("etcd")
    store_pod.start("sync")
    store_pod.start("proxy")
    key = "cilium/state/services/v1/cluster-1/ns/svc"
    with store_pod.root_client() as root:
        _wait_for(lambda: root.put(key, "{}") is None, "etcd as root")
        lease = root.grant_lease(600)
        root.put(key, "{}", lease=lease)
        root.put("private/leased", "no", lease=lease)  # outside cilium/: CVE-2023-32082 listed it
    held = store_pod.reader(two)  # an open connection from before the revocation
    for peer in ("cluster-2", "cluster-3"):
        _wait_for(lambda peer=peer: etcdctl(store_pod, access[peer], "get", key).returncode == 0, f"{peer} reads")
    assert held.get(key) == "{}"
    # The proxy's cache now holds this range: a client it serves from there is never asked for a login.
    assert etcdctl(store_pod, three, "get", "--consistency=s", key).returncode == 0

    changed = revoke(load_side(kube, "cluster-1", store_pod.pki), "cluster-2")
    assert any("CRL" in line for line in changed), changed
    assert kube.read_secret("clustermesh-system", "clustermesh-access-cluster-2") is None
    store_pod.project(kube)  # the kubelet's refresh of the store pod's volumes
    _wait_for(lambda: etcdctl(store_pod, two, "get", key).returncode != 0, "cluster-2 to be refused")

    # cluster-3 fills the (restarted) proxy's cache again.
    assert etcdctl(store_pod, three, "get", "--consistency=s", key).returncode == 0
    for what, args in (("linearizable read", ("get", key)),
                       ("serializable read (the proxy's cache)", ("get", "--consistency=s", key)),
                       ("lease grant", ("lease", "grant", "600")),
                       ("lease list", ("lease", "list")),
                       ("lease keys", ("lease", "timetolive", f"{lease:x}", "--keys"))):
        for login in (True, False):  # with its password, and with the certificate alone
            res = etcdctl(store_pod, two, *args, login=login)
            assert res.returncode != 0, f"revoked cluster-2 (login {login}) still has {what}: {res.stdout}"
            assert "private/leased" not in res.stdout
    with pytest.raises(KVStoreError):
        held.get(key)  # its open connection is closed too, and it cannot open another
    held.close()
    # The other peer keeps reading, also from the cache.
    assert etcdctl(store_pod, three, "get", key).returncode == 0
    assert etcdctl(store_pod, three, "get", "--consistency=s", key).returncode == 0


def _mounted_items(pod_spec: dict[str, Any], container: dict[str, Any]) -> set[str]:
    """Every Secret key a container can read ("<secret>/<key>"; "<secret>/*" for a whole Secret), and
    "token" when a service-account token reaches it."""
    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    out: set[str] = set()
    if pod_spec.get("automountServiceAccountToken", True) is not False:
        out.add("token")
    for mount in container.get("volumeMounts", []):
        vol = volumes[mount["name"]]
        sources = [vol] if "secret" in vol else [
            {**src} for src in (vol.get("projected") or {}).get("sources", [])]
        for src in sources:
            if "serviceAccountToken" in src:
                out.add("token")
            if "secret" in src:
                secret = src["secret"]
                name = secret.get("secretName") or secret.get("name")
                items = secret.get("items")
                out |= {f"{name}/{i['key']}" for i in items} if items else {f"{name}/*"}
    return out


def test_the_store_pod_mounts_each_secret_item_only_where_it_is_used() -> None:
    docs = [d for d in yaml.safe_load_all(build("")) if d]
    store = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "clustermesh-store")
    pod = store["spec"]["template"]["spec"]
    mounted = {c["name"]: _mounted_items(pod, c) for c in pod["containers"]}
    root_key = "clustermesh-store-tls/root.key"
    assert {name for name, items in mounted.items() if root_key in items} == {"etcd-users", "operator"}
    users = {name for name, items in mounted.items()
             if any(i.startswith("clustermesh-store-users/") for i in items)}
    assert users == {"etcd-users"}
    assert {name for name, items in mounted.items() if "token" in items} == {"operator"}
    assert not any(i.startswith("clustermesh-store-ca/") for items in mounted.values() for i in items)
    assert mounted["grpc-proxy"] == {f"clustermesh-store-tls/{k}" for k in (
        "ca.crt", "crl.pem", "proxy.crt", "proxy.key", "proxy-backend.crt", "proxy-backend.key")}
    for container in pod["containers"]:
        for mount in container.get("volumeMounts", []):
            vol = next(v for v in pod["volumes"] if v["name"] == mount["name"])
            if "secret" in vol or "projected" in vol:
                assert mount.get("readOnly") is True, (container["name"], mount["name"])
                assert (vol.get("secret") or vol.get("projected"))["defaultMode"] == 0o400, vol["name"]
    # Nothing else in deploy/ that does not call the API server holds a token.
    for doc in docs:
        if doc["kind"] in ("Deployment", "DaemonSet", "CronJob"):
            spec = doc["spec"]["template"]["spec"] if doc["kind"] != "CronJob" else \
                doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
            assert spec.get("automountServiceAccountToken") is not None, doc["metadata"]["name"]


def test_certs_never_removes_a_reader_it_did_not_make(kubeconfig: str, tmp_path: Path) -> None:
    """A reader connect made from another copy of the CA (say the in-cluster one) stays when certs runs
    from a folder that does not know it: removing a reader is revoke's job (it also puts it on the CRL)."""
    kube = KubeClient(kubeconfig)
    kube.ensure_namespace("clustermesh-system")
    kube.put_secret("clustermesh-system", "clustermesh-store-users", {"cluster-9": b"made-elsewhere"})
    try:
        res = subprocess.run([sys.executable, "-m", "clustermesh.cli", "certs", "--cluster", "cluster-1",
                              "--pki-dir", str(tmp_path / "pki"), "--reader", "cluster-2", "--kubeconfig", kubeconfig],
                             capture_output=True, text=True, timeout=120, cwd=REPO)
        assert res.returncode == 0, res.stderr
        assert "kept reader cluster-9" in res.stderr
        users = kube.get_secret("clustermesh-system", "clustermesh-store-users")
        assert users["cluster-9"] == b"made-elsewhere"
        assert set(users) == {"cluster-2", "cluster-9", "local-agents"}
    finally:
        kubectl(kubeconfig, "-n", "clustermesh-system", "delete", "secret", "--ignore-not-found",
                "clustermesh-store-users", "clustermesh-store-tls", "clustermesh-access-cluster-2",
                "clustermesh-access-local-agents")
