#!/usr/bin/env python3
"""Failover benchmark: how fast, and how cleanly, an x-wing in lab-1 moves to lab-2's rebel-base.

    .venv/bin/python bench/failover_bench.py [--rounds 20] [--variants a,b,c] [--rate 200] [--keep]
                                             [--lab-dir DIR] [--json] [--events FILE]

Runs as root (the lab needs it). Starts its own lab (``clustermesh lab up --dir <tmp>``, 2 clusters x 2 nodes)
unless ``--lab-dir`` names a running one, applies demo/starwars/cluster{1,2}.yaml with kubectl and waits for
the rollouts. A client loop runs inside an x-wing pod of lab-1 (``kubectl exec deploy/x-wing -- python3 -c``):
a new TCP connection to ``rebel-base:80`` per request, ``--rate`` requests per second, 1 s timeout per
request, one line per request: ``<CLOCK_MONOTONIC at connect> <Cluster-N | FAIL:<errno name>>``. The pod
shares the host's clock, so those times compare with this process's ``time.monotonic()``.

Variants, ``--rounds`` times each, all in lab-1:

  a  ``kubectl scale deployment rebel-base --replicas=0``; then back to 2, until both clusters answer.
  b  ``kubectl delete pod -l name=rebel-base --wait=false``; the Deployment makes new pods.
  c  SIGKILL of every process of each rebel-base container (main pid from the node agent's record.json, the
     rest from the container's cgroup.procs); the node agent restarts the containers. Each c round starts
     from containers that never restarted (``kubectl rollout restart`` in between when needed): a kubelet's
     crash-loop backoff (10 s, 20 s, ... 5 min from the second restart on) would otherwise grow round by round.

Per round, t0 is taken just before the command (or the first kill):
  failover   t0 -> the last Cluster-1 answer before lab-1's outage (the longest stretch without a
             Cluster-1 answer after t0; for a it lasts until the round ends)
  outage     how long that stretch lasted (b, c: until the new or restarted backends answer)
  failed     failed requests from t0 until 3 s (``--settle``) after that last Cluster-1 answer
  failed all failed requests from t0 to the end of the round's observation
  last fail  t0 -> the start of the last failed request
Times are the requests' connect times. p99 is nearest-rank: over 20 rounds, the maximum.
A round whose backends do not come back within ``--timeout`` is reported as stuck, with the pods' state, and
left out of the figures; the Deployment is renewed (``kubectl rollout restart``) and the bench goes on.

A default run (20 rounds x 3 variants) takes about 7.5 minutes on 2 CPUs: 25 s for the lab, 15 s for the
demo, then a round of a about 6.6 s (scale back and wait included), of b 4.3 s, of c 9.2 s (4.3 s plus the pod
renewal).

The table goes to stdout (``--json``: a JSON document instead); progress goes to stderr. The lab this
started is removed at the end (``clustermesh lab down``), also on errors and Ctrl-C, unless ``--keep``.
Nothing here connects from the host to a lab address: the client runs in the pod.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import itertools
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "demo" / "starwars"
LOCAL, REMOTE = "Cluster-1", "Cluster-2"
CTX1, CTX2 = "lab-1", "lab-2"
LABEL = "name=rebel-base"
CONTAINER = "rebel-base"

VARIANTS = {
    "a": "kubectl scale --replicas=0",
    "b": "kubectl delete pod (all local)",
    "c": "kill -9 backend processes",
}

# The client, run by the pod's python3 (the host's /usr/bin/python3: the pod sees the host's binaries).
# Paced to a schedule so that a slow request does not make a burst afterwards; the time printed is taken
# before connect(), which is when the socket-LB picks the backend.
CLIENT = r"""
import errno, re, socket, sys, time
rate, until = float(sys.argv[1]), time.monotonic() + float(sys.argv[2])
step, nxt = 1.0 / rate, time.monotonic()
pat = re.compile(rb'"Cluster": *"([^"]+)"')
while time.monotonic() < until:
    now = time.monotonic()
    if nxt > now:
        time.sleep(nxt - now)
    t = time.monotonic()
    nxt = max(nxt + step, t - step)
    try:
        s = socket.create_connection(("rebel-base", 80), timeout=1)
        try:
            s.settimeout(max(0.001, 1 - (time.monotonic() - t)))
            s.sendall(b"GET / HTTP/1.0\r\nHost: rebel-base\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        finally:
            s.close()
        m = pat.search(data)
        if m and data.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
            what = m.group(1).decode()
        else:
            what = "FAIL:" + ("HTTP" + data[9:12].decode(errors="replace") if data else "EMPTY")
    except OSError as e:
        what = "FAIL:" + (errno.errorcode.get(e.errno, str(e.errno)) if e.errno else type(e).__name__)
    try:
        print(f"{t:.6f} {what}", flush=True)
    except BrokenPipeError:
        break
"""


class BenchError(RuntimeError):
    pass


class WaitTimeout(BenchError):
    pass


class RoundStuck(BenchError):
    """A round whose backends did not come back: recorded, the Deployment renewed, the bench goes on."""


_T_START = time.monotonic()


def say(msg: str) -> None:
    print(f"[{time.monotonic() - _T_START:6.1f}s] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ the lab


class Lab:
    """A lab this bench started (``own``) or one it was pointed at."""

    def __init__(self, directory: Path, own: bool, proc: subprocess.Popen[bytes] | None = None,
                 log: Path | None = None) -> None:
        self.directory = directory
        self.own = own
        self.proc = proc
        self.log = log
        self.kubeconfig = directory / "kubeconfig"
        self._drain: threading.Thread | None = None

    @classmethod
    def start(cls, root: Path, keep: bool, timeout: float = 300, extra: tuple[str, ...] = ()) -> Lab:
        directory, log = root / "lab", root / "lab-up.log"
        argv = [sys.executable, "-m", "clustermesh.cli", "lab", "up", "--dir", str(directory), *extra]
        say(f"starting a lab: {' '.join(argv[2:])} (log {log})")
        if keep:
            # The lab tears itself down once its stdout reader goes away; a file has none, so it outlives us.
            with log.open("wb") as out:
                proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True)
            lab = cls(directory, True, proc, log)
        else:
            # A pipe: should this bench die without cleaning up, the lab sees its stdout close and tears down.
            proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            lab = cls(directory, True, proc, log)
            lab._drain = threading.Thread(target=lab._copy_output, daemon=True)
            lab._drain.start()
        lab._wait_up(timeout)
        return lab

    def _copy_output(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None and self.log is not None
        with self.log.open("wb") as out:
            for line in self.proc.stdout:
                out.write(line)
                out.flush()

    def _wait_up(self, timeout: float) -> None:
        assert self.proc is not None and self.log is not None
        deadline = time.monotonic() + timeout
        shown = 0
        while time.monotonic() < deadline:
            lines = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
            for line in lines[shown:]:
                if line.startswith("[lab"):
                    say(line)
            shown = len(lines)
            if any(line.startswith("The lab is up") for line in lines):
                say(next(line for line in lines if line.startswith("The lab is up")))
                return
            if self.proc.poll() is not None:
                tail = "\n".join(lines[-15:])
                raise BenchError(f"clustermesh lab up exited with {self.proc.returncode}:\n{tail}")
            time.sleep(0.3)
        raise BenchError(f"the lab was not up after {timeout:.0f}s; see {self.log}")

    def state(self) -> dict[str, Any]:
        path = self.directory / "state.json"
        if not path.exists():
            raise BenchError(f"no lab recorded in {path}")
        data: dict[str, Any] = json.loads(path.read_text())
        return data

    def down(self) -> bool:
        """``clustermesh lab down --dir``; True when it reported no problem."""
        say(f"tearing the lab down: clustermesh lab down --dir {self.directory}")
        ok = True
        try:
            res = subprocess.run([sys.executable, "-m", "clustermesh.cli", "lab", "down", "--dir",
                                  str(self.directory)], cwd=REPO, capture_output=True, text=True, timeout=240)
            for line in (res.stdout + res.stderr).strip().splitlines():
                say(f"  {line}")
            ok = res.returncode == 0
        except subprocess.TimeoutExpired:
            say("  lab down did not finish in 240s")
            ok = False
        if self.proc is not None:
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                say(f"  lab up (pid {self.proc.pid}) still runs; killing it and cleaning up again")
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                self.proc.wait(30)
                subprocess.run([sys.executable, "-m", "clustermesh.cli", "lab", "down", "--dir",
                                str(self.directory)], cwd=REPO, capture_output=True, timeout=240)
                ok = False
        if self._drain is not None:
            self._drain.join(10)
        return ok


class Kube:
    def __init__(self, kubeconfig: Path) -> None:
        self.kubeconfig = str(kubeconfig)

    def argv(self, ctx: str, *args: str) -> list[str]:
        return ["kubectl", "--kubeconfig", self.kubeconfig, "--context", ctx, *args]

    def run(self, ctx: str, *args: str, timeout: float = 60, check: bool = True) -> str:
        try:
            res = subprocess.run(self.argv(ctx, *args), capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"kubectl --context {ctx} {' '.join(args)}: no answer in {timeout:.0f}s") from exc
        if check and res.returncode != 0:
            raise BenchError(f"kubectl --context {ctx} {' '.join(args)}: {res.stderr.strip() or res.stdout.strip()}")
        return res.stdout

    def json(self, ctx: str, *args: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.run(ctx, *args, "-o", "json"))
        return data


@dataclass
class Backend:
    name: str
    uid: str
    node: str
    ready: bool
    deleting: bool
    restarts: int
    state: str  # the container's state as kubectl shows it: running, waiting:<reason>, terminated:<reason>


def backends(kube: Kube) -> list[Backend]:
    out = []
    for pod in kube.json(CTX1, "get", "pods", "-l", LABEL)["items"]:
        status = pod.get("status", {})
        cs: dict[str, Any] = next((c for c in status.get("containerStatuses") or [] if c.get("name") == CONTAINER), {})
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
        kind, detail = next(iter((cs.get("state") or {"unknown": {}}).items()))
        out.append(Backend(pod["metadata"]["name"], pod["metadata"]["uid"], pod["spec"].get("nodeName", ""),
                           ready, bool(pod["metadata"].get("deletionTimestamp")), int(cs.get("restartCount", 0)),
                           kind + (f":{detail['reason']}" if detail.get("reason") else "")))
    return out


def describe(pods: list[Backend]) -> str:
    return "; ".join(f"{p.name} on {p.node}: {p.state}, ready={p.ready}, restarts={p.restarts}"
                     + (", terminating" if p.deleting else "") for p in pods) or "none"


def two_ready(pods: list[Backend]) -> bool:
    return len(pods) == 2 and all(p.ready and not p.deleting for p in pods)


# ------------------------------------------------------------------ the client in the x-wing pod


class Client:
    """The request loop inside x-wing (kubectl exec), its answers kept in time order."""

    def __init__(self, kube: Kube, rate: float, seconds: float) -> None:
        argv = kube.argv(CTX1, "exec", "deploy/x-wing", "--", "python3", "-c", CLIENT, str(rate), str(seconds))
        self.times: list[float] = []
        self.whats: list[str] = []
        self.lock = threading.Lock()
        self.stderr: list[str] = []
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            parts = line.split()
            if len(parts) != 2:
                continue
            try:
                t = float(parts[0])
            except ValueError:
                continue
            with self.lock:
                self.times.append(t)
                self.whats.append(parts[1])

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr = [*self.stderr[-20:], line.rstrip()]

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(f"the x-wing client stopped (kubectl exec exited with {self.proc.returncode}): "
                             + " | ".join(self.stderr[-5:]))

    def latest(self) -> float:
        with self.lock:
            return self.times[-1] if self.times else 0.0

    def between(self, start: float, end: float = math.inf) -> list[tuple[float, str]]:
        with self.lock:
            i = bisect.bisect_left(self.times, start)
            j = bisect.bisect_right(self.times, end)
            return list(zip(self.times[i:j], self.whats[i:j], strict=True))

    def seen_up_to(self, t: float, timeout: float = 3.0) -> None:
        """Wait until every request started before ``t`` has reported (the loop is sequential, so a
        later start means the earlier ones are in)."""
        deadline = time.monotonic() + timeout
        while self.latest() <= t and time.monotonic() < deadline:
            self.check()
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


def wait_for(what: str, cond: Callable[[], bool], timeout: float, client: Client | None = None,
              every: float = 0.1, progress: float = 10.0) -> None:
    start = time.monotonic()
    next_note = start + progress
    while not cond():
        now = time.monotonic()
        if now - start > timeout:
            raise WaitTimeout(f"timed out after {timeout:.0f}s waiting for {what}")
        if now >= next_note:
            say(f"  still waiting for {what} ({now - start:.0f}s)")
            next_note = now + progress
        if client is not None:
            client.check()
        time.sleep(every)


# ------------------------------------------------------------------ rounds


@dataclass
class Round:
    variant: str
    index: int
    t0: float  # CLOCK_MONOTONIC
    failover: float  # t0 -> last Cluster-1 answer before the outage
    outage: float | None  # that answer -> the next Cluster-1 answer (None: none in the round)
    failed: int  # t0 .. last Cluster-1 answer + settle
    failed_all: int  # t0 .. end of observation
    last_fail: float | None
    errors: dict[str, int]
    requests: int
    rate: float
    command_s: float  # how long the command itself took (kubectl's own start-up included)
    observed_s: float
    round_s: float = 0.0
    restarts: list[int] = field(default_factory=list)


def longest_gap(points: list[float]) -> tuple[float, float]:
    """The longest stretch between consecutive times (at least two given)."""
    return max(itertools.pairwise(points), key=lambda g: g[1] - g[0])


def analyse(client: Client, variant: str, index: int, t0: float, end: float, settle: float,
            command_s: float) -> Round:
    client.seen_up_to(end)
    events = client.between(t0, end)
    local = [t for t, w in events if w == LOCAL]
    start, stop = longest_gap([t0, *local, end])
    fails = [(t, w) for t, w in events if w.startswith("FAIL")]
    return Round(
        variant=variant, index=index, t0=t0, failover=start - t0,
        outage=(stop - start) if stop < end else None,
        failed=sum(1 for t, _ in fails if t <= start + settle), failed_all=len(fails),
        last_fail=(fails[-1][0] - t0) if fails else None,
        errors=dict(Counter(w.removeprefix("FAIL:") for _, w in fails)),
        requests=len(events), rate=len(events) / max(1e-9, end - t0), command_s=command_s, observed_s=end - t0,
    )


class Bench:
    def __init__(self, lab: Lab, kube: Kube, client: Client, settle: float, timeout: float) -> None:
        self.lab = lab
        self.kube = kube
        self.client = client
        self.settle = settle
        self.timeout = timeout

    # -- steady state between rounds

    def answers_from_both(self, seconds: float = 1.0) -> bool:
        recent = {w for _, w in self.client.between(time.monotonic() - seconds)}
        return LOCAL in recent and REMOTE in recent

    def steady(self) -> None:
        """Two ready local backends, nothing terminating, both clusters answering, a clean last second."""
        wait_for("2 ready rebel-base pods in lab-1 (none terminating)", lambda: two_ready(backends(self.kube)),
                 self.timeout, self.client, every=0.3)
        wait_for("answers from both clusters", self.answers_from_both, self.timeout, self.client)
        t = time.monotonic()
        while time.monotonic() - t < 10:
            time.sleep(1)
            recent = [w for _, w in self.client.between(time.monotonic() - 1)]
            if LOCAL in recent and REMOTE in recent and not any(w.startswith("FAIL") for w in recent):
                return
        say("  note: failed requests or a missing cluster in every second of the last 10 s; starting anyway")

    def local_silent_for(self, t0: float, seconds: float) -> float | None:
        """The last Cluster-1 answer since t0 (or t0), once no Cluster-1 answer came for ``seconds``."""
        local = [t for t, w in self.client.between(t0) if w == LOCAL]
        last = local[-1] if local else t0
        if self.client.latest() - last >= seconds and time.monotonic() - last >= seconds:
            return last
        return None

    # -- variants

    def round_a(self, i: int) -> Round:
        t0 = time.monotonic()
        self.kube.run(CTX1, "scale", "deployment", "rebel-base", "--replicas=0")
        command_s = time.monotonic() - t0
        last: list[float] = []

        def silent() -> bool:
            got = self.local_silent_for(t0, self.settle)
            if got is not None:
                last.append(got)
            return got is not None

        wait_for(f"{LOCAL} to stop answering", silent, self.timeout, self.client, every=0.05)
        r = analyse(self.client, "a", i, t0, last[0] + self.settle, self.settle, command_s)
        self.kube.run(CTX1, "scale", "deployment", "rebel-base", "--replicas=2")
        return r

    def _recovered(self, t0: float, done: Callable[[list[Backend]], bool]) -> float:
        """Wait until the local backends are back (``done``), Cluster-1 answers again and the last
        failure is 2 s old; returns the end of the observation."""
        wait_for("the local backends to be back", lambda: done(backends(self.kube)), self.timeout, self.client,
                 every=0.2)

        def answering() -> bool:
            now = time.monotonic()
            recent = self.client.between(now - 2)
            return (now - t0 >= self.settle and any(w == LOCAL for t, w in recent if t >= now - 1)
                    and not any(w.startswith("FAIL") for _, w in recent))

        wait_for(f"{LOCAL} answering again without failures", answering, self.timeout, self.client)
        local = [t for t, w in self.client.between(t0) if w == LOCAL]
        gap_start = longest_gap([t0, *local, time.monotonic()])[0]
        # The window must hold ``settle`` seconds after the last Cluster-1 answer before the outage.
        end = max(time.monotonic(), gap_start + self.settle)
        while time.monotonic() < end:
            time.sleep(0.05)
        return end

    def round_b(self, i: int) -> Round:
        old = {p.uid for p in backends(self.kube)}
        t0 = time.monotonic()
        self.kube.run(CTX1, "delete", "pod", "-l", LABEL, "--wait=false")
        command_s = time.monotonic() - t0
        end = self._recovered(t0, lambda pods: two_ready(pods) and not old & {p.uid for p in pods})
        return analyse(self.client, "b", i, t0, end, self.settle, command_s)

    def fresh_backends(self) -> None:
        """Containers that never restarted, so the node agent restarts them at once (no crash-loop backoff)."""
        if all(p.restarts == 0 for p in backends(self.kube)):
            return
        say("  replacing rebel-base pods with fresh ones (kubectl rollout restart), so that no backoff applies")
        self.renew_backends()

    def renew_backends(self, scale_first: bool = False) -> None:
        """``kubectl rollout restart`` of rebel-base (scaled back to 2 first if asked), until the old pods are gone."""
        old = {p.uid for p in backends(self.kube)}
        if scale_first:
            self.kube.run(CTX1, "scale", "deployment", "rebel-base", "--replicas=2")
        self.kube.run(CTX1, "rollout", "restart", "deployment/rebel-base")
        self.kube.run(CTX1, "rollout", "status", "deployment/rebel-base", f"--timeout={self.timeout:.0f}s",
                      timeout=self.timeout + 10)
        wait_for("the old rebel-base pods to go", lambda: not old & {p.uid for p in backends(self.kube)},
                 self.timeout, self.client, every=0.3)
        self.steady()

    def kill_targets(self, pods: list[Backend]) -> list[tuple[int, Path]]:
        state = self.lab.state()
        state_dirs = Path(state["clusters"][CTX1]["state_dirs"])
        targets = []
        for p in pods:
            record = json.loads((state_dirs / p.node / "pods" / p.uid / "record.json").read_text())
            pid = int(record["containers"][CONTAINER]["pid"])
            cgroup = Path(state["nodes"][p.node]["cgroup"]) / f"pod-{p.uid}" / CONTAINER
            procs = (cgroup / "cgroup.procs").read_text().split()
            if str(pid) not in procs:
                raise BenchError(f"{p.name}: pid {pid} from record.json is not in {cgroup}/cgroup.procs ({procs})")
            targets.append((pid, cgroup))
        return targets

    def round_c(self, i: int) -> Round:
        pods = backends(self.kube)
        before = {p.uid: p.restarts for p in pods}
        targets = self.kill_targets(pods)
        t0 = time.monotonic()
        for pid, cgroup in targets:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            # Workers too, as a kill -9 of the whole container would: nginx workers outlive their master.
            for other in (cgroup / "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(other), signal.SIGKILL)
        command_s = time.monotonic() - t0

        def restarted(now: list[Backend]) -> bool:
            return two_ready(now) and all(p.uid in before and p.restarts > before[p.uid] for p in now)

        end = self._recovered(t0, restarted)
        r = analyse(self.client, "c", i, t0, end, self.settle, command_s)
        r.restarts = [p.restarts for p in backends(self.kube)]
        return r

    def run(self, variant: str, i: int) -> Round:
        started = time.monotonic()
        self.steady()
        if variant == "c":
            self.fresh_backends()
        try:
            r = {"a": self.round_a, "b": self.round_b, "c": self.round_c}[variant](i)
            if variant == "a":
                self.steady()  # back to two local backends before the clock stops: part of a round's cost
        except WaitTimeout as exc:
            raise RoundStuck(f"{exc}; rebel-base pods in {CTX1}: {describe(backends(self.kube))}") from exc
        r.round_s = time.monotonic() - started
        return r

    def recover(self) -> None:
        """New rebel-base pods after a stuck round, so that the next round starts clean."""
        say("  recovering: kubectl scale --replicas=2 and kubectl rollout restart deployment/rebel-base")
        self.renew_backends(scale_first=True)


# ------------------------------------------------------------------ figures


def pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def summary(rounds: list[Round]) -> dict[str, Any]:
    fo = [r.failover for r in rounds]
    outages = [r.outage for r in rounds if r.outage is not None]
    last_fails = [r.last_fail for r in rounds if r.last_fail is not None]
    errors: Counter[str] = Counter()
    for r in rounds:
        errors.update(r.errors)
    return {
        "rounds": len(rounds),
        "failover_p50": pct(fo, 0.5), "failover_p99": pct(fo, 0.99), "failover_max": max(fo, default=None),
        "outage_p50": pct(outages, 0.5), "outage_max": max(outages, default=None),
        "failed_total": sum(r.failed for r in rounds), "failed_per_round": [r.failed for r in rounds],
        "failed_all_total": sum(r.failed_all for r in rounds),
        "rounds_with_failures": sum(1 for r in rounds if r.failed_all),
        "last_fail_p50": pct(last_fails, 0.5), "last_fail_max": max(last_fails, default=None),
        "errors": dict(errors),
        "rate": statistics.mean(r.rate for r in rounds) if rounds else None,
        "round_s_mean": statistics.mean(r.round_s for r in rounds) if rounds else None,
        "command_s_p50": pct([r.command_s for r in rounds], 0.5),
    }


def fmt(v: float | None, unit: str = "") -> str:
    return "-" if v is None else f"{v:.2f}{unit}"


def table(results: dict[str, list[Round]], stuck: dict[str, list[dict[str, Any]]], client_rate: float | None,
          settle: float) -> str:
    head = (f"{'variant':<34} {'rounds':>6} {'failover p50':>12} {'p99':>6} {'max':>6} {'outage p50':>10} "
            f"{'failed':>6} {'failed all':>10} {'last fail p50':>13} {'max':>6} {'req/s':>6} {'round s':>7}")
    lines = [head, "-" * len(head)]
    notes = []
    for v, rounds in results.items():
        label = f"{v} {VARIANTS[v]}"
        if rounds:
            s = summary(rounds)
            lines.append(
                f"{label:<34} {s['rounds']:>6} {fmt(s['failover_p50']):>12} {fmt(s['failover_p99']):>6} "
                f"{fmt(s['failover_max']):>6} {fmt(s['outage_p50']):>10} {s['failed_total']:>6} "
                f"{s['failed_all_total']:>10} {fmt(s['last_fail_p50']):>13} {fmt(s['last_fail_max']):>6} "
                f"{s['rate']:>6.0f} {s['round_s_mean']:>7.1f}")
            per_round = " ".join(str(r.failed_all) for r in rounds)
            errs = ", ".join(f"{k} {n}" for k, n in sorted(s["errors"].items())) or "none"
            notes.append(f"  {v}: failed requests per round (all): {per_round}; errors: {errs}; "
                         f"command took p50 {fmt(s['command_s_p50'], ' s')}")
        elif stuck.get(v):
            lines.append(f"{label:<34} {0:>6}   (no round completed)")
        for st in stuck.get(v, []):
            notes.append(f"  {v}: round {st['round']} STUCK, left out: {st['what']}")
    lines.append("-" * len(head))
    lines += notes
    lines.append(f"  times in seconds from the action; failover = action -> last Cluster-1 answer; failed = until "
                 f"{settle:g} s after it; failed all = whole round; p99 is nearest-rank (with 20 rounds: the max)")
    if client_rate is not None:
        lines.append(f"  client: {client_rate:.0f} requests/s before the rounds (new connection each)")
    return "\n".join(lines)


def write_events(path: Path, client: Client, results: dict[str, list[Round]]) -> None:
    """The raw timeline, for a look at one round: ``<time> <answer>`` lines and ``<t0> ROUND <v> <i>`` markers."""
    marks = sorted((r.t0, f"ROUND {r.variant} {r.index}") for rs in results.values() for r in rs)
    lines = [f"{t:.6f} {w}" for t, w in sorted([*client.between(0), *marks])]
    path.write_text("\n".join(lines) + "\n")
    say(f"events written to {path}")


# ------------------------------------------------------------------ main


@contextlib.contextmanager
def terminate_as_exit() -> Iterator[None]:
    """SIGTERM/SIGHUP run the finally blocks (the lab comes down), as Ctrl-C does."""
    def handler(signum: int, _frame: object) -> None:
        say(f"{signal.Signals(signum).name}: stopping")
        raise SystemExit(128 + signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def prepare(kube: Kube) -> None:
    for ctx, manifest in ((CTX1, "cluster1.yaml"), (CTX2, "cluster2.yaml")):
        say(f"kubectl --context {ctx} apply -f demo/starwars/{manifest}")
        kube.run(ctx, "apply", "-f", str(DEMO / manifest))
    # A lab given with --lab-dir may have been left scaled down.
    kube.run(CTX1, "scale", "deployment", "rebel-base", "--replicas=2")
    for ctx in (CTX1, CTX2):
        for deploy in ("rebel-base", "x-wing"):
            say(f"kubectl --context {ctx} rollout status deployment/{deploy}")
            kube.run(ctx, "rollout", "status", f"deployment/{deploy}", "--timeout=180s", timeout=200)


def warm_up(client: Client, timeout: float) -> float:
    def both() -> bool:
        recent = {w for _, w in client.between(time.monotonic() - 1)}
        return LOCAL in recent and REMOTE in recent

    wait_for("the x-wing client to get answers from both clusters", both, timeout, client)
    t = time.monotonic()
    time.sleep(3)
    events = client.between(t, t + 3)
    rate = len(events) / 3
    split = Counter(w for _, w in events)
    say(f"client: {rate:.0f} requests/s, new connection each ({', '.join(f'{k} {n}' for k, n in sorted(split.items()))}"
        " in 3 s)")
    return rate


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--variants", default="a,b,c", help="comma-separated subset of a,b,c (default a,b,c)")
    p.add_argument("--rate", type=float, default=200.0, help="client requests per second (default 200)")
    p.add_argument("--settle", type=float, default=3.0,
                   help="seconds after the last Cluster-1 answer that count (default 3)")
    p.add_argument("--timeout", type=float, default=120.0, help="longest wait for one step (default 120 s)")
    p.add_argument("--lab-dir", type=Path, help="use this running lab (clustermesh lab up --dir DIR)")
    p.add_argument("--keep", action="store_true", help="leave the lab this started up")
    p.add_argument("--json", action="store_true", help="print a JSON document instead of the table")
    p.add_argument("--events", type=Path, help="write every request (time, answer) and each round's t0 here")
    args = p.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        p.error(f"--variants: unknown {', '.join(unknown) or '(empty)'}; choose from a,b,c")
    if os.geteuid() != 0:
        p.error("the lab needs root")

    results: dict[str, list[Round]] = {v: [] for v in variants}
    stuck: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    client_rate: float | None = None
    lab: Lab | None = None
    client: Client | None = None
    root: Path | None = None
    ok = False
    with terminate_as_exit():
        try:
            if args.lab_dir:
                lab = Lab(args.lab_dir.resolve(), own=False)
                lab.state()
                say(f"using the lab in {lab.directory}")
            else:
                root = Path(tempfile.mkdtemp(prefix="failover-bench-"))
                lab = Lab.start(root, keep=args.keep)
            kube = Kube(lab.kubeconfig)
            prepare(kube)
            # Long enough for every round even at its slowest; the loop also ends when kubectl exec goes.
            seconds = max(1800.0, args.rounds * len(variants) * 120.0)
            say(f"starting the client in x-wing: kubectl --context {CTX1} exec deploy/x-wing -- python3 -c <loop> "
                f"{args.rate:g} {seconds:.0f}")
            client = Client(kube, args.rate, seconds)
            client_rate = warm_up(client, args.timeout)
            bench = Bench(lab, kube, client, args.settle, args.timeout)
            for v in variants:
                say(f"variant {v}: {VARIANTS[v]}, {args.rounds} rounds")
                for i in range(1, args.rounds + 1):
                    try:
                        r = bench.run(v, i)
                    except RoundStuck as exc:
                        say(f"  {v} {i:>2}/{args.rounds}: STUCK: {exc}")
                        stuck[v].append({"round": i, "what": str(exc)})
                        bench.recover()
                        continue
                    results[v].append(r)
                    say(f"  {v} {i:>2}/{args.rounds}: failover {r.failover:.2f}s, outage {fmt(r.outage, 's')}, "
                        f"failed {r.failed} (all {r.failed_all}{', ' + str(r.errors) if r.errors else ''}), "
                        f"last fail {fmt(r.last_fail, 's')}, {r.rate:.0f} req/s, round {r.round_s:.1f}s")
            ok = True
        except BenchError as exc:
            say(f"error: {exc}")
        except KeyboardInterrupt:
            say("interrupted")
        finally:
            if client is not None:
                client.stop()
                if args.events:
                    write_events(args.events, client, results)
            if any(results.values()) or any(stuck.values()):
                if args.json:
                    doc = {"config": {"rounds": args.rounds, "variants": variants, "rate": args.rate,
                                      "settle": args.settle, "complete": ok},
                           "client_rate": client_rate,
                           "variants": {v: {"what": VARIANTS[v], "summary": summary(rs),
                                            "rounds": [asdict(r) for r in rs], "stuck": stuck[v]}
                                        for v, rs in results.items() if rs or stuck[v]}}
                    print(json.dumps(doc, indent=2))
                else:
                    print(table(results, stuck, client_rate, args.settle))
                    if not ok:
                        print("  (incomplete run: the figures above cover the rounds done)")
            if lab is not None and lab.own:
                if args.keep:
                    say(f"the lab stays up (--keep): KUBECONFIG={lab.kubeconfig}; "
                        f"remove it with: clustermesh lab down --dir {lab.directory}")
                else:
                    down_ok = lab.down()
                    if root is not None and ok and down_ok:
                        shutil.rmtree(root, ignore_errors=True)
                    elif root is not None:
                        say(f"logs kept in {root}")
    say(f"total {time.monotonic() - _T_START:.0f}s")
    return 0 if ok and not any(stuck.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
