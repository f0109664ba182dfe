#!/usr/bin/env python3
"""Socket-LB benchmark: connect() latency and map programming time. Run as root.

    sudo .venv/bin/python bench/datapath_bench.py [--quick]

Prints figures, it is not a test. What it measures, all in one run:

1. connect() latency, timed around the syscall alone by a small C client
   (bench/connect_lat.c, built with gcc here), for 100 / 1,000 / 10,000
   services with 10 backends each:
   - direct connect to a backend, no hook;
   - direct connect from inside the socket-LB cgroup (the hook runs and misses);
   - connect to a ClusterIP through the socket-LB;
   - connect to a ClusterIP through iptables DNAT rules of kube-proxy's shape
     (OUTPUT -> KUBE-SERVICES -> KUBE-SVC-* with `-m statistic --mode random
     --probability` -> KUBE-SEP-* -> DNAT), for iptables-legacy and -nft,
     plus a direct connect in that netns (conntrack and KUBE-SERVICES are
     walked by every connection there, service or not).
   Targets are random ClusterIPs of the set, so iptables walks about half
   of KUBE-SERVICES on average, as it does on a real node.
   Each service count runs in fresh maps (a new socket-LB) and again in the
   maps of one socket-LB that served every earlier phase (reused), and every
   round's added cost is printed, so a cost that depends on the maps' history
   shows. `--bpf-dir` runs another version of bpf/ (say, from git) to compare.
2. the time to program 10,000 services x 10 distinct backends (100,000
   backends) into empty maps, to reconcile it unchanged, to change one
   backend, to write it without batch syscalls, and to remove it all.

Everything runs in network namespaces made here (backends on their loopback,
no link to the host's network) and in a cgroup and bpffs pin directory made
here; all of it is removed at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from clustermesh.datapath import Backend, Frontend, ServiceSpec, SocketLB  # noqa: E402
from clustermesh.datapath.loader import MapLimits  # noqa: E402
from clustermesh.datapath.plan import apply, desired_state, ordered_ops, paused_gc  # noqa: E402
from clustermesh.lab.netns import remove_cgroup  # noqa: E402

BACKEND_PORT = 8080
SERVICE_PORT = 80
LAT_BACKENDS = [f"10.244.0.{i}" for i in range(1, 11)]
TAG = f"{os.getpid() % 100000}"


CLUSTER_IP_BASE = IPv4Address("10.96.0.0")
CLUSTER_IP_RANGE = "10.96.0.0/12"  # the service CIDR of the bench: 1,048,574 addresses


def cluster_ip(i: int) -> str:
    """The i-th ClusterIP: covers 0 <= i < 1,048,574 (the whole /12)."""
    if not 0 <= i < (1 << 20) - 2:
        raise ValueError(f"service index {i} outside the bench's {CLUSTER_IP_RANGE}")
    return str(CLUSTER_IP_BASE + i + 1)


def sh(*argv: str, check: bool = True, input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, capture_output=True, text=True, input=input_text, timeout=300)


def cgroup2_root() -> Path:
    with open("/proc/mounts") as mounts:
        for line in mounts:
            parts = line.split()
            if parts[2] == "cgroup2":
                return Path(parts[1])
    raise SystemExit("no cgroup v2 mount: mount -t cgroup2 none /sys/fs/cgroup/unified")


# --- environment made by the bench ------------------------------------------------------------


class Lab(contextlib.ExitStack):
    """Namespaces, servers, cgroups and pins of this run, undone on exit."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="cmbench-"))
        self.callback(shutil.rmtree, self.tmp, True)
        self.cgroup_root = cgroup2_root()

    def build_probe(self) -> Path:
        exe = self.tmp / "connect_lat"
        sh("gcc", "-O2", "-Wall", "-o", str(exe), str(REPO / "bench" / "connect_lat.c"))
        return exe

    def netns(self, name: str, *, local_clusterips: bool) -> str:
        ns = f"cmbench-{name}-{TAG}"
        sh("ip", "netns", "add", ns)
        self.callback(self._drop_netns, ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        for ip in LAT_BACKENDS:
            sh("ip", "-n", ns, "addr", "add", f"{ip}/32", "dev", "lo")
        if local_clusterips:
            # iptables needs the ClusterIP routable for a SYN to reach OUTPUT's
            # DNAT at all; a local route keeps even a miss inside the netns.
            sh("ip", "-n", ns, "route", "add", "local", CLUSTER_IP_RANGE, "dev", "lo")
        return ns

    @staticmethod
    def _drop_netns(ns: str) -> None:
        pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        sh("ip", "netns", "del", ns, check=False)

    def server(self, probe: Path, ns: str, *, cpu: int | None = None, spin: bool = False) -> None:
        """The accept-and-close server on BACKEND_PORT; ``cpu`` pins it, ``spin`` makes it
        busy-poll a non-blocking listener instead of sleeping in accept() (bench/connect_lat.c)."""
        env = dict(os.environ)
        env.pop("PROBE_CPU", None)
        env.pop("PROBE_SERVER_SPIN", None)
        if cpu is not None:
            env["PROBE_CPU"] = str(cpu)
        if spin:
            env["PROBE_SERVER_SPIN"] = "1"
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, str(probe), "server", str(BACKEND_PORT)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.callback(proc.wait)
        self.callback(proc.kill)
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise SystemExit(f"probe server did not start in {ns}")

    def cgroup(self, name: str) -> Path:
        path = self.cgroup_root / f"clustermesh-bench-{name}-{TAG}"
        path.mkdir()
        self.callback(self._drop_cgroup, path)
        return path

    @staticmethod
    def _drop_cgroup(path: Path) -> None:
        remove_cgroup(path)

    def socket_lb(
        self, name: str, cgroup: Path, limits: MapLimits | None = None, bpf_dir: Path | None = None
    ) -> SocketLB:
        pin_dir = Path(f"/sys/fs/bpf/clustermesh-bench-{name}-{TAG}")
        lb = SocketLB(cgroup, pin_dir, local_cluster_id=1, limits=limits, bpf_dir=bpf_dir)
        self.callback(lb.destroy)
        lb.load()
        return lb


# --- connect latency -----------------------------------------------------------------------------


@dataclass
class Sample:
    n: int
    failed: int
    p50_us: float
    p99_us: float
    mean_us: float


def probe(
    exe: Path,
    ns: str,
    groups: Sequence[tuple[int, Sequence[str]]],
    args: argparse.Namespace,
    cgroup: Path | None,
) -> list[Sample]:
    """Run the C client in ``ns`` (and ``cgroup``); one Sample per (port, ips) group."""

    def join() -> None:
        assert cgroup is not None
        (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    specs = [f"{port}:{','.join(ips)}" for port, ips in groups]
    cpu = "1" if (os.cpu_count() or 1) > 1 else "-1"
    out = subprocess.run(
        ["ip", "netns", "exec", ns, str(exe), "client", str(args.iterations), str(args.warmup), cpu, *specs],
        preexec_fn=join if cgroup else None,
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout
    samples = []
    for line in out.splitlines():
        n, failed, _min, p50, _p90, p99, mean = (float(x) for x in line.split())
        samples.append(Sample(int(n), int(failed), p50 / 1000, p99 / 1000, mean / 1000))
    return samples


def combine(samples: list[Sample]) -> Sample:
    """Median over rounds: one noisy round on a 2-CPU machine does not decide."""
    return Sample(
        n=sum(s.n for s in samples),
        failed=sum(s.failed for s in samples),
        p50_us=statistics.median(s.p50_us for s in samples),
        p99_us=statistics.median(s.p99_us for s in samples),
        mean_us=statistics.median(s.mean_us for s in samples),
    )


def kube_proxy_rules(count: int, backends_per_service: int) -> str:
    """iptables-restore input for ``count`` services, shaped like kube-proxy's."""
    lines = ["*nat", ":OUTPUT ACCEPT [0:0]", ":KUBE-SERVICES - [0:0]", ":KUBE-MARK-MASQ - [0:0]"]
    rules = [
        '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000",
    ]
    for i in range(count):
        ip = cluster_ip(i)
        svc = f"KUBE-SVC-{i:016X}"
        comment = f'-m comment --comment "bench/svc-{i}:http cluster IP"'
        lines.append(f":{svc} - [0:0]")
        rules.append(f"-A KUBE-SERVICES -d {ip}/32 -p tcp {comment} -m tcp --dport {SERVICE_PORT} -j {svc}")
        rules.append(
            f"-A {svc} ! -s 10.244.0.0/16 -d {ip}/32 -p tcp {comment} -m tcp --dport {SERVICE_PORT} "
            "-j KUBE-MARK-MASQ"
        )
        for k in range(backends_per_service):
            backend = LAT_BACKENDS[k % len(LAT_BACKENDS)]
            sep = f"KUBE-SEP-{i:010X}{k:06X}"
            lines.append(f":{sep} - [0:0]")
            left = backends_per_service - k
            statistic = f"-m statistic --mode random --probability {1 / left:.11f} " if left > 1 else ""
            rules.append(
                f'-A {svc} -m comment --comment "bench/svc-{i}:http -> {backend}" {statistic}-j {sep}'
            )
            rules.append(f"-A {sep} -s {backend}/32 -j KUBE-MARK-MASQ")
            rules.append(f"-A {sep} -p tcp -m tcp -j DNAT --to-destination {backend}:{BACKEND_PORT}")
    return "\n".join([*lines, *rules, "COMMIT", ""])


def services(count: int, backend_ips: Callable[[int], list[str]]) -> list[ServiceSpec]:
    return [
        ServiceSpec(
            Frontend(IPv4Address(cluster_ip(i)), SERVICE_PORT),
            frozenset(
                Backend(IPv4Address(ip), BACKEND_PORT, 1 + (j % 3)) for j, ip in enumerate(backend_ips(i))
            ),
        )
        for i in range(count)
    ]


def latency_bench(lab: Lab, args: argparse.Namespace, deadline: float) -> None:
    """Each service count is measured twice: in fresh maps (a new socket-LB, new
    pins), and in the maps of one socket-LB that served every phase before it
    (reused: their history includes every earlier connect). Every round of every
    phase is printed, so a bimodal cost shows as such instead of hiding in a median."""
    exe = lab.build_probe()
    lb_ns = lab.netns("lb", local_clusterips=False)
    lab.server(exe, lb_ns)
    reused_cgroup = lab.cgroup("lb")
    reused_lb = lab.socket_lb("lb", reused_cgroup, bpf_dir=args.bpf_dir)
    ipt_ns: dict[str, str] = {}
    for variant in args.iptables:
        if shutil.which(f"iptables-{variant}-restore") is None:
            print(f"(iptables-{variant}-restore not found: skipped)")
            continue
        ipt_ns[variant] = lab.netns(variant, local_clusterips=True)
        lab.server(exe, ipt_ns[variant])

    rows: dict[str, dict[str, Sample]] = {}
    columns: list[str] = []
    rng = random.Random(42)
    print("added = ClusterIP via socket-LB minus direct in its cgroup, p50 of each round, microseconds")
    for count in args.services:
        if time.monotonic() > deadline:
            print(f"(time budget spent: {count} services skipped)")
            break
        specs = services(count, lambda _i: LAT_BACKENDS)
        targets = [cluster_ip(rng.randrange(count)) for _ in range(min(count, 256))]
        backends = (BACKEND_PORT, LAT_BACKENDS)
        clusterips = (SERVICE_PORT, targets)
        for phase in ("fresh", "reused"):
            if phase == "fresh":
                cgroup = lab.cgroup(f"lb-{count}")
                lb = lab.socket_lb(f"lb-{count}", cgroup, bpf_dir=args.bpf_dir)
            else:
                cgroup, lb = reused_cgroup, reused_lb
            t0 = time.monotonic()
            lb.program(specs)
            lb_time = time.monotonic() - t0
            restore = {}
            if phase == "fresh":  # iptables has no maps to reuse: once per count
                for variant, ns in ipt_ns.items():
                    t0 = time.monotonic()
                    rules = kube_proxy_rules(count, 10)
                    sh("ip", "netns", "exec", ns, f"iptables-{variant}-restore", input_text=rules)
                    restore[variant] = time.monotonic() - t0
            # name -> (netns, in cgroup?, groups); a group is (port, addresses)
            runs: dict[tuple[str, ...], tuple[str, Path | None, list[tuple[int, Sequence[str]]]]] = {
                ("direct, no hook",): (lb_ns, None, [backends]),
                ("ClusterIP via socket-LB", "direct, in socket-LB cgroup"): (lb_ns, cgroup, [clusterips, backends]),
            }
            for variant, ns in ipt_ns.items() if phase == "fresh" else ():
                names = (f"ClusterIP via iptables-{variant}", f"direct, iptables-{variant} netns")
                runs[names] = (ns, None, [clusterips, backends])
            collected: dict[str, list[Sample]] = {}
            for _ in range(args.rounds):  # rounds interleave too
                for names, (ns, in_cgroup, groups) in runs.items():
                    for name, sample in zip(names, probe(exe, ns, groups, args, in_cgroup), strict=True):
                        collected.setdefault(name, []).append(sample)
            column = f"{count} {phase}"
            columns.append(column)
            for name, samples in collected.items():
                rows.setdefault(name, {})[column] = combine(samples)
            added = [
                lbs.p50_us - miss.p50_us
                for lbs, miss in zip(
                    collected["ClusterIP via socket-LB"], collected["direct, in socket-LB cgroup"], strict=True
                )
            ]
            programmed = f"reconcile {lb_time:.2f} s" + "".join(
                f", iptables-{v}-restore {t:.2f} s" for v, t in restore.items()
            )
            print(
                f"  {count:>6} services, {phase:>6} maps: added "
                + " ".join(f"{a:+.2f}" for a in added)
                + f"  (median {statistics.median(added):+.2f}, spread {max(added) - min(added):.2f}; {programmed})",
                flush=True,
            )

    print()
    print(
        f"connect() latency, microseconds: median p50 (median p99) of {args.rounds} rounds x "
        f"{args.iterations} connects, 10 backends per service"
    )
    print(f"{'':34}" + "".join(f"{c:>22}" for c in columns))
    for name, by_column in rows.items():
        cells = "".join(
            f"{f'{s.p50_us:6.2f} ({s.p99_us:6.2f})' + ('' if not s.failed else f' {s.failed} FAILED'):>22}"
            if s is not None
            else f"{'-':>22}"
            for s in (by_column.get(c) for c in columns)
        )
        print(f"{name:34}{cells}")
    print()
    print("added to a connect() at p50:")
    print(
        "  socket-LB: vs a direct connect in its cgroup (same process, connects alternating), and vs no hook"
    )
    print("  iptables:  vs a direct connect in its netns (same process), and vs no netfilter at all")
    print("  (a direct connect walks all of KUBE-SERVICES, a ClusterIP stops at its rule: hence < 0)")
    worst = 0.0
    for column in columns:
        nohook = rows["direct, no hook"][column].p50_us
        lb_p50 = rows["ClusterIP via socket-LB"][column].p50_us
        miss = rows["direct, in socket-LB cgroup"][column].p50_us
        worst = max(worst, lb_p50 - miss)
        parts = [f"socket-LB {lb_p50 - miss:+.2f} / {lb_p50 - nohook:+.2f} us"]
        for variant in ipt_ns:
            if column not in rows.get(f"ClusterIP via iptables-{variant}", {}):
                continue
            ipt = rows[f"ClusterIP via iptables-{variant}"][column].p50_us
            ipt_direct = rows[f"direct, iptables-{variant} netns"][column].p50_us
            parts.append(f"iptables-{variant} {ipt - ipt_direct:+.2f} / {ipt - nohook:+.2f} us")
            parts.append(f"iptables/socket-LB {ipt / lb_p50:.2f}x")
        print(f"  {column:>14}: " + "; ".join(parts))
    verdict = "meets" if worst <= 1.5 else "MISSES"
    print(f"target: every phase within +1.5 us of the direct connect: {verdict} (worst {worst:+.2f} us)")


# --- programming time ------------------------------------------------------------------------------


def distinct_backends(per_service: int) -> Callable[[int], list[str]]:
    def ips(i: int) -> list[str]:
        base = i * per_service
        return [str(IPv4Address("10.128.0.0") + base + k + 1) for k in range(per_service)]

    return ips


@contextlib.contextmanager
def timed(label: str, results: dict[str, float]) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    results[label] = time.perf_counter() - t0


def programming_bench(lab: Lab, args: argparse.Namespace) -> None:
    count, per = args.program_services, args.program_backends
    cgroup = lab.cgroup("prog")
    limits = MapLimits(services=max(262144, count * (per + 1) * 2), backends=max(131072, count * per + 1024))
    lb = lab.socket_lb("prog", cgroup, limits)
    maps = lb.maps
    t: dict[str, float] = {}
    with timed("build specs", t):
        specs = services(count, distinct_backends(per))

    def reconcile_timed(prefix: str, wanted: list[ServiceSpec]) -> int:
        # The steps of SocketLB.program, timed one by one (GC paused as there).
        with paused_gc():
            with timed(f"{prefix} read", t):
                current = maps.read()
            with timed(f"{prefix} desired", t):
                desired = desired_state(wanted, 1, current.backends)
            with timed(f"{prefix} diff", t):
                ops = ordered_ops(current, desired, maps.capacity)
            with timed(f"{prefix} apply", t):
                apply(ops, maps)
        t[prefix] = sum(t[f"{prefix} {p}"] for p in ("read", "desired", "diff", "apply"))
        return len(ops)

    first = reconcile_timed("first", specs)
    noop = reconcile_timed("noop", specs)
    changed = list(specs)
    changed[0] = ServiceSpec(changed[0].frontend, changed[0].backends | {Backend("10.250.0.1", 8080, 2)})
    one = reconcile_timed("one", changed)
    removed = reconcile_timed("remove", [])
    single = 0
    if args.program_single:
        # the same first programming with one syscall per entry, for comparison
        for bpf_map in (maps.services, maps.backends):
            bpf_map._batch_ok = False  # type: ignore[attr-defined]
        single = reconcile_timed("single", specs)
        reconcile_timed("cleanup", [])

    def detail(prefix: str) -> str:
        parts = ", ".join(f"{p} {t[f'{prefix} {p}']:.2f}" for p in ("read", "desired", "diff", "apply"))
        return f"{t[prefix]:.2f} s ({parts})"

    print()
    entries = count * (per + 1)
    print(
        f"programming {count} services x {per} backends ({count * per} backends, {entries} service entries)"
    )
    print(f"  first reconcile, empty maps:    {detail('first')}; {first} writes")
    print(f"  same state again:               {detail('noop')}; {noop} writes")
    print(f"  one backend added:              {detail('one')}; {one} writes")
    print(f"  everything removed:             {detail('remove')}; {removed} writes")
    if args.program_single:
        print(f"  first reconcile, no batch ops:  {detail('single')}; {single} writes")
    print(f"  (building the {count} specs took {t['build specs']:.2f} s, not counted above)")
    if count >= 100000:
        verdict = "meets" if t["first"] < 10 else "MISSES"
        print(f"  target: 100,000 services x 10 backends programmed in < 10 s: {verdict} ({t['first']:.2f} s)")


# --- main -------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--iterations", type=int, default=20000, help="timed connects per scenario and round")
    parser.add_argument("--warmup", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--services", type=lambda s: [int(x) for x in s.split(",") if x], default=[100, 1000, 10000]
    )
    parser.add_argument("--iptables", type=lambda s: s.split(","), default=["legacy", "nft"])
    parser.add_argument("--program-services", type=int, default=10000)
    parser.add_argument("--program-backends", type=int, default=10)
    parser.add_argument(
        "--program-single", action="store_true", help="also program without batch syscalls (slow)"
    )
    parser.add_argument(
        "--budget", type=float, default=420, help="seconds after which latency rows are skipped"
    )
    parser.add_argument("--quick", action="store_true", help="fewer connects and rounds")
    parser.add_argument(
        "--bpf-dir", type=Path, default=None, help="another bpf/ directory, to compare a program with this one"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.iterations, args.warmup, args.rounds = 5000, 500, 1
    if os.geteuid() != 0:
        print("run as root: the bench makes netns, cgroups and BPF programs", file=sys.stderr)
        return 2
    for tool in ("gcc", "ip"):
        if shutil.which(tool) is None:
            print(f"{tool} not found: run scripts/setup.sh", file=sys.stderr)
            return 2

    def stop(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    started = time.monotonic()
    print(f"clustermesh datapath bench: kernel {os.uname().release}, {os.cpu_count()} CPUs")
    with Lab() as lab:
        if args.services:
            latency_bench(lab, args, started + args.budget)
        if args.program_services > 0:
            programming_bench(lab, args)
    print(f"\ntotal bench time {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
