"""``clustermesh lab``: the whole mesh on this machine, no Docker (see mesh.py).

    clustermesh lab up [--clusters 2] [--nodes 2] [--demo] [--no-wait]   bring it up; Ctrl-C tears it down
    clustermesh lab status                                                clusters, nodes, pods, processes
    clustermesh lab down                                                  remove a lab (also after a crash)
    clustermesh lab xwing [--cluster lab-1] [--count 10]                  x-wing asks rebel-base (kubectl exec)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clustermesh.lab.mesh import REPO, LabCluster, LabMesh
from clustermesh.lab.netns import NetnsError
from clustermesh.lab.servers import CACHE, ServerError
from clustermesh.lab.teardown import process_start, teardown

DEMO = REPO / "demo" / "starwars"


def _base(args: argparse.Namespace) -> Path:
    return Path(args.dir) if getattr(args, "dir", None) else CACHE / "lab"


class Interrupted(Exception):
    pass


# ------------------------------------------------------------------ the x-wing loop


@dataclass
class Answers:
    """Answers of an x-wing loop, timestamped: which cluster answered, or a failure."""

    events: list[tuple[float, str]] = field(default_factory=list)
    # curl's exit code of each failure, by the time of its event: 28 is a stall (no answer within
    # --max-time), 7 a refused connection, 52/56 an empty or reset answer.
    exit_codes: dict[float, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, what: str, exit_code: str = "") -> None:
        with self.lock:
            t = time.monotonic()
            self.events.append((t, what))
            if exit_code:
                self.exit_codes[t] = exit_code

    def failures_since(self, t0: float) -> list[str]:
        """Each failure after ``t0``: when, counted from ``t0``, and curl's exit code."""
        with self.lock:
            return [f"+{t - t0:.2f}s (curl exit {self.exit_codes.get(t, '?')})"
                    for t, w in self.events if t >= t0 and w == "failed"]

    def since(self, t: float) -> list[tuple[float, str]]:
        with self.lock:
            return [e for e in self.events if e[0] >= t]


def xwing_command(kubeconfig: str, context: str, count: int | None, pause: float = 0.05) -> list[str]:
    """kubectl exec into x-wing: a shell loop of curl to rebel-base, a new connection per request;
    each answer is rebel-base's JSON line, each failure a line ``FAILED <curl's exit code>``."""
    loop = "while :" if count is None else f"for i in $(seq {count})"
    script = (f"{loop}; do curl -s --max-time 1 rebel-base || echo FAILED $?; sleep {pause}; done")
    return ["kubectl", "--kubeconfig", kubeconfig, "--context", context, "exec", "deploy/x-wing", "--",
            "sh", "-c", script]


def classify(line: str) -> str | None:
    line = line.strip()
    if not line:
        return None
    if line.split(" ", 1)[0] == "FAILED":
        return "failed"
    try:
        return str(json.loads(line).get("Cluster", "?"))
    except ValueError:
        return None


class XwingLoop:
    """An endless x-wing loop in the background, feeding ``Answers``."""

    def __init__(self, kubeconfig: str, context: str) -> None:
        self.answers = Answers()
        self.proc = subprocess.Popen(xwing_command(kubeconfig, context, None), stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            what = classify(line)
            if what:
                self.answers.add(what, line.strip()[len("FAILED "):] if what == "failed" else "")

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(10)


def bar_line(counts: Counter[str], names: list[str]) -> str:
    parts = [f"{n} {'#' * min(counts[n], 30):<30} {counts[n]:3d}/s" for n in names]
    return "   ".join(parts) + f"   failed {counts['failed']}"


# ------------------------------------------------------------------ the demo


def apply_demo(c: LabCluster) -> None:
    manifest = DEMO / f"cluster{c.index}.yaml"
    if manifest.exists():
        c.kubectl("apply", "-f", str(manifest))
    else:  # clusters past the second answer as themselves
        text = (DEMO / "cluster2.yaml").read_text().replace("Cluster-2", f"Cluster-{c.index}")
        c.kubectl("apply", "-f", "-", stdin=text)


def wait_rollout(c: LabCluster) -> None:
    c.kubectl("rollout", "status", "deployment/rebel-base", "--timeout=180s", timeout=200)
    c.kubectl("rollout", "status", "deployment/x-wing", "--timeout=180s", timeout=200)


def watch(loop: XwingLoop, seconds: float, names: list[str], until: Any = None) -> None:
    """Print answers per second by cluster for ``seconds`` (or until ``until()``)."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        t = time.monotonic()
        time.sleep(1)
        counts = Counter(w for _, w in loop.answers.since(t) if _ < t + 1)
        print(f"  {bar_line(counts, names)}", flush=True)
        if until is not None and until():
            return


def wait_for_answers(loop: XwingLoop, want: set[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        t = time.monotonic()
        time.sleep(1)
        seen = {w for _, w in loop.answers.since(t)}
        if seen == want:
            return
    raise ServerError(f"x-wing never got answers from exactly {sorted(want)} in {timeout:.0f}s")


def demo(mesh: LabMesh) -> None:
    kubeconfig = str(mesh.kubeconfig)
    first = mesh.clusters[0]
    names = [f"Cluster-{c.index}" for c in mesh.clusters]
    print("\n=== Star Wars demo (everything below is plain kubectl) ===", flush=True)
    for c in mesh.clusters:
        print(f"$ kubectl --context {c.name} apply -f demo/starwars/cluster{c.index}.yaml", flush=True)
        apply_demo(c)
    for c in mesh.clusters:
        wait_rollout(c)
    print(f"$ kubectl --context {first.name} exec deploy/x-wing -- sh -c 'while :; do curl -s rebel-base; done'",
          flush=True)
    loop = XwingLoop(kubeconfig, first.name)
    try:
        wait_for_answers(loop, set(names), 90)
        print(f"x-wing in {first.name} -> rebel-base, answers per second:", flush=True)
        watch(loop, 4, names)
        print(f"\n$ kubectl --context {first.name} scale deployment rebel-base --replicas=0", flush=True)
        t0 = time.monotonic()
        first.kubectl("scale", "deployment", "rebel-base", "--replicas=0")

        def only_remote() -> bool:
            recent = loop.answers.since(time.monotonic() - 2)
            return bool(recent) and all(w != names[0] for _, w in recent) and time.monotonic() - t0 > 3

        watch(loop, 30, names, until=only_remote)
        after = loop.answers.since(t0)
        local = [t for t, w in after if w == names[0]]
        failed = sum(1 for _, w in after if w == "failed")
        took = (max(local) - t0) if local else 0.0
        if any(w == names[0] for _, w in loop.answers.since(time.monotonic() - 2)):
            raise ServerError(f"{names[0]} still answers after the scale to 0")
        print(f"\nfailover: last answer from {names[0]} {took:.2f}s after the scale command; since then only "
              f"{', '.join(names[1:])}; failed requests: {failed}", flush=True)
        print(f"\n$ kubectl --context {first.name} scale deployment rebel-base --replicas=2", flush=True)
        first.kubectl("scale", "deployment", "rebel-base", "--replicas=2")
        wait_rollout(first)
        wait_for_answers(loop, set(names), 60)
        watch(loop, 3, names)
    finally:
        loop.stop()
    print("", flush=True)


# ------------------------------------------------------------------ up


def _stdout_closed() -> bool:
    """A closed terminal or a reader gone from our pipe: tear down, as after Ctrl-C."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLERR | select.POLLHUP)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


def lab_up(args: argparse.Namespace) -> int:
    base = _base(args)
    if (base / "state.json").exists():
        print(f"lab: a lab is recorded in {base / 'state.json'}; removing it first (clustermesh lab down)",
              flush=True)
        lab_down(args)
    if base.exists():
        subprocess.run(["rm", "-rf", str(base)], check=True)
    base.mkdir(parents=True)
    names = [f"lab-{i}" for i in range(1, args.clusters + 1)]
    direct = names if args.direct == "all" else [n for n in (args.direct or "").split(",") if n]
    if direct and args.processes:
        raise ServerError("--direct is for the lab from deploy/ (the --processes lab's agents always read "
                          "each remote directly); drop one of them")
    unknown = sorted(set(direct) - set(names))
    if unknown:
        raise ServerError(f"--direct names {', '.join(unknown)}; the lab's clusters are {', '.join(names)}")
    mesh = LabMesh(base, clusters=args.clusters, nodes=args.nodes, from_manifests=not args.processes,
                   direct=direct)

    def interrupted(signum: int, _frame: object) -> None:
        raise Interrupted(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, interrupted)
    try:
        started = time.monotonic()
        mesh.up()
        print(
            f"\nThe lab is up ({time.monotonic() - started:.0f}s): {len(mesh.clusters)} clusters x "
            f"{mesh.nodes_per_cluster} nodes.\n"
            f"  export KUBECONFIG={mesh.kubeconfig}\n"
            "  kubectl --context lab-1 get nodes -o wide\n"
            "  kubectl --context lab-1 get clustermesh\n"
            "  kubectl --context lab-1 apply -f demo/starwars/cluster1.yaml   (and cluster2.yaml to lab-2)\n"
            "  kubectl --context lab-1 exec -ti deploy/x-wing -- curl -s rebel-base\n"
            "  kubectl --context lab-1 scale deployment rebel-base --replicas=0   # failover to lab-2\n"
            "  clustermesh lab status        # clusters, nodes, pods, processes\n"
            f"  logs: {base} (lab {mesh.tag}: namespaces cml-{mesh.tag}-*)\n",
            flush=True,
        )
        supervising = threading.Event()

        def supervise() -> None:  # also while the demo runs: a process that dies there comes back too
            while not supervising.wait(1):
                mesh.check()

        supervisor = threading.Thread(target=supervise, name="supervise", daemon=True)
        supervisor.start()
        try:
            if args.demo:
                demo(mesh)
            if args.no_wait:
                return 0
            print("The lab runs until Ctrl-C (or `clustermesh lab down`).", flush=True)
            while not _stdout_closed():
                time.sleep(1)
            return 0
        finally:
            supervising.set()
            supervisor.join(10)  # no restart may race the teardown
    except (ServerError, NetnsError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        print(f"lab: {exc}", file=sys.stderr)
        return 1
    except (Interrupted, KeyboardInterrupt) as exc:
        with contextlib.suppress(OSError):
            print(f"[lab] {exc or 'interrupted'}", flush=True)
        return 130
    finally:
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)  # a second signal must not stop the teardown half-way
        with contextlib.suppress(OSError):
            print("[lab] tearing down", flush=True)
        problems = mesh.down()
        for p in problems:
            print(f"[lab] teardown: {p}", file=sys.stderr)
        if not problems:  # else the record stays for `clustermesh lab down`
            mesh.state_path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            print("[lab] down", flush=True)


# ------------------------------------------------------------------ down, status, xwing


def _state(args: argparse.Namespace) -> dict[str, Any]:
    path = _base(args) / "state.json"
    if not path.exists():
        raise ServerError(f"no lab recorded ({path} is missing): start one with clustermesh lab up")
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _alive(state: dict[str, Any]) -> bool:
    """Whether the lab's supervisor still runs: the same pid and the same start time."""
    pid = int(state.get("supervisor", 0))
    return bool(pid) and pid != os.getpid() and process_start(pid) == state.get("supervisor_start")


def lab_down(args: argparse.Namespace) -> int:
    path = _base(args) / "state.json"
    if not path.exists():
        print(f"no lab recorded in {path}; nothing to do")
        return 0
    state = json.loads(path.read_text())
    if _alive(state):
        pid = int(state["supervisor"])
        print(f"stopping the lab's supervisor (pid {pid})", flush=True)
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 90
        while _alive(state) and time.monotonic() < deadline:
            time.sleep(0.2)
    problems = teardown(state)
    for p in problems:
        print(f"lab down: {p}", file=sys.stderr)
    if problems:  # keep the record: another `lab down` can try again
        print(f"lab down: finished with the problems above; {path} is kept, run `clustermesh lab down` again",
              file=sys.stderr)
        return 1
    path.unlink(missing_ok=True)
    print("lab down: processes, namespaces, cgroups and BPF pins removed")
    return 0


def lab_status(args: argparse.Namespace) -> int:
    state = _state(args)
    kubeconfig = state["kubeconfig"]
    sup = int(state.get("supervisor", 0))
    print(f"lab {state['tag']} in {state['directory']}; supervisor pid {sup} "
          f"({'running' if _alive(state) else 'not running: clustermesh lab down cleans up'})")
    print(f"KUBECONFIG={kubeconfig}\n")
    for cluster in state["clusters"]:
        print(f"== {cluster}")
        for what in (["get", "nodes", "-o", "wide"], ["get", "pods", "-A", "-o", "wide"], ["get", "clustermesh"]):
            res = subprocess.run(["kubectl", "--kubeconfig", kubeconfig, "--context", cluster, *what],
                                 capture_output=True, text=True, timeout=30)
            print(res.stdout.rstrip() or res.stderr.rstrip())
        print()
    system = Path(state["cgroup_root"]) / "system" / "cgroup.procs"
    print("== processes")
    with contextlib.suppress(OSError):
        for pid in system.read_text().split():
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                print(f"  {pid:>7}  {_short(argv)}")
    return 0


def _short(argv: list[bytes]) -> str:
    """A lab process as a person names it: which component, of which cluster or node."""
    words = [a.decode(errors="replace") for a in argv if a]
    if not words:
        return "?"

    def opt(name: str) -> str:
        for i, w in enumerate(words):
            if w == name and i + 1 < len(words):
                return words[i + 1]
            if w.startswith(name + "="):
                return w.split("=", 1)[1]
        return ""

    binary = Path(words[0]).name
    if "clustermesh.lab.node.agent" in words:
        return f"node agent       {opt('--node')}"
    if "clustermesh.cli" in words:
        component = words[words.index("clustermesh.cli") + 1]
        where = opt("--node") or Path(opt("--kubeconfig")).parent.parent.name
        return f"{component:<16} {where}"
    if "kube-proxy" in " ".join(words[:6]):
        return f"kube-proxy       {opt('--hostname-override')}"
    if binary == "etcd" and "grpc-proxy" in words:
        return f"etcd grpc-proxy  {opt('--listen-addr')}"
    if binary == "etcd":
        return f"etcd             {opt('--name')}"
    if binary.startswith("kube-"):
        return f"{binary:<16} {Path(opt('--kubeconfig') or opt('--token-auth-file')).parent.parent.name}"
    return " ".join(words)[:120]


def lab_xwing(args: argparse.Namespace) -> int:
    state = _state(args)
    if args.cluster not in state["clusters"]:
        raise ServerError(f"no cluster {args.cluster!r}; the lab has {', '.join(state['clusters'])}")
    res = subprocess.run(xwing_command(state["kubeconfig"], args.cluster, args.count, pause=0.05),
                         capture_output=True, text=True, timeout=60 + args.count)
    counts: Counter[str] = Counter()
    for line in res.stdout.splitlines():
        what = classify(line)
        if what:
            counts[what] += 1
            print(line.strip())
    if res.returncode != 0 and not counts:
        print(res.stderr.strip(), file=sys.stderr)
        return 1
    summary = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()) if k != "failed")
    print(f"answers by cluster: {summary or 'none'}; failed: {counts['failed']}")
    return 0 if counts["failed"] == 0 else 1


def run_lab(args: argparse.Namespace) -> int:
    try:
        if args.lab_command == "up":
            return lab_up(args)
        if args.lab_command == "down":
            return lab_down(args)
        if args.lab_command == "status":
            return lab_status(args)
        if args.lab_command == "xwing":
            return lab_xwing(args)
    except ServerError as exc:
        print(f"lab: {exc}", file=sys.stderr)
        return 1
    print(__doc__, file=sys.stderr)
    return 2
