"""Chaos against the mesh as deploy/ installs it: lab-2's store tier (and the client clusters' agents)
broken the way real clusters break them, with clients that cannot hide a loss, in both modes at once.

The package's lab (conftest.py: from deploy/, 3 clusters x 2 nodes) mixes the modes: lab-1's agents read
lab-2 from lab-1's store pods, which cache it (KVStoreMesh, the default), and lab-3's agents read lab-2's
store themselves (direct). The Star Wars demo runs in lab-1, lab-2 and lab-3 with lab-1's and lab-3's
rebel-base scaled to 0: their x-wings are then served only by lab-2's backends through the socket-LB
(kube-proxy has no local endpoint to fall back on), known only from lab-2's store, through the cache in
lab-1 and directly in lab-3.

Each case runs a fresh strict loop (``clustermesh.lab.attempts``) in the x-wing of each client cluster
from before the break until 10 s after the broken component is back and Ready, and every error exit,
answer that is not Cluster-2's JSON and gap of more than 1 s counts, in either. Cases a-f must lose
nothing; g (every store replica gone past the grace period) loses by design and is checked for its
withdraw and return. Each case also times how long a change made right after the new component is
Ready takes to reach every client node's maps (an EndpointSlice of the selector-less ``chaos-probe``
Service, written by the test: no pod start in the figure), and the figures go to
``<lab>/store-chaos-figures.txt`` for the README.

Nothing here connects to a lab address from the host: the maps are read from their pins.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import signal
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from clustermesh.cli import build_parser
from clustermesh.datapath.dump import read as read_maps
from clustermesh.datapath.errors import DatapathError
from clustermesh.datapath.plan import specs_from_state
from clustermesh.lab.attempts import AttemptLoop, LoopEnded, Verdict, judge
from tests.e2e.test_lab import DEMO, Lab, apply_demo

# Backstop only (every wait below has its own bound): the module's lab comes up inside the first test's
# time, and a rolling restart of two store replicas on a busy 2-core machine takes minutes at worst.
pytestmark = pytest.mark.timeout(1200)

SERVER = "lab-2"  # lab-2's store tier is what breaks
CLIENTS = {"lab-1": "cache", "lab-3": "direct"}  # their x-wings ask; how their agents read lab-2
SERVER_ID = 2  # lab-2's cluster ID: its backends in the client clusters' maps carry it
NS = "clustermesh-system"
STORE = "app.kubernetes.io/name=clustermesh-store"
AGENT = "app.kubernetes.io/name=clustermesh-agent"
EXPECT = frozenset({"Cluster-2"})
MAX_GAP = 1.0
TAIL = 10.0  # the "10 s more" once the broken component is back
READY_TIMEOUT = 240.0  # a replaced store or agent pod back and Ready
READ_TIMEOUT = 90.0  # a change in lab-2 seen in the client clusters' maps
NOTICE = 10.0  # an unreachable store is noticed within this (the agents probe every 2 s, 3 s deadline)
FIGURES = "store-chaos-figures.txt"

PROBE_SERVICE = {
    "apiVersion": "v1", "kind": "Service",
    "metadata": {"name": "chaos-probe", "annotations": {"service.cilium.io/global": "true"}},
    "spec": {"ports": [{"port": 80}]},  # no selector: its EndpointSlice is the test's
}


def probe_slice(api_version: str, ip: str) -> dict[str, Any]:
    """The chaos-probe's one EndpointSlice, with one ready endpoint (nothing ever connects to it: the
    figure is the records' way from lab-2's API server to the client clusters' maps)."""
    return {"apiVersion": api_version, "kind": "EndpointSlice",
            "metadata": {"name": "chaos-probe-1", "labels": {"kubernetes.io/service-name": "chaos-probe"}},
            "addressType": "IPv4", "ports": [{"name": "", "port": 80, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}}]}


@pytest.fixture(scope="module")
def lab(deploy_lab: Lab) -> Iterator[Lab]:
    """The package's lab (conftest.py), after test_manifests.py used it."""
    try:
        set_up(deploy_lab)
        yield deploy_lab
    finally:
        figures = deploy_lab.dir / FIGURES
        if figures.exists():
            print("\n" + figures.read_text())


def set_up(lab: Lab) -> None:
    apply_demo(lab)
    service = lab.dir / "chaos-probe-service.json"
    service.write_text(json.dumps(PROBE_SERVICE))
    for context in (*CLIENTS, SERVER):
        lab.kubectl(context, "apply", "-f", str(service))
    versions = lab.kubectl(SERVER, "api-versions").split()
    api_version = "discovery.k8s.io/v1" if "discovery.k8s.io/v1" in versions else "discovery.k8s.io/v1beta1"
    # An address in lab-2's pod CIDR that no pod gets (the lab's IPAM hands out from the bottom).
    cidr = ipaddress.ip_network(next(n["pod_cidr"] for n in lab.state["nodes"].values() if n["cluster"] == SERVER))
    (lab.dir / "chaos-probe-slice.json").write_text(json.dumps(probe_slice(api_version, str(cidr[-3]))))
    # lab-3 runs lab-1's half of the demo (its rebel-base, scaled to 0 below, would answer "Cluster-1").
    lab.kubectl("lab-3", "apply", "-f", str(DEMO / "cluster1.yaml"))
    lab.kubectl("lab-3", "rollout", "status", "deployment/x-wing", "--timeout=150s", timeout=180)
    for context in CLIENTS:
        lab.kubectl(context, "scale", "deployment/rebel-base", "--replicas=0")
    for context in CLIENTS:
        wait_until(lambda c=context: not lab.pods(c, "name=rebel-base"), 120, f"{context}'s rebel-base pods gone")
    wait_until(lambda: store_ready(lab), READY_TIMEOUT, "lab-2's store Ready")
    wait_until(lambda: agents_ready(lab), READY_TIMEOUT, "the client clusters' agents Ready")
    wait_until(lambda: maps_hold_server_backends(lab), READ_TIMEOUT,
               "lab-2's rebel-base backends in the client clusters' maps")
    with client_loops(lab, "setup") as loops:
        for loop in loops.values():
            loop.wait_clean(EXPECT, seconds=5, max_gap=MAX_GAP, timeout=120)


@contextlib.contextmanager
def client_loops(lab: Lab, slug: str) -> Iterator[dict[str, AttemptLoop]]:
    """A strict loop in each client cluster's x-wing, side by side."""
    with contextlib.ExitStack() as stack:
        yield {c: stack.enter_context(AttemptLoop.in_xwing(lab.kubeconfig, c, raw=lab.dir / f"attempts-{slug}-{c}.log"))
               for c in CLIENTS}


# ---------------------------------------------------------------- waiting


def wait_until(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.2,
               explain: Callable[[], str] | None = None) -> float:
    """The wall time (``time.time()``, the attempts' clock) at which ``check()`` first held.
    On a timeout the message ends with ``explain()``: what the test saw then."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f}s" + (f"\n{explain()}" if explain else ""))
        time.sleep(interval)
    return time.time()


def readers_said(lab: Lab) -> str:
    """The last warnings about lab-2 of whoever reads it: lab-1's store pods (the cache) and lab-3's
    agents (direct), one line per pod."""
    out = []
    for context, (label, container) in (("lab-1", (STORE, "operator")), ("lab-3", (AGENT, "agent"))):
        for pod in lab.json(context, "-n", NS, "get", "pods", "-l", label)["items"]:
            name = pod["metadata"]["name"]
            logs = lab.kubectl(context, "-n", NS, "logs", name, "-c", container, check=False)
            said = [ln[:220] for ln in logs.splitlines() if SERVER in ln and (" WARNING " in ln or " ERROR " in ln)]
            out.append(f"{context} {name}: " + (" | ".join(said[-4:]) or "no warning about lab-2"))
    return "\n".join(out)


def is_ready(pod: dict[str, Any]) -> bool:
    return not pod["metadata"].get("deletionTimestamp") and any(
        c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))


# ---------------------------------------------------------------- lab-2's store, the clients' agents


def store_pods(lab: Lab) -> list[dict[str, Any]]:
    """lab-2's store pods, terminating ones included."""
    return list(lab.json(SERVER, "-n", NS, "get", "pods", "-l", STORE)["items"])


def store_deployment(lab: Lab) -> dict[str, Any]:
    return dict(lab.json(SERVER, "-n", NS, "get", "deployment", "clustermesh-store"))


def store_ready(lab: Lab, gone: Collection[str] = ()) -> bool:
    """The rollout is complete (``kubectl rollout status``'s rules), every replica Ready, and none of
    the pods named in ``gone`` exists any more, not even terminating."""
    dep = store_deployment(lab)
    want = dep["spec"].get("replicas", 1)
    status = dep.get("status", {})
    if status.get("observedGeneration", 0) < dep["metadata"]["generation"]:
        return False
    if not (status.get("replicas", 0) == status.get("updatedReplicas", 0) == status.get("readyReplicas", 0)
            == status.get("availableReplicas", 0) == want):
        return False
    pods = store_pods(lab)
    return len(pods) == want and all(is_ready(p) for p in pods) and not {name(p) for p in pods} & set(gone)


def agent_pods(lab: Lab, context: str) -> list[dict[str, Any]]:
    return list(lab.json(context, "-n", NS, "get", "pods", "-l", AGENT)["items"])


def agents_ready(lab: Lab, gone: Collection[str] = ()) -> bool:
    """Every client cluster's agent DaemonSet rolled out, every agent Ready, none named in ``gone`` left."""
    for context in CLIENTS:
        ds = lab.json(context, "-n", NS, "get", "daemonset", "clustermesh-agent")
        status = ds.get("status", {})
        want = status.get("desiredNumberScheduled", -1)
        if status.get("observedGeneration", 0) < ds["metadata"]["generation"] or want < 1:
            return False
        if not (status.get("numberReady") == status.get("updatedNumberScheduled")
                == status.get("numberAvailable") == want):
            return False
        pods = agent_pods(lab, context)
        if len(pods) != want or not all(is_ready(p) for p in pods) or {name(p) for p in pods} & set(gone):
            return False
    return True


def name(obj: dict[str, Any]) -> str:
    return str(obj["metadata"]["name"])


def grace_period(lab: Lab, context: str) -> float:
    """The grace period after which ``context``'s agents lose lab-2, as deployed: the agents' own (direct
    mode) or the store pods' cache's (cache mode), read from their arguments (deploy/overlays/lab's) by
    their own command line, so the default applies when the overlay sets none."""
    component, kind, workload, container_name = (
        ("operator", "deployment", "clustermesh-store", "operator") if CLIENTS[context] == "cache"
        else ("agent", "daemonset", "clustermesh-agent", "agent"))
    obj = lab.json(context, "-n", NS, "get", kind, workload)
    container = next(c for c in obj["spec"]["template"]["spec"]["containers"] if c["name"] == container_name)
    # $(VAR) of the literal env values, as the kubelet expands them (the others are not numbers we read).
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    argv = [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), a) for a in container.get("args", [])]
    args, _ = build_parser().parse_known_args([component, *argv])
    return float(args.grace_period)


def etcd_pid(lab: Lab, pod: dict[str, Any]) -> int:
    """The etcd process of a store pod, found from the host: the lab's kubelet runs each container in
    ``<node cgroup>/pod-<uid>/<container>`` (clustermesh/lab/node/pod_worker.py, PodWorker.cgroup and
    Container.cgroup), so the etcd container's cgroup holds etcd and whatever store.sh still runs."""
    node = lab.state["nodes"][pod["spec"]["nodeName"]]
    procs = Path(node["cgroup"], f"pod-{pod['metadata']['uid']}", "etcd", "cgroup.procs").read_text().split()
    found = []
    for pid in procs:
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/comm").read_text().strip() == "etcd":
                found.append(int(pid))
    assert len(found) == 1, f"etcd processes in {name(pod)}'s etcd container: {found} (of {procs})"
    return found[0]


def restarts_of(pod: dict[str, Any], container: str) -> int:
    return next((int(s["restartCount"]) for s in pod["status"].get("containerStatuses", [])
                 if s["name"] == container), 0)


# ---------------------------------------------------------------- what the client clusters' maps hold

_cluster_ips: dict[tuple[str, str, str], str] = {}


def cluster_ip(lab: Lab, context: str, service: str) -> str:
    key = (str(lab.dir), context, service)
    if key not in _cluster_ips:
        _cluster_ips[key] = lab.kubectl(context, "get", "svc", service, "-o", "jsonpath={.spec.clusterIP}").strip()
    return _cluster_ips[key]


def client_backends_of(lab: Lab, service: str) -> dict[str, set[str]]:
    """Per client cluster node: lab-2's backends of ``service`` (port 80) in that node's pinned maps."""
    found: dict[str, set[str]] = {}
    for node_name, node in lab.state["nodes"].items():
        if node["cluster"] not in CLIENTS:
            continue
        ip = cluster_ip(lab, node["cluster"], service)
        try:
            specs = specs_from_state(read_maps(node["pin_dir"]).state)
        except (DatapathError, OSError):
            specs = []  # no maps pinned yet: nothing served
        found[node_name] = next(({str(b.ip) for b in s.backends if b.cluster_id == SERVER_ID} for s in specs
                                 if str(s.frontend.ip) == ip and s.frontend.port == 80), set())
    assert {lab.state["nodes"][n]["cluster"] for n in found} == set(CLIENTS), f"client nodes: {sorted(found)}"
    return found


def server_backends(lab: Lab) -> set[str]:
    """lab-2's Ready rebel-base pod IPs."""
    return {p["status"]["podIP"] for p in lab.pods(SERVER, "name=rebel-base") if is_ready(p)}


def maps_hold_server_backends(lab: Lab) -> bool:
    want = server_backends(lab)
    return bool(want) and all(held == want for held in client_backends_of(lab, "rebel-base").values())


def propagation(lab: Lab, ready_at: float) -> dict[str, float]:
    """Per client cluster, seconds from ``ready_at`` (the new component seen Ready) until each of its
    agents has a backend of lab-2's chaos-probe, whose EndpointSlice is written at that moment; then
    the slice goes and its backend leaves the client clusters' maps."""
    lab.kubectl(SERVER, "apply", "-f", str(lab.dir / "chaos-probe-slice.json"))
    seen: dict[str, float] = {}

    def everywhere() -> bool:
        held = client_backends_of(lab, "chaos-probe")
        for client in set(CLIENTS) - set(seen):
            if all(b for node, b in held.items() if lab.state["nodes"][node]["cluster"] == client):
                seen[client] = time.time()
        return len(seen) == len(CLIENTS)

    wait_until(everywhere, READ_TIMEOUT, "lab-2's new chaos-probe backend in every client node's maps",
               interval=0.05, explain=lambda: f"held: {client_backends_of(lab, 'chaos-probe')}\n{readers_said(lab)}")
    lab.kubectl(SERVER, "delete", "endpointslice", "chaos-probe-1")
    wait_until(lambda: not any(client_backends_of(lab, "chaos-probe").values()), READ_TIMEOUT,
               "chaos-probe's backend gone from the client clusters' maps",
               explain=lambda: f"still held: {client_backends_of(lab, 'chaos-probe')}\n{readers_said(lab)}")
    return {client: t - ready_at for client, t in seen.items()}


# ---------------------------------------------------------------- one case


@dataclass
class Outcome:
    verdict: Verdict
    propagation: float | None  # None: the case did not get that far
    garbled: list[str]

    def clean(self) -> bool:
        return self.verdict.failures == 0 and not self.garbled

    def why(self) -> str:
        failed = "\n".join(f"  {f.t:.3f} {f.why} {f.attempt}" for f in self.verdict.failed[:20])
        return f"{self.verdict.describe()}\n{failed}\ngarbled lines: {self.garbled[:5]}"


def record(lab: Lab, case: str, client: str, outcome: Outcome, notes: str = "") -> None:
    v = outcome.verdict
    path = lab.dir / FIGURES
    if not path.exists():
        path.write_text("| case | client (mode) | attempts | failures | largest gap | propagation | notes |\n"
                        "| --- | --- | ---: | ---: | ---: | ---: | --- |\n")
    took = "-" if outcome.propagation is None else f"{outcome.propagation:.1f} s"
    line = (f"| {case} | {client} ({CLIENTS[client]}) | {v.attempts} | {v.failures} | {v.largest_gap:.2f} s "
            f"| {took} | {notes} |")
    print(line)
    with path.open("a") as out:
        out.write(line + "\n")


def assert_clean(outcomes: dict[str, Outcome]) -> None:
    dirty = {c: o for c, o in outcomes.items() if not o.clean()}
    assert not dirty, "\n".join(f"{c} ({CLIENTS[c]} mode): {o.why()}" for c, o in dirty.items())


def finish(lab: Lab, loops: dict[str, AttemptLoop]) -> float:
    """The tail: lab-2's backends held by every client node, 10 s more, and the loops' reports past the
    end (a loop that stalled or died shows as a gap up to the end, not as a wait that failed)."""
    wait_until(lambda: maps_hold_server_backends(lab), READ_TIMEOUT,
               "lab-2's rebel-base backends in the client clusters' maps")
    time.sleep(TAIL)
    end = time.time()
    for loop in loops.values():
        with contextlib.suppress(TimeoutError, LoopEnded):
            loop.wait_past(end)
    return end


def run_case(lab: Lab, case: str, act: Callable[[], object], back: Callable[[], bool],
             what: str) -> dict[str, Outcome]:
    """One case: fresh loops, ``act`` breaks something, ``back()`` holds once the broken component is
    back and Ready; then the propagation figure, the tail, each client's verdict over the whole case."""
    slug = case.split(".")[0]
    with client_loops(lab, slug) as loops:
        starts = {c: loop.wait_clean(EXPECT, max_gap=MAX_GAP, timeout=90) for c, loop in loops.items()}
        start = max(starts.values())
        try:
            act()
            ready_at = wait_until(back, READY_TIMEOUT, what, interval=0.5)
            took = propagation(lab, ready_at)
            end = finish(lab, loops)
        except AssertionError as exc:
            # What the clients lost meanwhile is the figure that explains a component that never came back.
            lost = []
            for c, loop in loops.items():
                so_far = Outcome(judge(loop.attempts(), EXPECT, MAX_GAP, start, time.time()), None,
                                 list(loop.garbled))
                record(lab, case, c, so_far, f"did not recover: {str(exc).splitlines()[0]}")
                lost.append(f"{c}: {so_far.why()}")
            raise AssertionError(f"{exc}\nthe clients meanwhile:\n" + "\n".join(lost)) from exc
    outcomes = {c: Outcome(judge(loop.attempts(), EXPECT, MAX_GAP, start, end), took[c], list(loop.garbled))
                for c, loop in loops.items()}
    for c, outcome in outcomes.items():
        record(lab, case, c, outcome)
    return outcomes


# ---------------------------------------------------------------- the cases, in order


def test_a_deleting_a_store_replica_loses_no_request(lab: Lab) -> None:
    victim = name(store_pods(lab)[0])
    outcome = run_case(
        lab, "a. kubectl delete pod of a store replica",
        lambda: lab.kubectl(SERVER, "-n", NS, "delete", "pod", victim, "--wait=false"),
        lambda: store_ready(lab, gone={victim}), f"lab-2's store with {victim} replaced, Ready")
    assert_clean(outcome)


def test_b_a_rollout_restart_of_the_store_loses_no_request(lab: Lab) -> None:
    old = {name(p) for p in store_pods(lab)}
    outcome = run_case(
        lab, "b. kubectl rollout restart of the store",
        lambda: lab.kubectl(SERVER, "-n", NS, "rollout", "restart", "deployment/clustermesh-store"),
        lambda: store_ready(lab, gone=old), "lab-2's store restarted, every replica Ready")
    assert_clean(outcome)


def test_c_an_image_upgrade_of_the_store_loses_no_request(lab: Lab) -> None:
    old = {name(p) for p in store_pods(lab)}
    images = {c["image"] for c in store_deployment(lab)["spec"]["template"]["spec"]["containers"]}
    new = "clustermesh:v3" if images == {"clustermesh:v2"} else "clustermesh:v2"  # the lab runs any tag

    def upgraded() -> bool:
        return store_ready(lab, gone=old) and all(
            c["image"] == new for p in store_pods(lab) for c in p["spec"]["containers"])

    outcome = run_case(
        lab, f"c. image tag change of the store ({new})",
        lambda: lab.kubectl(SERVER, "-n", NS, "set", "image", "deployment/clustermesh-store", f"*={new}"),
        upgraded, f"lab-2's store on {new}, every replica Ready")
    assert_clean(outcome)


def test_d_kill_9_of_etcd_in_a_store_pod_loses_no_request(lab: Lab) -> None:
    pod = store_pods(lab)[0]
    before = restarts_of(pod, "etcd")

    def restarted() -> bool:
        now = next((p for p in store_pods(lab) if name(p) == name(pod)), None)
        return now is not None and restarts_of(now, "etcd") > before and store_ready(lab)

    outcome = run_case(lab, "d. kill -9 of etcd in a store pod", lambda: os.kill(etcd_pid(lab, pod), signal.SIGKILL),
                       restarted, f"etcd of {name(pod)} restarted, the store Ready")
    etcd = next(s for p in store_pods(lab) if name(p) == name(pod)
                for s in p["status"]["containerStatuses"] if s["name"] == "etcd")
    assert etcd.get("lastState", {}).get("terminated", {}).get("exitCode") == 137, etcd  # it was our kill
    assert_clean(outcome)


def test_e_draining_a_node_of_a_store_replica_loses_no_request(lab: Lab) -> None:
    node = store_pods(lab)[0]["spec"]["nodeName"]
    # What a drain deletes in the mesh's namespace: everything on the node but DaemonSet pods.
    victims = [name(p) for p in lab.json(SERVER, "-n", NS, "get", "pods", "--field-selector",
                                         f"spec.nodeName={node}")["items"]
               if not any(o.get("kind") == "DaemonSet" for o in p["metadata"].get("ownerReferences", []))]
    assert victims, f"no store pod on {node}"

    def drain() -> None:
        lab.kubectl(SERVER, "cordon", node)
        lab.kubectl(SERVER, "-n", NS, "delete", "pod", *victims, "--wait=false")

    def moved() -> bool:
        return store_ready(lab, gone=victims) and all(p["spec"].get("nodeName") != node for p in store_pods(lab))

    try:
        outcome = run_case(lab, f"e. drain of a store node ({len(victims)} replica(s) on it)", drain, moved,
                           f"lab-2's store off {node}, every replica Ready")
    finally:
        lab.kubectl(SERVER, "uncordon", node)
    assert_clean(outcome)


def test_f_deleting_every_agent_of_the_client_clusters_loses_no_request(lab: Lab) -> None:
    old = {name(p) for c in CLIENTS for p in agent_pods(lab, c)}
    assert old

    def delete_agents() -> None:
        for context in CLIENTS:
            lab.kubectl(context, "-n", NS, "delete", "pod", "-l", AGENT, "--wait=false")

    outcome = run_case(
        lab, "f. kubectl delete pod of every agent of the client clusters", delete_agents,
        lambda: agents_ready(lab, gone=old) and maps_hold_server_backends(lab),
        "the client clusters' new agents Ready, lab-2's backends in their maps")
    assert_clean(outcome)


def test_g_every_store_replica_gone_past_the_grace_period_withdraws_then_returns(lab: Lab) -> None:
    """By design the one case that loses requests: the backends leave no earlier than the grace period
    after the stores went (the cache's in lab-1, the agents' in lab-3), and come back once a store
    answers again."""
    grace = {c: grace_period(lab, c) for c in CLIENTS}
    replicas = int(store_deployment(lab)["spec"].get("replicas", 1))
    first_drop: dict[str, float] = {}

    def withdrawn() -> bool:
        held = client_backends_of(lab, "rebel-base")
        for node, backends in held.items():
            if not backends:
                first_drop.setdefault(node, time.time())
        return len(first_drop) == len(held)

    with client_loops(lab, "g") as loops:
        start = max(loop.wait_clean(EXPECT, max_gap=MAX_GAP, timeout=90) for loop in loops.values())
        assert maps_hold_server_backends(lab)
        went = time.time()  # the earliest the stores can have stopped answering
        lab.kubectl(SERVER, "-n", NS, "scale", "deployment/clustermesh-store", "--replicas=0")
        try:
            wait_until(withdrawn, max(grace.values()) + NOTICE + 120,
                       "lab-2's rebel-base backends gone from the client clusters' maps")
        finally:
            lab.kubectl(SERVER, "-n", NS, "scale", "deployment/clustermesh-store", f"--replicas={replicas}")
        ready_at = wait_until(lambda: store_ready(lab), READY_TIMEOUT, "lab-2's store back, every replica Ready",
                              interval=0.5)
        back = wait_until(lambda: maps_hold_server_backends(lab), READ_TIMEOUT,
                          "lab-2's rebel-base backends back in the client clusters' maps")
        took = propagation(lab, ready_at)
        answering = max(loop.wait_clean(EXPECT, max_gap=MAX_GAP, timeout=60) for loop in loops.values())
        end = finish(lab, loops)
    problems = []
    for client, loop in loops.items():
        attempts = loop.attempts()
        outcome = Outcome(judge(attempts, EXPECT, MAX_GAP, start, end), took[client], list(loop.garbled))
        after = judge(attempts, EXPECT, MAX_GAP, answering, end)
        drops = [t for node, t in first_drop.items() if lab.state["nodes"][node]["cluster"] == client]
        gone_after = min(drops) - went
        record(lab, f"g. every store replica gone past the grace period ({grace[client]:g} s)", client, outcome,
               f"withdrawn {gone_after:.1f} s after the scale to 0 (all nodes by {max(drops) - went:.1f} s); "
               f"back {back - ready_at:.1f} s after the store was Ready; since: {after.failures} failures")
        if gone_after < grace[client]:
            problems.append(f"{client}: withdrawn {gone_after:.1f}s after the stores went, before the "
                            f"{grace[client]:g}s grace")
        if after.failures or outcome.garbled:
            problems.append(f"{client}: after the return: {after.describe()} {outcome.garbled[:5]}")
    assert not problems, "\n".join(problems)
