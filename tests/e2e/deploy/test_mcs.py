"""MCS-API in the lab installed from deploy/: Cilium's MCS-API example (demo/starwars/mcsapi.yaml: a
Service and a ServiceExport, plus a headless pair) applied unchanged in lab-1 and lab-2 beside the Star
Wars demo. Every cluster of the set gets the ServiceImport (lab-3 too, which exports nothing), x-wings
reach the rebel bases of both exporting clusters by ``rebel-base-mcsapi.default.svc.clusterset.local``,
and when lab-1's rebel bases are gone the strict client (every attempt: time, exit code, answer; errors,
wrong answers and gaps over 1 s count) loses nothing: the ClusterSetIP is served by the socket-LB with
lab-2's backends only (kube-proxy knows no endpoint of the derived Service but the local ones)."""

from __future__ import annotations

import json
import re
import time

import pytest

from clustermesh.cluster.mcs import derived_name
from clustermesh.lab.attempts import AttemptLoop, answer_problem, judge
from tests.e2e.test_lab import DEMO, Lab, apply_demo
from tests.waiting import eventually

pytestmark = pytest.mark.timeout(900)

NAME = "rebel-base-mcsapi"
HEADLESS = "rebel-base-headless-mcsapi"
CLUSTERSET = f"{NAME}.default.svc.clusterset.local"
EXPORTERS = ("lab-1", "lab-2")


@pytest.fixture(scope="module")
def lab(deploy_lab: Lab) -> Lab:
    apply_demo(deploy_lab)  # the Star Wars demo, as test_manifests leaves it (applied again: unchanged)
    for context in EXPORTERS:
        deploy_lab.kubectl(context, "apply", "-f", str(DEMO / "mcsapi.yaml"))
    return deploy_lab


def _imported(lab: Lab, context: str, clusters: list[str]) -> dict:
    imp = lab.json(context, "get", "serviceimport", NAME)
    assert imp["spec"]["type"] == "ClusterSetIP" and len(imp["spec"].get("ips") or []) == 1, imp
    assert [c["cluster"] for c in (imp.get("status") or {}).get("clusters") or []] == clusters, imp
    svc = lab.json(context, "get", "service", derived_name("default", NAME))
    assert imp["spec"]["ips"] == [svc["spec"]["clusterIP"]]
    return imp


def answers(lab: Lab, context: str, target: str, count: int = 20) -> dict[str, int]:
    out = lab.kubectl(context, "exec", "deploy/x-wing", "--", "sh", "-c",
                      f"for i in $(seq {count}); do curl -s --max-time 2 {target} || echo FAILED; done", check=False)
    clusters = re.findall(r'"Cluster": "(Cluster-\d)"', out)
    return {name: clusters.count(name) for name in set(clusters)} | {"failed": out.count("FAILED")}


def test_the_import_is_in_every_cluster_of_the_set(lab: Lab) -> None:
    for context in ("lab-1", "lab-2", "lab-3"):
        try:
            eventually(lambda c=context: _imported(lab, c, ["lab-1", "lab-2"]), timeout=120, interval=1)
        except AssertionError as exc:
            raise AssertionError(f"{context}: the import lacks a cluster\n{diagnosis(lab, context)}\n{exc}") from None
        headless = lab.json(context, "get", "serviceimport", HEADLESS)
        assert headless["spec"]["type"] == "Headless" and not headless["spec"].get("ips"), headless
    for context in EXPORTERS:
        export = lab.json(context, "get", "serviceexport", NAME)
        conditions = {c["type"]: (c["status"], c["reason"]) for c in export["status"]["conditions"]}
        assert conditions == {"Valid": ("True", "Valid"), "Ready": ("True", "Exported"),
                              "Conflict": ("False", "NoConflicts")}, conditions
    # The README's view: the conditions and the IPs as columns.
    table = lab.kubectl("lab-1", "get", "serviceexport,serviceimport")
    assert re.search(rf"serviceexport\S*/{NAME}\s+True\s+True\s+False", table), table
    ip = lab.json("lab-1", "get", "serviceimport", NAME)["spec"]["ips"][0]
    assert re.search(rf"serviceimport\S*/{NAME}\s+ClusterSetIP\s+\[\"{re.escape(ip)}\"\]", table), table


STORE_ETCDCTL = ("ETCDCTL_API=3 etcdctl --endpoints=https://127.0.0.1:12379 --cacert=/etc/clustermesh/tls/ca.crt "
                 "--cert=/etc/clustermesh/tls/root.crt --key=/etc/clustermesh/tls/root.key ")


def _json_or_empty(lab: Lab, context: str, *args: str) -> dict:
    try:
        return dict(json.loads(lab.kubectl(context, *args, "-o", "json", check=False)))
    except ValueError:
        return {}


def diagnosis(lab: Lab, context: str) -> str:
    """Where the path from lab-1's and lab-2's rebel bases to ``context``'s x-wing stops, for a failure's
    message: the derived Service in each exporter (its global/shared annotations), each store replica's
    copy of each exporter's record of it (its own state and its cache), the x-wing's hosts line, and
    the agents' last words about it. (Store chaos replaces these pods afterwards: this is the only look.)"""
    derived = derived_name("default", NAME)
    # First what each store pod's operator said last (CI shows the start of a long message): how it
    # counts each remote's exports, and its latest warnings about remotes and watches.
    out = []
    for c in ("lab-1", "lab-2", "lab-3"):
        pods = _json_or_empty(lab, c, "get", "pods", "-n", "clustermesh-system", "-l",
                              "app.kubernetes.io/name=clustermesh-store")
        for pod in pods.get("items", []):
            name = pod["metadata"]["name"]
            logs = lab.kubectl(c, "logs", "-n", "clustermesh-system", name, "-c", "operator", check=False)
            lines = logs.splitlines()
            last: dict[str, str] = {}
            for line in lines:
                m = re.search(r"MCS-API: remote (\S+):", line)
                if m:
                    last[m.group(1)] = line[line.index("MCS-API"):]
            warnings = [line for line in lines if " WARNING " in line or "new settings" in line]
            out.append(f"{c} {name}: {'; '.join(last.values()) or 'no MCS-API line'}; latest warnings: "
                       + " | ".join(w[:200] for w in warnings[-4:]))
    for c in EXPORTERS:
        svc = _json_or_empty(lab, c, "get", "service", derived)
        meta = svc.get("metadata") or {}
        out.append(f"{c} {derived}: annotations {meta.get('annotations')} clusterIP "
                   f"{(svc.get('spec') or {}).get('clusterIP')}")
        pods = _json_or_empty(lab, c, "get", "pods", "-n", "clustermesh-system", "-l",
                              "app.kubernetes.io/name=clustermesh-store")
        for pod in pods.get("items", []):
            name = pod["metadata"]["name"]
            got = lab.kubectl(c, "exec", "-n", "clustermesh-system", name, "-c", "etcd-users", "--", "sh", "-c",
                              STORE_ETCDCTL + f"get --prefix --keys-only cilium/ | grep -e '/default/{derived}$' "
                              "-e serviceexports", check=False)
            out.append(f"{c} store {name} keys: {' '.join(got.split())}")
    hosts = lab.kubectl(context, "exec", "deploy/x-wing", "--", "grep", "clusterset", "/etc/hosts", check=False)
    out.append(f"{context} x-wing hosts: {hosts.strip()}")
    logs = lab.kubectl(context, "logs", "-n", "clustermesh-system", "ds/clustermesh-agent", "--tail=10", check=False)
    out.append(f"{context} agent log tail:\n{logs}")
    return "\n".join(out)


def test_x_wings_reach_both_clusters_by_the_clusterset_name(lab: Lab) -> None:
    for context in EXPORTERS:
        def both(c: str = context) -> None:
            got = answers(lab, c, CLUSTERSET)
            assert got["failed"] == 0 and {"Cluster-1", "Cluster-2"} <= set(got), got
        try:
            eventually(both, timeout=180, interval=1)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{diagnosis(lab, context)}") from None
    # A Service that is not exported has no clusterset name.
    got = answers(lab, "lab-1", "rebel-base.default.svc.clusterset.local", count=2)
    assert got == {"failed": 2}, got


def test_scaling_one_exporter_to_zero_loses_nothing(lab: Lab, tmp_path) -> None:
    loop = AttemptLoop.in_xwing(lab.kubeconfig, "lab-1", CLUSTERSET, raw=tmp_path / "attempts.txt")

    def both_answer(attempts: list) -> bool:
        recent = {a.answer for a in attempts if a.t >= time.time() - 3 and a.exit_code == 0}
        return all(any(f'"Cluster": "{c}"' in answer for answer in recent) for c in ("Cluster-1", "Cluster-2"))

    try:
        start = loop.wait_clean({"Cluster-1", "Cluster-2"}, seconds=3, timeout=90)
        loop.wait_for(both_answer, 90, "answers from both clusters")  # lab-1's own backends are in
        lab.kubectl("lab-1", "scale", "deployment", "rebel-base", "--replicas=0")

        def only_cluster_2(attempts: list) -> bool:
            recent = [a for a in attempts if a.t >= time.time() - 3]
            return bool(recent) and all(a.exit_code == 0 and answer_problem(a.answer, {"Cluster-2"}) is None
                                        for a in recent)

        loop.wait_for(only_cluster_2, 60, "3 s of answers from Cluster-2 only")
        lab.kubectl("lab-1", "scale", "deployment", "rebel-base", "--replicas=2")
        lab.kubectl("lab-1", "rollout", "status", "deployment/rebel-base", "--timeout=150s", timeout=180)
        loop.wait_for(both_answer, 90, "answers from both clusters again")
        end = time.time()
        loop.wait_past(end)
        verdict = judge(loop.attempts(), {"Cluster-1", "Cluster-2"}, 1.0, start=start, end=end)
        assert verdict.attempts >= 20 and not verdict.failures, verdict.describe()
    finally:
        loop.stop()


def test_the_import_goes_with_the_last_export(lab: Lab) -> None:
    lab.kubectl("lab-1", "delete", "serviceexport", NAME)
    for context in ("lab-1", "lab-2", "lab-3"):
        eventually(lambda c=context: _imported(lab, c, ["lab-2"]), timeout=90, interval=1)

    # Exported by lab-2 only: lab-1's x-wing reaches it by the clusterset name, and only lab-2 answers
    # (lab-1's rebel bases still serve the Service they export no more, not the import).
    def only_lab_2() -> None:
        got = answers(lab, "lab-1", CLUSTERSET)
        assert got == {"Cluster-2": 20, "failed": 0}, got

    eventually(only_lab_2, timeout=60, interval=1)
    lab.kubectl("lab-2", "delete", "serviceexport", NAME)

    def gone(context: str) -> None:
        out = lab.kubectl(context, "get", "serviceimport", NAME, "--ignore-not-found", "-o", "name")
        assert out.strip() == "", out
        out = lab.kubectl(context, "get", "service", derived_name("default", NAME), "--ignore-not-found",
                          "-o", "name")
        assert out.strip() == "", out

    for context in ("lab-1", "lab-2", "lab-3"):
        eventually(lambda c=context: gone(c), timeout=90, interval=1)
    # The headless export is untouched by another Service's unexport.
    assert lab.json("lab-3", "get", "serviceimport", HEADLESS)["spec"]["type"] == "Headless"
