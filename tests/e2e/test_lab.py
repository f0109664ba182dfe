"""The lab as users meet it: real Kubernetes driven by kubectl, and the Star Wars failover.

One lab (2 clusters x 2 nodes) for the module, brought up by ``clustermesh lab up`` exactly
as the README says; the tests run in order against it and the last one closes it with
SIGHUP (a closed terminal), which must leave nothing behind. A second, smaller lab checks
that ``clustermesh lab down`` cleans up after a ``kill -9`` of ``lab up`` itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from clustermesh.lab.run import XwingLoop
from tests.prereq import require, require_binary, require_root
from tests.waiting import eventually

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "demo" / "starwars"


def _prereqs() -> None:
    require_root()
    for binary in ("etcd", "etcdctl", "ip", "kubectl", "iptables", "nginx", "curl"):
        require_binary(binary)
    from clustermesh.lab.servers import ServerError, find_binary

    for name in ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kube-proxy"):
        try:
            find_binary(name)
        except ServerError as exc:
            require(False, name, str(exc))


class Lab:
    def __init__(self, directory: Path, clusters: int = 2, nodes: int = 2, *extra: str) -> None:
        self.dir = directory
        self.log = directory.parent / f"{directory.name}-up.log"
        self.out = self.log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "clustermesh.cli", "lab", "up", "--dir", str(directory),
             "--clusters", str(clusters), "--nodes", str(nodes), *extra],
            stdout=self.out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
        )
        deadline = time.monotonic() + 240
        while "The lab is up" not in self.output():
            assert self.proc.poll() is None, f"lab up exited:\n{self.output()}"
            assert time.monotonic() < deadline, f"lab not up in 240 s:\n{self.output()}"
            time.sleep(0.5)
        self.state: dict[str, Any] = json.loads((directory / "state.json").read_text())
        self.kubeconfig = str(directory / "kubeconfig")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kubectl(self, context: str, *args: str, check: bool = True, timeout: float = 120) -> str:
        res = subprocess.run(["kubectl", "--kubeconfig", self.kubeconfig, "--context", context, *args],
                             capture_output=True, text=True, timeout=timeout)
        if check:
            assert res.returncode == 0, f"kubectl {' '.join(args)}: {res.stderr}"
        return res.stdout + res.stderr

    def json(self, context: str, *args: str) -> Any:
        return json.loads(self.kubectl(context, *args, "-o", "json"))

    def pods(self, context: str, selector: str) -> list[dict[str, Any]]:
        return list(self.json(context, "get", "pods", "-l", selector)["items"])

    def stop(self, sig: int = signal.SIGHUP, timeout: float = 120) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self.out.close()
        return code

    def down(self) -> None:
        subprocess.run([sys.executable, "-m", "clustermesh.cli", "lab", "down", "--dir", str(self.dir)],
                       cwd=REPO, capture_output=True, timeout=180)


def leftovers(state: dict[str, Any]) -> list[str]:
    """Everything of a lab that is still there: processes, namespaces, links, cgroups, pins, mounts."""
    found = []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    found += [f"netns {n}" for n in netns.split() if n.startswith(state["netns_prefix"])]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    found += [f"host link {line.split(':')[1].strip()}" for line in links.splitlines() if state["tag"] in line]
    if Path(state["cgroup_root"]).exists():
        found.append(f"cgroup {state['cgroup_root']}")
    found += [f"pins {n['pin_dir']}" for n in state["nodes"].values() if Path(n["pin_dir"]).exists()]
    lab_dir = state["directory"].encode()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if lab_dir in (proc / "cmdline").read_bytes():
                    found.append(f"process {proc.name}")
            except OSError:
                pass
    mounts = Path("/proc/self/mountinfo").read_text()
    found += [f"mount {line.split()[4]}" for line in mounts.splitlines() if state["directory"] in line]
    # The remotes' credentials of the killed agents and operators (only processes that are gone).
    for folder in Path(tempfile.gettempdir()).glob("clustermesh-*-*-*"):
        pid = folder.name.split("-")[2]
        if folder.name.split("-")[1] in ("agent", "operator") and pid.isdigit() and not Path(f"/proc/{pid}").exists():
            found.append(f"credentials {folder}")
    return found


@contextlib.contextmanager
def open_lab(directory: Path, clusters: int, nodes: int, *extra: str) -> Iterator[Lab]:
    """A lab for a test module; whatever happens, it is stopped and cleaned up afterwards."""
    _prereqs()
    lab = Lab(directory, clusters, nodes, *extra)
    try:
        yield lab
    finally:
        if lab.proc.poll() is None:
            lab.stop()
        lab.down()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with open_lab(tmp_path_factory.mktemp("e2e") / "lab", 2, 2, "--processes") as lab:
        yield lab


def test_nodes_register_ready_with_lease_and_pod_cidr(lab: Lab) -> None:
    for context in ("lab-1", "lab-2"):
        nodes = lab.json(context, "get", "nodes")["items"]
        assert len(nodes) == 2
        for node in nodes:
            ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}
            assert ready["Ready"] == "True", node["status"]["conditions"]
            assert node["spec"]["podCIDR"].startswith(f"10.{243 + int(context[-1])}.")
            assert not any(t["key"] == "node.kubernetes.io/not-ready" for t in node["spec"].get("taints", []))
            assert node["metadata"]["labels"]["kubernetes.io/hostname"] == node["metadata"]["name"]
        leases = lab.json(context, "get", "leases", "-n", "kube-node-lease")["items"]
        assert {x["metadata"]["name"] for x in leases} == {n["metadata"]["name"] for n in nodes}


def apply_demo(lab: Lab) -> None:
    """Cilium's Star Wars example, unchanged, in both clusters, rolled out."""
    for i, context in ((1, "lab-1"), (2, "lab-2")):
        lab.kubectl(context, "apply", "-f", str(DEMO / f"cluster{i}.yaml"))
    for context in ("lab-1", "lab-2"):
        lab.kubectl(context, "rollout", "status", "deployment/rebel-base", "deployment/x-wing", "--timeout=150s",
                    timeout=180)


@pytest.fixture
def demo(lab: Lab) -> Lab:
    """The Star Wars demo as its manifests say, for a test that needs it whatever ran before (applied
    again: what an earlier test scaled is as the manifest says)."""
    apply_demo(lab)
    return lab


def test_cilium_demo_manifests_run_unchanged(lab: Lab) -> None:
    apply_demo(lab)
    for context in ("lab-1", "lab-2"):
        for pod in lab.pods(context, "name in (rebel-base, x-wing)"):
            conditions = {c["type"]: c["status"] for c in pod["status"]["conditions"]}
            assert pod["status"]["phase"] == "Running"
            assert conditions["Ready"] == conditions["ContainersReady"] == conditions["PodScheduled"] == "True"
            assert pod["status"]["podIP"] == pod["status"]["podIPs"][0]["ip"]
            assert pod["status"]["hostIP"].startswith("192.168.100.")


def answers(lab: Lab, context: str, count: int = 30) -> dict[str, int]:
    out = lab.kubectl(context, "exec", "deploy/x-wing", "--", "sh", "-c",
                      f"for i in $(seq {count}); do curl -s --max-time 2 rebel-base || echo FAILED; done")
    clusters = re.findall(r'"Cluster": "(Cluster-\d)"', out)
    return {name: clusters.count(name) for name in set(clusters)} | {"failed": out.count("FAILED")}


@pytest.mark.usefixtures("demo")
def test_x_wing_is_answered_by_both_clusters(lab: Lab) -> None:
    # Wait until each cluster has the other's backends (one answer from the other cluster), then every
    # request of a batch must succeed: a failed request is never retried away.
    eventually(lambda: _assert_in("Cluster-2", answers(lab, "lab-1", count=5)), timeout=60, interval=1)
    eventually(lambda: _assert_in("Cluster-1", answers(lab, "lab-2", count=5)), timeout=60, interval=1)
    for context in ("lab-1", "lab-2"):
        got = answers(lab, context)
        assert {"Cluster-1", "Cluster-2"} <= set(got) and got["failed"] == 0, (context, got)


def _assert_in(item: str, got: dict[str, int]) -> None:
    assert item in got, got


@pytest.mark.usefixtures("demo")
def test_kubectl_logs_shows_the_requests(lab: Lab) -> None:
    logs = "".join(lab.kubectl("lab-1", "logs", p["metadata"]["name"])
                   for p in lab.pods("lab-1", "name=rebel-base"))
    assert 'GET / HTTP/1.1" 200' in logs
    xwing = lab.pods("lab-1", "name=x-wing")[0]["metadata"]["name"]
    tail = lab.kubectl("lab-1", "logs", xwing, "--tail=1").strip().splitlines()
    assert len(tail) == 1


@pytest.mark.usefixtures("demo")
def test_kube_proxy_serves_a_non_global_service(lab: Lab) -> None:
    lab.kubectl("lab-1", "expose", "deployment", "x-wing", "--name", "xwing-local", "--port", "80")

    def answered() -> None:
        out = lab.kubectl("lab-1", "exec", "deploy/rebel-base", "--", "curl", "-s", "--max-time", "2",
                          "xwing-local/", check=False)
        assert '"public"' in out, out

    eventually(answered, timeout=30, interval=1)
    # The rules are kube-proxy's, in the node namespace of the client pod's node, not the host's.
    client_node = lab.json("lab-1", "get", "pods", "-l", "name=rebel-base")["items"][0]["spec"]["nodeName"]
    node_ns = lab.state["nodes"][client_node]["netns"]

    def in_node() -> None:
        rules = subprocess.run(["ip", "netns", "exec", node_ns, "iptables-save", "-t", "nat"],
                               capture_output=True, text=True).stdout
        assert "default/xwing-local" in rules

    eventually(in_node, timeout=30, interval=1)  # every node's kube-proxy syncs on its own time
    host = subprocess.run(["iptables-save", "-t", "nat"], capture_output=True, text=True).stdout
    assert "xwing-local" not in host


def _failover(lab: Lab, act: Any, settle: Any, only_remote_for: float = 2.0) -> None:
    """Act in lab-1 while x-wing asks in a loop: no request fails, and (when lab-1 has no
    backend for a while) every answer in that while is lab-2's."""
    loop = XwingLoop(lab.kubeconfig, "lab-1")
    try:
        eventually(lambda: _saw(loop, {"Cluster-1", "Cluster-2"}), timeout=60, interval=0.5)
        t0 = time.monotonic()
        act()

        def only_remote() -> None:
            recent = [w for t, w in loop.answers.since(time.monotonic() - only_remote_for)]
            assert recent and "Cluster-1" not in recent and time.monotonic() - t0 > only_remote_for, recent

        if only_remote_for:
            eventually(only_remote, timeout=30, interval=0.5)
        settled = time.monotonic()
        settle()
        eventually(lambda: _saw(loop, {"Cluster-1", "Cluster-2"}), timeout=90, interval=0.5)
        timeline = loop.answers.since(t0)
        after = [w for _, w in timeline]
        # When each failure came, counted from the act, beside when the settle began: a slow
        # withdrawal and a slow return read differently.
        when = loop.answers.failures_since(t0)
        assert after.count("failed") == 0, (f"{after.count('failed')} failed of {len(after)} at {when}; "
                                            f"settle began at +{settled - t0:.2f}s")
    finally:
        loop.stop()


def _saw(loop: XwingLoop, want: set[str]) -> None:
    recent = {w for _, w in loop.answers.since(time.monotonic() - 2)}
    assert recent == want, recent


@pytest.mark.usefixtures("demo")
def test_scale_to_zero_fails_over_without_a_failed_request(lab: Lab) -> None:
    _failover(
        lab,
        lambda: lab.kubectl("lab-1", "scale", "deployment", "rebel-base", "--replicas=0"),
        lambda: lab.kubectl("lab-1", "scale", "deployment", "rebel-base", "--replicas=2"),
    )


@pytest.mark.usefixtures("demo")
def test_deleting_the_backends_fails_over_without_a_failed_request(lab: Lab) -> None:
    old = {p["metadata"]["name"] for p in lab.pods("lab-1", "name=rebel-base")}

    def replaced() -> None:
        pods = lab.pods("lab-1", "name=rebel-base")
        fresh = [p for p in pods if p["metadata"]["name"] not in old and p["status"].get("phase") == "Running"]
        assert len(pods) == len(fresh) == 2, [p["metadata"]["name"] for p in pods]

    # The Deployment makes new backends within seconds: there may be no lab-2-only while.
    _failover(
        lab,
        lambda: lab.kubectl("lab-1", "delete", "pod", "-l", "name=rebel-base", "--wait=false"),
        lambda: eventually(replaced, timeout=60, interval=0.5),
        only_remote_for=0,
    )


def _main_pid(lab: Lab, pod: dict[str, Any]) -> int:
    node = pod["spec"]["nodeName"]
    record = lab.dir / "lab-1" / "nodes" / node / "pods" / pod["metadata"]["uid"] / "record.json"
    return int(json.loads(record.read_text())["containers"]["rebel-base"]["pid"])


@pytest.mark.usefixtures("demo")
def test_kill_9_of_a_backend_restarts_its_container(lab: Lab) -> None:
    lab.kubectl("lab-1", "rollout", "status", "deployment/rebel-base", "--timeout=60s")
    pods = lab.pods("lab-1", "name=rebel-base")
    for pod in pods:
        os.kill(_main_pid(lab, pod), signal.SIGKILL)

    def restarted() -> None:
        for pod in lab.pods("lab-1", "name=rebel-base"):
            status = pod["status"]["containerStatuses"][0]
            assert status["restartCount"] == 1 and status["ready"], status
            assert status["lastState"]["terminated"]["exitCode"] == 137

    eventually(restarted, timeout=60, interval=1)
    eventually(lambda: _both(lab), timeout=60, interval=1)


def _both(lab: Lab) -> None:
    got = answers(lab, "lab-1", 20)
    assert {"Cluster-1", "Cluster-2"} <= set(got), got


def _lab_pids(lab: Lab, needle: str) -> list[int]:
    procs = Path(lab.state["cgroup_root"], "system", "cgroup.procs").read_text().split()
    found = []
    for pid in procs:
        try:
            if needle in Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode():
                found.append(int(pid))
        except OSError:
            pass
    return found


@pytest.mark.usefixtures("demo")
def test_killed_agents_and_operator_come_back_and_the_demo_still_fails_over(lab: Lab) -> None:
    kubeconfig_1 = str(lab.dir / "lab-1" / "control-plane" / "kubeconfig")
    victims = (_lab_pids(lab, f"clustermesh.cli operator --kubeconfig {kubeconfig_1}")
               + _lab_pids(lab, f"clustermesh.cli agent --kubeconfig {kubeconfig_1}")
               + _lab_pids(lab, f"clustermesh.lab.node.agent --kubeconfig {kubeconfig_1}"))
    assert len(victims) == 5, victims
    before = _restart_counts(lab)
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    eventually(lambda: _all_restarted(lab, 5), timeout=30, interval=0.5)
    assert lab.proc.poll() is None, "the lab stays up"
    # The restarted node agents adopted their pods: the same containers, none restarted.
    eventually(lambda: _adopted(lab), timeout=30, interval=0.5)
    assert _restart_counts(lab) == before
    eventually(lambda: _both(lab), timeout=60, interval=1)
    test_scale_to_zero_fails_over_without_a_failed_request(lab)


def _restart_counts(lab: Lab) -> dict[str, int]:
    return {p["metadata"]["name"]: p["status"]["containerStatuses"][0]["restartCount"]
            for p in lab.pods("lab-1", "name in (rebel-base, x-wing)")}


def _adopted(lab: Lab) -> None:
    logs = "".join(p.read_text() for p in (lab.dir / "lab-1" / "nodes").glob("*-node-agent.log"))
    assert logs.count("adopted container") >= 4, logs[-1500:]


def _all_restarted(lab: Lab, n: int) -> None:
    assert lab.output().count(" restarted (pid ") >= n, lab.output()[-2000:]


MADE_ON_HOST = Path("/opt/clustermesh-e2e/config")  # a mountPath the host lacks: the node agent makes it

POD_FEATURES = f"""
apiVersion: v1
kind: ConfigMap
metadata: {{name: features}}
data: {{greeting: hello}}
---
apiVersion: v1
kind: Secret
metadata: {{name: features}}
stringData: {{token: s3cret}}
---
apiVersion: v1
kind: Pod
metadata: {{name: features, labels: {{app: features}}}}
spec:
  containers:
  - name: main
    image: busybox:1.36
    command: ["sh", "-c"]
    args:
    - echo "msg=$(MSG) ip=$(POD_IP) node=$(NODE) token=$TOKEN";
      cat /etc/podinfo/labels; echo; cat {MADE_ON_HOST}/greeting; echo; ls -d /data; hostname;
      getent hosts rebel-base.default.svc.cluster.local; cut -c1-7 /var/run/secrets/tokens/api; echo; sleep 3600
    env:
    - {{name: POD_NAME, valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}}}
    - {{name: POD_IP, valueFrom: {{fieldRef: {{fieldPath: status.podIP}}}}}}
    - {{name: NODE, valueFrom: {{fieldRef: {{fieldPath: spec.nodeName}}}}}}
    - {{name: GREETING, valueFrom: {{configMapKeyRef: {{name: features, key: greeting}}}}}}
    - {{name: TOKEN, valueFrom: {{secretKeyRef: {{name: features, key: token}}}}}}
    - {{name: MSG, value: "$(GREETING) from $(POD_NAME)"}}
    volumeMounts:
    - {{name: token, mountPath: /var/run/secrets/tokens}}
    - {{name: config, mountPath: {MADE_ON_HOST}}}
    - {{name: podinfo, mountPath: /etc/podinfo}}
    - {{name: data, mountPath: /data}}
  volumes:
  - {{name: token, projected: {{sources: [{{serviceAccountToken: {{path: api, audience: lab}}}}]}}}}
  - {{name: config, configMap: {{name: features}}}}
  - {{name: podinfo, downwardAPI: {{items: [{{path: labels, fieldRef: {{fieldPath: metadata.labels}}}}]}}}}
  - {{name: data, emptyDir: {{}}}}
"""


def test_a_pod_gets_its_env_volumes_names_and_hostname(lab: Lab, tmp_path: Path) -> None:
    manifest = tmp_path / "features.yaml"
    manifest.write_text(POD_FEATURES)
    lab.kubectl("lab-1", "apply", "-f", str(manifest))
    lab.kubectl("lab-1", "wait", "--for=condition=Ready", "pod/features", "--timeout=60s", timeout=90)
    pod = lab.json("lab-1", "get", "pod", "features")

    def logged() -> str:
        out = lab.kubectl("lab-1", "logs", "features")
        assert "eyJ" in out, out  # the last line the pod prints: a token's first characters
        return out

    out = eventually(logged, timeout=20, interval=0.5)
    ip, node = pod["status"]["podIP"], pod["spec"]["nodeName"]
    assert f"msg=hello from features ip={ip} node={node} token=s3cret" in out
    assert 'app="features"' in out and "hello" in out and "/data" in out
    assert "\nfeatures\n" in out  # the pod's own hostname
    cluster_ip = lab.json("lab-1", "get", "svc", "rebel-base")["spec"]["clusterIP"]
    assert f"{cluster_ip}" in out and "rebel-base.default.svc.cluster.local" in out
    assert "eyJhbGc" in out, "a projected service-account token (a JWT) from the TokenRequest API"


API_CLIENT = """
apiVersion: v1
kind: Pod
metadata: {name: __NAME__}
spec:
  hostNetwork: __HOSTNET__
  restartPolicy: Never
  initContainers:
  - name: first
    image: busybox:1.36
    command: [sh, -c, "echo init-ran > /work/init"]
    volumeMounts: [{name: work, mountPath: /work}]
  containers:
  - name: main
    image: debian
    command: [bash, -c]
    args:
    - |
      cat /work/init; hostname; sa=/var/run/secrets/kubernetes.io/serviceaccount
      curl -s --max-time 10 --cacert $sa/ca.crt -H "Authorization: Bearer $(cat $sa/token)" \\
        https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT/api/v1/namespaces/default/pods
      echo; sleep 3600
    volumeMounts: [{name: work, mountPath: /work}]
  volumes: [{name: work, emptyDir: {}}]
"""


@pytest.mark.parametrize("host_network", [False, True])
def test_pods_reach_their_api_server_in_cluster_after_their_init_containers(
    lab: Lab, tmp_path: Path, host_network: bool
) -> None:
    """What the operator and agent pods need: an init container runs to completion first, and a pod
    (in its own network namespace or the node's) reaches the API server through the `kubernetes`
    Service with its service-account token, verifying the server's certificate."""
    name = "api-host" if host_network else "api-pod"
    manifest = tmp_path / f"{name}.yaml"
    manifest.write_text(API_CLIENT.replace("__NAME__", name).replace("__HOSTNET__", str(host_network).lower()))
    lab.kubectl("lab-1", "apply", "-f", str(manifest))

    def answered() -> str:
        out = lab.kubectl("lab-1", "logs", name)
        assert '"kind": "Status"' in out, out
        return out

    out = eventually(answered, timeout=60, interval=0.5)
    pod = lab.json("lab-1", "get", "pod", name)
    assert out.startswith("init-ran\n"), out
    # Authenticated as the pod's service account (which may not list pods: 403 is the proof).
    assert "system:serviceaccount:default:default" in out and '"code": 403' in out, out
    assert [c["state"]["terminated"]["exitCode"] for c in pod["status"]["initContainerStatuses"]] == [0]
    if host_network:
        assert pod["status"]["podIP"] == pod["status"]["hostIP"]
        assert out.splitlines()[1] == pod["spec"]["nodeName"]
    else:
        assert pod["status"]["podIP"] != pod["status"]["hostIP"]
    lab.kubectl("lab-1", "delete", "pod", name, "--wait=true", "--timeout=30s", timeout=60)


def test_a_volume_over_the_checkout_does_not_hide_the_project_image(lab: Lab, tmp_path: Path) -> None:
    """The store pod mounts an emptyDir at /tmp; a checkout (and its venv) under /tmp must still run
    as the `clustermesh` image. Here the volume covers the checkout itself."""
    manifest = tmp_path / "shadow.yaml"
    manifest.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "shadow"},
        "spec": {"restartPolicy": "Never",
                 "containers": [{"name": "main", "image": "clustermesh:dev", "command": ["clustermesh", "--help"],
                                 "volumeMounts": [{"name": "scratch", "mountPath": str(REPO)}]}],
                 "volumes": [{"name": "scratch", "emptyDir": {}}]}}))
    lab.kubectl("lab-1", "apply", "-f", str(manifest))

    def done() -> None:
        assert lab.json("lab-1", "get", "pod", "shadow")["status"]["phase"] == "Succeeded"

    eventually(done, timeout=60, interval=0.5)
    assert "usage: clustermesh" in lab.kubectl("lab-1", "logs", "shadow")
    lab.kubectl("lab-1", "delete", "pod", "shadow", "--wait=true", "--timeout=30s", timeout=60)


def test_an_image_outside_the_catalog_waits_with_err_image_pull(lab: Lab) -> None:
    lab.kubectl("lab-1", "run", "nope", "--image=registry.example/nope:1", "--restart=Never")

    def waiting() -> None:
        statuses = lab.json("lab-1", "get", "pod", "nope")["status"].get("containerStatuses") or [{}]
        state = statuses[0].get("state", {}).get("waiting", {})
        assert state.get("reason") == "ErrImagePull", statuses
        assert "catalog" in state.get("message", ""), state

    eventually(waiting, timeout=30, interval=0.5)
    lab.kubectl("lab-1", "delete", "pod", "nope", "--wait=true", "--timeout=30s", timeout=60)


@pytest.mark.usefixtures("demo")
def test_a_silent_node_agent_loses_its_pods_readiness_and_reasserts_it(lab: Lab) -> None:
    """Kubernetes' node lifecycle: no Lease renewal for 40 s -> the node is Unknown and its pods not
    ready (their endpoints leave); once the node agent is back, it makes them Ready again."""
    node = "lab-1-node-1"
    on_node = [p["metadata"]["name"] for p in lab.pods("lab-1", "name in (rebel-base, x-wing)")
               if p["spec"]["nodeName"] == node]
    assert on_node
    (agent,) = _lab_pids(lab, f"clustermesh.lab.node.agent --kubeconfig {lab.dir}/lab-1/control-plane/kubeconfig "
                              f"--node {node} ")
    os.kill(agent, signal.SIGSTOP)
    try:
        def pods_ready() -> dict[str, str]:
            return {p["metadata"]["name"]: next(c["status"] for c in p["status"]["conditions"] if c["type"] == "Ready")
                    for p in lab.pods("lab-1", "name in (rebel-base, x-wing)") if p["metadata"]["name"] in on_node}

        def marked_not_ready() -> None:
            conditions = lab.json("lab-1", "get", "node", node)["status"]["conditions"]
            assert next(c["status"] for c in conditions if c["type"] == "Ready") == "Unknown"
            assert set(pods_ready().values()) == {"False"}, pods_ready()

        eventually(marked_not_ready, timeout=90, interval=2)
    finally:
        os.kill(agent, signal.SIGCONT)

    def ready_again() -> None:
        conditions = lab.json("lab-1", "get", "node", node)["status"]["conditions"]
        assert next(c["status"] for c in conditions if c["type"] == "Ready") == "True"
        assert set(pods_ready().values()) == {"True"}, pods_ready()

    eventually(ready_again, timeout=60, interval=1)


def test_sighup_tears_the_lab_down_completely(lab: Lab) -> None:
    state = lab.state
    code = lab.stop(signal.SIGHUP)
    out = lab.output()
    # The signal is named, the teardown runs to its end, and the exit is the interrupted one (130).
    assert code == 130, (code, out[-2000:])
    assert "[lab] SIGHUP" in out and "[lab] tearing down" in out and "[lab] down" in out, out[-2000:]
    assert leftovers(state) == []
    assert not (lab.dir / "state.json").exists()
    assert not MADE_ON_HOST.parent.exists(), "mount points the node agents made on the host are removed"


def test_lab_down_cleans_up_after_lab_up_was_killed(tmp_path: Path) -> None:
    _prereqs()
    lab = Lab(tmp_path / "lab", 1, 1, "--processes")  # one cluster has every kind of leftover
    try:
        lab.kubectl("lab-1", "create", "deployment", "web", "--image=nginx")
        lab.kubectl("lab-1", "rollout", "status", "deployment/web", "--timeout=60s")
        os.killpg(lab.proc.pid, signal.SIGKILL)
        lab.proc.wait(10)
        assert leftovers(lab.state), "the test needs something left behind to clean"
    finally:
        lab.down()
    assert leftovers(lab.state) == []
    assert not (lab.dir / "state.json").exists()


def test_a_closed_stdout_tears_the_lab_down(tmp_path: Path) -> None:
    """A terminal that goes away without a SIGHUP (or a reader of the lab's output that quits)."""
    _prereqs()
    directory = tmp_path / "lab"
    proc = subprocess.Popen(
        [sys.executable, "-m", "clustermesh.cli", "lab", "up", "--dir", str(directory), "--clusters", "1",
         "--nodes", "1", "--processes"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=REPO, start_new_session=True,
    )
    assert proc.stdout is not None
    state: dict[str, Any] = {}
    try:
        deadline = time.monotonic() + 180
        for line in proc.stdout:
            if b"The lab is up" in line:
                break
            assert time.monotonic() < deadline and proc.poll() is None
        state = json.loads((directory / "state.json").read_text())
        proc.stdout.close()
        proc.wait(120)
        left = leftovers(state)
        assert left == [], left
        assert not (directory / "state.json").exists(), "the lab removed itself"
    finally:
        if proc.poll() is None:
            proc.kill()
        subprocess.run([sys.executable, "-m", "clustermesh.cli", "lab", "down", "--dir", str(directory)],
                       cwd=REPO, capture_output=True, timeout=180)
