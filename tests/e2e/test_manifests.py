"""The lab running what users apply: `clustermesh lab up` (--from-manifests, the default) installs the mesh with
deploy/ (clustermesh certs, kubectl apply -k deploy/overlays/lab, connect) and the lab's kubelet runs
the store Deployment and the agent DaemonSet as Pods; the lab starts no operator or agent itself."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from clustermesh.lab.kubeapi import eventually
from tests.e2e import test_lab as lab_tests
from tests.e2e.test_lab import DEMO, Lab, _failover, _lab_pids, _prereqs, leftovers

SYSTEM = ("-n", "clustermesh-system")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    _prereqs()
    lab = Lab(tmp_path_factory.mktemp("manifests") / "lab", 2, 1, "--from-manifests")
    try:
        yield lab
    finally:
        if lab.proc.poll() is None:
            lab.stop()
        lab.down()


def components(lab: Lab, context: str) -> dict[str, dict]:
    return {p["metadata"]["name"]: p for p in lab.json(context, "get", "pods", *SYSTEM)["items"]}


def _running_and_ready(pod: dict) -> None:
    conditions = {c["type"]: c["status"] for c in pod["status"].get("conditions", [])}
    assert pod["status"]["phase"] == "Running" and conditions.get("Ready") == "True", pod["status"]


def test_the_mesh_runs_as_pods_from_deploy(lab: Lab) -> None:
    for context in ("lab-1", "lab-2"):
        pods = components(lab, context)
        assert sorted("-".join(n.split("-")[:2]) for n in pods) == ["clustermesh-agent", "clustermesh-store"], pods
        for pod in pods.values():
            _running_and_ready(pod)
        agent = next(p for n, p in pods.items() if n.startswith("clustermesh-agent"))
        assert agent["spec"]["hostNetwork"] and agent["status"]["podIP"] == agent["status"]["hostIP"]
        store = next(p for n, p in pods.items() if n.startswith("clustermesh-store"))
        assert {c["name"] for c in store["status"]["containerStatuses"]} == {
            "etcd", "etcd-users", "grpc-proxy", "operator"}
    # What runs is what deploy/ says: the lab itself started no operator and no agent.
    assert _lab_pids(lab, "clustermesh.cli operator") == [] and _lab_pids(lab, "clustermesh.cli agent") == []
    status = lab.json("lab-1", "get", "clustermesh", "default")["status"]
    assert [(r["name"], r["ready"]) for r in status["remotes"]] == [("lab-2", True)], status


def test_star_wars_fails_over_without_a_failed_request(lab: Lab) -> None:
    for i, context in ((1, "lab-1"), (2, "lab-2")):
        lab.kubectl(context, "apply", "-f", str(DEMO / f"cluster{i}.yaml"))
    for context in ("lab-1", "lab-2"):
        lab.kubectl(context, "rollout", "status", "deployment/rebel-base", "deployment/x-wing", "--timeout=150s",
                    timeout=180)
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


def test_teardown_leaves_nothing(lab: Lab) -> None:
    state = lab.state
    lab.stop()
    assert leftovers(state) == []
