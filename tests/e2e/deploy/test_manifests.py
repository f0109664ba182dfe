"""The lab running what users apply: `clustermesh lab up` (--from-manifests, the default) installs the mesh with
deploy/ (clustermesh certs, kubectl apply -k deploy/overlays/lab, connect) and the lab's kubelet runs
the store Deployment and the agent DaemonSet as Pods; the lab starts no operator or agent itself.

The package's lab has three clusters: lab-1 and lab-2 with the cache (the default), lab-3 in direct mode
(``--direct lab-3``); these tests use lab-1 and lab-2, and check lab-3's mode."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import pytest

from tests.e2e import test_lab as lab_tests
from tests.e2e.test_lab import REPO, Lab, _failover, _lab_pids, apply_demo
from tests.waiting import eventually

SYSTEM = ("-n", "clustermesh-system")


@pytest.fixture(scope="module")
def lab(deploy_lab: Lab) -> Lab:
    return deploy_lab  # the package's lab (conftest.py): test_store_chaos.py breaks it next


def components(lab: Lab, context: str) -> dict[str, dict]:
    return {p["metadata"]["name"]: p for p in lab.json(context, "get", "pods", *SYSTEM)["items"]}


def _running_and_ready(pod: dict) -> None:
    conditions = {c["type"]: c["status"] for c in pod["status"].get("conditions", [])}
    assert pod["status"]["phase"] == "Running" and conditions.get("Ready") == "True", pod["status"]


def test_the_mesh_runs_as_pods_from_deploy(lab: Lab) -> None:
    for context in ("lab-1", "lab-2"):
        pods = components(lab, context)
        nodes = len(lab.json(context, "get", "nodes")["items"])
        # An agent per node, and deploy/'s two store replicas (HA by default).
        assert sorted("-".join(n.split("-")[:2]) for n in pods) == \
            ["clustermesh-agent"] * nodes + ["clustermesh-store"] * 2, pods
        for pod in pods.values():
            _running_and_ready(pod)
        agent = next(p for n, p in pods.items() if n.startswith("clustermesh-agent"))
        assert agent["spec"]["hostNetwork"] and agent["status"]["podIP"] == agent["status"]["hostIP"]
        for store in (p for n, p in pods.items() if n.startswith("clustermesh-store")):
            assert {c["name"] for c in store["status"]["containerStatuses"]} == {
                "etcd", "etcd-users", "grpc-proxy", "operator"}
        assert "2/2" in lab.kubectl(context, "-n", "clustermesh-system", "get", "deploy", "clustermesh-store")
    # What runs is what deploy/ says: the lab itself started no operator and no agent.
    assert _lab_pids(lab, "clustermesh.cli operator") == [] and _lab_pids(lab, "clustermesh.cli agent") == []
    status = lab.json("lab-1", "get", "clustermesh", "default")["status"]
    assert [(r["name"], r["ready"]) for r in status["remotes"]] == [("lab-2", True), ("lab-3", True)], status


def test_agents_read_the_remotes_from_their_own_store_which_caches_them(lab: Lab) -> None:
    """The lab's ClusterMesh has spec.cache: lab-1's store pods copy lab-2 into lab-1's etcd (Cilium's
    KVStoreMesh layout) and lab-1's agents read it there, holding no remote's credentials."""
    script = ("ETCDCTL_API=3 etcdctl --endpoints=https://127.0.0.1:12379 --cacert=/etc/clustermesh/tls/ca.crt "
              "--cert=/etc/clustermesh/tls/root.crt --key=/etc/clustermesh/tls/root.key "
              "get --prefix --keys-only cilium/")
    keys = set(lab.kubectl("lab-1", "exec", *SYSTEM, "deploy/clustermesh-store", "-c", "etcd-users", "--",
                           "sh", "-c", script).split())
    assert "cilium/cluster-config/lab-2" in keys
    assert {"cilium/synced/lab-2/cilium/cache/services/v1", "cilium/synced/lab-2/cilium/cache/nodes/v1"} <= keys
    assert any(k.startswith("cilium/cache/nodes/v1/lab-2/") for k in keys), sorted(keys)
    logs = lab.kubectl("lab-1", "logs", *SYSTEM, "ds/clustermesh-agent")
    assert "[remote lab-2] records are read from a KVStoreMesh cache" in logs, logs[-2000:]
    agent = "system:serviceaccount:clustermesh-system:clustermesh-agent"
    for args in (("get", "secrets", "-n", "clustermesh-remotes"), ("list", "secrets", "-n", "clustermesh-remotes")):
        assert lab.kubectl("lab-1", "auth", "can-i", *args, "--as", agent, check=False).strip().startswith("no")


def test_agents_in_direct_mode_read_each_remote_store_with_its_secret(lab: Lab) -> None:
    """lab-3 runs without the cache (deploy/direct, ClusterMesh spec.cache off): its agents read lab-2's
    store themselves, with the Secret connect copied into clustermesh-remotes, and may read it."""
    spec = lab.json("lab-3", "get", "clustermesh", "default")["spec"]
    assert not (spec.get("cache") or {}).get("enabled"), spec
    logs = lab.kubectl("lab-3", "logs", *SYSTEM, "ds/clustermesh-agent")
    assert "records are read from a KVStoreMesh cache" not in logs, logs[-2000:]
    agent = "system:serviceaccount:clustermesh-system:clustermesh-agent"
    assert lab.kubectl("lab-3", "auth", "can-i", "get", "secrets", "-n", "clustermesh-remotes", "--as", agent,
                       check=False).strip() == "yes"
    status = lab.json("lab-3", "get", "clustermesh", "default")["status"]
    assert [(r["name"], r["ready"]) for r in status["remotes"]] == [("lab-1", True), ("lab-2", True)], status


def test_star_wars_fails_over_without_a_failed_request(lab: Lab) -> None:
    apply_demo(lab)
    lab_tests.test_scale_to_zero_fails_over_without_a_failed_request(lab)


def test_a_deleted_agent_pod_comes_back_and_no_request_fails(lab: Lab) -> None:
    before = sorted(n for n in components(lab, "lab-1") if n.startswith("clustermesh-agent"))
    old = before[0]

    def replaced() -> None:
        agents = {n: p for n, p in components(lab, "lab-1").items() if n.startswith("clustermesh-agent")}
        assert old not in agents and len(agents) == len(before), sorted(agents)
        for pod in agents.values():
            _running_and_ready(pod)

    _failover(
        lab,
        lambda: lab.kubectl("lab-1", "delete", "pod", *SYSTEM, old, "--wait=false"),
        lambda: eventually(replaced, timeout=120, interval=1),
        only_remote_for=0,
    )


def _store_login(lab: Lab, context: str, password: str) -> str:
    """etcd's answer to a login as lab-1's reader, asked inside the store pod (the container that holds
    a client certificate etcd itself accepts)."""
    script = ("ETCDCTL_API=3 etcdctl --endpoints=https://127.0.0.1:12379 --cacert=/etc/clustermesh/tls/ca.crt "
              "--cert=/etc/clustermesh/tls/root.crt --key=/etc/clustermesh/tls/root.key "
              f"--user=lab-1:{password} get --keys-only cilium/cluster-config/lab-2 2>&1 || true")
    return lab.kubectl(context, "exec", *SYSTEM, "deploy/clustermesh-store", "-c", "etcd-users", "--", "sh", "-c",
                       script)


def _password(lab: Lab, context: str) -> str:
    # lab-1's own reader in lab-2's store (connect made it).
    secret = lab.json(context, "get", "secret", *SYSTEM, "clustermesh-access-lab-1")
    return base64.b64decode(secret["data"]["password"]).decode()


def test_rotated_credentials_take_effect_without_a_restart_and_lose_nothing(lab: Lab) -> None:
    """`clustermesh certs --rotate` in lab-2 and `clustermesh connect` again: lab-2's store applies the
    new password live (its Secret volume follows the Secret), lab-1's store pods (its cache) switch to
    the new credentials, and x-wing in lab-1 loses no request to lab-2's backends meanwhile."""
    old = _password(lab, "lab-2")
    assert "cilium/cluster-config/lab-2" in _store_login(lab, "lab-2", old)
    kubeconfig_2 = str(lab.dir / "lab-2" / "control-plane" / "kubeconfig")
    ips = [f"--ip={n['address']}" for n in lab.state["nodes"].values() if n["cluster"] == "lab-2"]

    def rotate() -> None:
        pki = str(lab.dir / "lab-2" / "store-pki")
        # Every reader of lab-2's store gets new credentials: each peer connects again.
        for argv in (["certs", "--cluster", "lab-2", "--rotate", *ips, "--pki-dir", pki, "--kubeconfig", kubeconfig_2],
                     *(["connect", "--kubeconfig", lab.kubeconfig, "--context", peer,
                        "--destination-context", "lab-2", "--pki-dir", str(lab.dir / peer / "store-pki"),
                        "--destination-pki-dir", pki] for peer in ("lab-1", "lab-3"))):
            res = subprocess.run([sys.executable, "-m", "clustermesh.cli", *argv], capture_output=True, text=True,
                                 timeout=120, cwd=REPO)
            assert res.returncode == 0, res.stderr

    def switched() -> None:
        new = _password(lab, "lab-2")
        assert new != old
        assert "authentication failed" in _store_login(lab, "lab-2", old)
        assert "cilium/cluster-config/lab-2" in _store_login(lab, "lab-2", new)
        # With the cache, lab-1's store pods read lab-2 (its agents read lab-1's store).
        logs = lab.kubectl("lab-1", "logs", *SYSTEM, "deploy/clustermesh-store", "-c", "operator")
        assert "remote lab-2: new settings (endpoint or credentials); switching once connected" in logs, logs[-2000:]
        remotes = lab.json("lab-1", "get", "clustermesh", "default")["status"]["remotes"]
        assert [(r["name"], r["ready"], r["connected"]) for r in remotes] == [
            ("lab-2", True, True), ("lab-3", True, True)], remotes

    _failover(lab, rotate, lambda: eventually(switched, timeout=120, interval=2), only_remote_for=0)


def _secret(lab: Lab, context: str, name: str) -> dict[str, bytes]:
    data = lab.json(context, "get", "secret", *SYSTEM, name)["data"]
    return {k: base64.b64decode(v) for k, v in data.items()}


def test_the_renewal_cronjob_renews_the_store_certificates_live_and_loses_nothing(lab: Lab) -> None:
    """lab-2's CA is in the cluster (certs --in-cluster-ca), so deploy/'s CronJob can renew: a Job from
    it, told that every certificate is due, gives lab-2's store new certificates; the store pods use
    them without a restart, while every answer x-wing in lab-1 gets comes from lab-2 (lab-1's
    rebel-base at 0) and none is lost."""
    before = _secret(lab, "lab-2", "clustermesh-store-tls")
    reader_before = _secret(lab, "lab-2", "clustermesh-access-lab-1")
    restarts = {name: [c["restartCount"] for c in pod["status"]["containerStatuses"]]
                for name, pod in components(lab, "lab-2").items() if name.startswith("clustermesh-store")}
    cronjob = lab.json("lab-2", "get", "cronjobs.v1beta1.batch", *SYSTEM, "clustermesh-certs")
    template = cronjob["spec"]["jobTemplate"]
    container = template["spec"]["template"]["spec"]["containers"][0]
    # Every leaf is due: the window is longer than their lifetime (365 days).
    container["args"] = [*container["args"], "--leaf-lifetime=500d", "--renew-before=400d"]
    job = {"apiVersion": "batch/v1", "kind": "Job",
           "metadata": {"name": "clustermesh-certs-now", "namespace": "clustermesh-system"},
           "spec": template["spec"]}

    def renew() -> None:
        lab.kubectl("lab-1", "scale", "deployment", "rebel-base", "--replicas=0")
        res = subprocess.run(["kubectl", "--kubeconfig", lab.kubeconfig, "--context", "lab-2", "create", "-f", "-"],
                             input=json.dumps(job), capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        lab.kubectl("lab-2", "wait", *SYSTEM, "--for=condition=complete", "job/clustermesh-certs-now",
                    "--timeout=120s", timeout=130)

    def applied() -> None:
        after = _secret(lab, "lab-2", "clustermesh-store-tls")
        assert after["ca.crt"] == before["ca.crt"]
        for name in ("etcd.crt", "root.crt", "proxy.crt", "proxy-backend.crt"):
            assert after[name] != before[name], name
        assert _secret(lab, "lab-2", "clustermesh-access-lab-1")["tls.crt"] != reader_before["tls.crt"]
        # The pods' files follow the Secret (the kubelet's refresh), with no container restarted.
        served = lab.kubectl("lab-2", "exec", *SYSTEM, "deploy/clustermesh-store", "-c", "grpc-proxy", "--",
                             "cat", "/etc/clustermesh/tls/proxy.crt")
        assert served.strip() == after["proxy.crt"].decode().strip()
        now = {name: [c["restartCount"] for c in pod["status"]["containerStatuses"]]
               for name, pod in components(lab, "lab-2").items() if name.startswith("clustermesh-store")}
        assert now == restarts

    def settle() -> None:
        eventually(applied, timeout=120, interval=2)
        lab.kubectl("lab-1", "scale", "deployment", "rebel-base", "--replicas=2")

    _failover(lab, renew, settle, only_remote_for=3)


def _status(lab: Lab, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "clustermesh.cli", "status", "--kubeconfig", lab.kubeconfig,
                           "--context", "lab-1", *extra], capture_output=True, text=True, timeout=120, cwd=REPO)


def test_status_shows_what_the_cache_and_the_agents_see_and_names_a_remote_that_is_not_ready(lab: Lab) -> None:
    """With the cache, `clustermesh status` gathers through the API what lab-1's store pods report of
    each remote and whether every agent is Ready: from the host, with no connection into the lab."""
    res = _status(lab, "--wait", "--timeout", "60")
    assert res.returncode == 0, res.stdout + res.stderr
    nodes = len(lab.json("lab-1", "get", "nodes")["items"])
    assert "lab-2" in res.stdout and f"agents: {nodes}/{nodes} Ready" in res.stdout, res.stdout
    doc = json.loads(_status(lab, "--output", "json").stdout)
    assert [(r["name"], r["ready"]) for r in doc["remotes"]] == [("lab-2", True), ("lab-3", True)] and doc["ready"]
    # A remote no store answers for: named, and the command fails.
    clusters = lab.json("lab-1", "get", "clustermesh", "default")["spec"]["clusters"]
    bogus = {"name": "lab-9", "id": 9, "endpoints": ["https://192.168.100.99:32391"]}
    lab.kubectl("lab-1", "patch", "clustermesh", "default", "--type=merge", "-p",
                json.dumps({"spec": {"clusters": [*clusters, bogus]}}))
    try:
        def names_lab_9() -> None:
            res = _status(lab)
            assert res.returncode == 1 and "lab-9" in res.stderr, res.stdout + res.stderr
        eventually(names_lab_9, timeout=60, interval=2)
    finally:
        lab.kubectl("lab-1", "patch", "clustermesh", "default", "--type=merge", "-p",
                    json.dumps({"spec": {"clusters": clusters}}))
