"""The lab running what users apply: `clustermesh lab up` (--from-manifests, the default) installs the mesh with
deploy/ (clustermesh certs, kubectl apply -k deploy/overlays/lab, connect) and the lab's kubelet runs
the store Deployment and the agent DaemonSet as Pods; the lab starts no operator or agent itself."""

from __future__ import annotations

import base64
import subprocess
import sys
from collections.abc import Iterator

import pytest

from clustermesh.lab.kubeapi import eventually
from tests.e2e import test_lab as lab_tests
from tests.e2e.test_lab import REPO, Lab, _failover, _lab_pids, apply_demo, leftovers, open_lab

SYSTEM = ("-n", "clustermesh-system")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with open_lab(tmp_path_factory.mktemp("manifests") / "lab", 2, 1, "--from-manifests") as lab:
        yield lab


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
    assert [(r["name"], r["ready"]) for r in status["remotes"]] == [("lab-2", True)], status


def test_star_wars_fails_over_without_a_failed_request(lab: Lab) -> None:
    apply_demo(lab)
    lab_tests.test_scale_to_zero_fails_over_without_a_failed_request(lab)


def test_a_deleted_agent_pod_comes_back_and_no_request_fails(lab: Lab) -> None:
    (old,) = [n for n in components(lab, "lab-1") if n.startswith("clustermesh-agent")]

    def replaced() -> None:
        agents = {n: p for n, p in components(lab, "lab-1").items() if n.startswith("clustermesh-agent")}
        assert old not in agents and len(agents) == 1, sorted(agents)
        _running_and_ready(next(iter(agents.values())))

    _failover(
        lab,
        lambda: lab.kubectl("lab-1", "delete", "pod", *SYSTEM, old, "--wait=false"),
        lambda: eventually(replaced, timeout=120, interval=1),
        only_remote_for=0,
    )


def _store_login(lab: Lab, context: str, password: str) -> str:
    """etcd's answer to a login as the remote reader, asked inside the store pod."""
    script = ("ETCDCTL_API=3 etcdctl --endpoints=https://127.0.0.1:12379 --cacert=/etc/clustermesh/tls/ca.crt "
              "--cert=/etc/clustermesh/tls/root.crt --key=/etc/clustermesh/tls/root.key "
              f"--user=remote:{password} get --prefix --keys-only --limit=1 cilium/cluster-config/ 2>&1 || true")
    return lab.kubectl(context, "exec", *SYSTEM, "deploy/clustermesh-store", "-c", "etcd", "--", "sh", "-c", script)


def _password(lab: Lab, context: str) -> str:
    secret = lab.json(context, "get", "secret", *SYSTEM, "clustermesh-access-remote")
    return base64.b64decode(secret["data"]["password"]).decode()


def test_rotated_credentials_take_effect_without_a_restart_and_lose_nothing(lab: Lab) -> None:
    """`clustermesh certs --rotate` in lab-2 and `clustermesh connect` again: lab-2's store applies the
    new password live (its Secret volume follows the Secret), lab-1's agent and operator switch to the
    new credentials, and x-wing in lab-1 loses no request to lab-2's backends meanwhile."""
    old = _password(lab, "lab-2")
    assert "cilium/cluster-config/lab-2" in _store_login(lab, "lab-2", old)
    kubeconfig_2 = str(lab.dir / "lab-2" / "control-plane" / "kubeconfig")
    ips = [f"--ip={n['address']}" for n in lab.state["nodes"].values() if n["cluster"] == "lab-2"]

    def rotate() -> None:
        pki = str(lab.dir / "lab-2" / "store-pki")
        for argv in (["certs", "--cluster", "lab-2", "--rotate", *ips, "--pki-dir", pki, "--kubeconfig", kubeconfig_2],
                     ["connect", "--kubeconfig", lab.kubeconfig, "--context", "lab-1",
                      "--destination-context", "lab-2"]):
            res = subprocess.run([sys.executable, "-m", "clustermesh.cli", *argv], capture_output=True, text=True,
                                 timeout=120, cwd=REPO)
            assert res.returncode == 0, res.stderr

    def switched() -> None:
        new = _password(lab, "lab-2")
        assert new != old
        assert "authentication failed" in _store_login(lab, "lab-2", old)
        assert "cilium/cluster-config/lab-2" in _store_login(lab, "lab-2", new)
        logs = lab.kubectl("lab-1", "logs", *SYSTEM, "ds/clustermesh-agent")
        assert "remote lab-2: new settings" in logs, logs[-2000:]
        remotes = lab.json("lab-1", "get", "clustermesh", "default")["status"]["remotes"]
        assert [(r["name"], r["ready"], r["connected"]) for r in remotes] == [("lab-2", True, True)], remotes

    _failover(lab, rotate, lambda: eventually(switched, timeout=120, interval=2), only_remote_for=0)


def test_teardown_leaves_nothing(lab: Lab) -> None:
    state = lab.state
    lab.stop()
    assert leftovers(state) == []
