#!/usr/bin/env python3
"""Socket-LB under connection churn: does the added cost of a connect() stay put? Run as root.

    sudo .venv/bin/python bench/churn_bench.py [--connects 1000000] [--services 10000]

Prints figures, it is not a test. For each way of using a socket
(``--styles``, all four by default):

- ``fin``   TCP connect(), closed with a FIN;
- ``rst``   TCP connect(), closed with an RST (SO_LINGER 0);
- ``udp``   connected UDP: connect(), close();
- ``dgram`` unconnected UDP, one sendto() per socket (a DNS client's pattern);

it loads the socket-LB with fresh maps holding ``--services`` services (10
backends each), then measures the added cost of the timed call (connect, or
sendto for dgram) against the same call to a backend address in the same cgroup
(the two alternate call by call, bench/connect_lat.c), at the start, after every
quarter of ``--connects`` sockets through ClusterIPs, and at the end. Each line
shows p50/p90/p99 of both and the entries left in cm_rev4 (connected sockets
drop theirs on close; unconnected UDP sockets leave one per backend).

Target: the added p50 stays within +1.5 us, at the start and at the end.

Why the server busy-polls (``--server spin``, the default). The two calls reach
the same 10 backends (every service has them all), so they face the same
TIME_WAIT sockets, and the kernel picks their source ports alike (measured:
for both, in 99% of calls the port is at most 16 past the last one to the same
backend, no longer scan). What differed is the server: sleeping in accept(), it is woken
by the connect() that completes its handshake, inside that connect() (~7 us
here with the server on the other CPU). Under FIN closes the server's accept()
and close() take long enough that it is often still busy at the next connect,
which then pays nothing: the client and server fall into step, and one of the
two alternating calls takes most of the wakeups. Which one depends on timing;
the service call, slightly longer, usually lost: +5 to +8.6 us "added", with
the direct connect at ~13 us instead of its ~19 us when alternated with itself
(two alternating service groups differ by at most 0.09 us). RST closes make
the server's work short, so it sleeps before every connect and both calls pay.
A server pinned to the other CPU that polls a non-blocking listener never
sleeps, so neither call wakes anything and the difference is the hook's own
cost. ``--server blocking`` keeps the old setup (server sleeping in accept(),
not pinned) to show that effect. With one CPU the bench cannot spin and uses
the blocking server on that CPU.

Everything runs in namespaces, cgroups and pins made here (see
bench/datapath_bench.py), removed at the end.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

from datapath_bench import (  # noqa: E402
    BACKEND_PORT,
    LAT_BACKENDS,
    SERVICE_PORT,
    Lab,
    Sample,
    cluster_ip,
    services,
    sh,
)

from clustermesh.datapath import ServiceSpec, bpfsys  # noqa: E402
from clustermesh.datapath.layout import REV4_CODEC, REV4_MAP  # noqa: E402
from clustermesh.datapath.model import Frontend, Proto  # noqa: E402

STYLES = ("fin", "rst", "udp", "dgram")


def run_probe(
    exe: Path, ns: str, cgroup: Path, style: str, argv: Sequence[str], timeout: float = 1800
) -> str:
    def join() -> None:
        (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    return subprocess.run(
        ["ip", "netns", "exec", ns, str(exe), *argv],
        preexec_fn=join,
        env={**os.environ, "PROBE_STYLE": style},
        check=True,
        capture_output=True,
        text=True,
        timeout=timeout,
    ).stdout


def window(
    exe: Path, ns: str, cgroup: Path, style: str, targets: list[str], args: argparse.Namespace
) -> tuple[Sample, Sample, tuple[float, float]]:
    """Service and direct calls alternating: (service, direct, (p90, p99) of the service)."""
    groups = [f"{SERVICE_PORT}:{','.join(targets)}", f"{BACKEND_PORT}:{','.join(LAT_BACKENDS)}"]
    out = run_probe(exe, ns, cgroup, style, ["client", str(args.window), "500", args.cpu, *groups])
    samples = []
    tails = []
    for line in out.splitlines():
        n, failed, _min, p50, p90, p99, mean = (float(x) for x in line.split())
        samples.append(Sample(int(n), int(failed), p50 / 1000, p99 / 1000, mean / 1000))
        tails.append((p90 / 1000, p99 / 1000))
    return samples[0], samples[1], tails[0]


def rev_occupancy(pin_dir: Path) -> int:
    with bpfsys.BpfMap.open_pinned(pin_dir / REV4_MAP, REV4_CODEC) as rev:
        return len(rev)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connects", type=int, default=1_000_000, help="sockets through ClusterIPs per style")
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--window", type=int, default=20_000, help="timed calls per measurement")
    parser.add_argument("--checkpoints", type=int, default=4, help="measurements between start and end")
    parser.add_argument("--styles", type=lambda s: s.split(","), default=list(STYLES))
    parser.add_argument("--bpf-dir", type=Path, default=None, help="another bpf/ directory, to compare")
    parser.add_argument(
        "--server",
        choices=("spin", "blocking"),
        default="spin",
        help="spin: the server busy-polls accept() on a CPU of its own (no wakeup lands in a timed "
        "connect); blocking: it sleeps in accept(), not pinned (the old setup, see above)",
    )
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("run as root: the bench makes netns, cgroups and BPF programs", file=sys.stderr)
        return 2
    if shutil.which("gcc") is None or shutil.which("ip") is None:
        print("gcc and ip are needed: run scripts/setup.sh", file=sys.stderr)
        return 2
    unknown = set(args.styles) - set(STYLES)
    if unknown:
        parser.error(f"unknown styles {sorted(unknown)}: use {','.join(STYLES)}")
    args.cpu = "1" if (os.cpu_count() or 1) > 1 else "-1"
    if args.server == "spin" and args.cpu == "-1":
        print("one CPU: the server cannot busy-poll beside the client, using --server blocking")
        args.server = "blocking"

    def stop(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    started = time.monotonic()
    print(
        f"clustermesh churn bench: kernel {os.uname().release}, {os.cpu_count()} CPUs, "
        f"{args.services} services x {len(LAT_BACKENDS)} backends, {args.connects} sockets per style, "
        + ("server busy-polling on CPU 0, client on CPU 1" if args.server == "spin" else "server blocking in accept()")
    )
    rng = random.Random(7)
    targets = [cluster_ip(rng.randrange(args.services)) for _ in range(256)]
    tcp_specs = services(args.services, lambda _i: LAT_BACKENDS)
    udp_specs = [
        ServiceSpec(Frontend(s.frontend.ip, s.frontend.port, Proto.UDP), s.backends, s.affinity) for s in tcp_specs
    ]
    summary: list[str] = []
    with Lab() as lab:
        exe = lab.build_probe()
        ns = lab.netns("churn", local_clusterips=False)
        # FIN closes leave TIME_WAIT sockets behind: let connect() reuse them
        # and use the whole port range. Both sysctls are per namespace.
        sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1")
        sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535")
        if args.server == "spin":
            lab.server(exe, ns, cpu=0, spin=True)
        else:
            lab.server(exe, ns)
        for style in args.styles:
            cgroup = lab.cgroup(f"churn-{style}")
            lb = lab.socket_lb(f"churn-{style}", cgroup, bpf_dir=args.bpf_dir)  # fresh maps for each style
            lb.program(tcp_specs if style in ("fin", "rst") else udp_specs)
            print(f"\n{style}: added cost of the timed call (ClusterIP via socket-LB minus direct, same cgroup)")
            print(f"  {'after sockets':>14}  {'added p50':>9}  {'LB p50/p90/p99 us':>20}  {'direct p50':>10}  cm_rev4")
            done = 0
            figures: list[float] = []
            failures = 0
            chunk = args.connects // max(args.checkpoints, 1)
            for step in range(args.checkpoints + 1):
                svc, direct, (p90, p99) = window(exe, ns, cgroup, style, targets, args)
                added = svc.p50_us - direct.p50_us
                figures.append(added)
                failures += svc.failed + direct.failed
                failed = f"  {svc.failed + direct.failed} FAILED" if svc.failed + direct.failed else ""
                print(
                    f"  {done:>14,}  {added:>+8.2f}   {svc.p50_us:6.2f}/{p90:6.2f}/{p99:6.2f}  "
                    f"{direct.p50_us:>10.2f}  {rev_occupancy(lb.pin_dir):>7}{failed}",
                    flush=True,
                )
                if step == args.checkpoints:
                    break
                count = chunk if step < args.checkpoints - 1 else args.connects - done
                spec = f"{SERVICE_PORT}:{','.join(targets)}"
                out = run_probe(exe, ns, cgroup, style, ["churn", str(count), args.cpu, spec]).split()
                n, churn_failed, elapsed = int(out[0]), int(out[1]), int(out[2])
                done += n
                failures += churn_failed
                if churn_failed:
                    print(f"  ({churn_failed} of {n} churn sockets failed)")
                print(f"  {'':>14}  ({n:,} sockets in {elapsed / 1e9:.1f} s)", flush=True)
            verdict = "meets" if max(figures) <= 1.5 and not failures else "MISSES"
            if failures:
                verdict += f", {failures} calls FAILED"
            summary.append(
                f"  {style:>6}: start {figures[0]:+.2f} us, end {figures[-1]:+.2f} us, worst {max(figures):+.2f} us "
                f"({verdict} +1.5 us); cm_rev4 {rev_occupancy(lb.pin_dir)} entries at the end"
            )
    print("\nsummary (added p50 of the timed call):")
    print("\n".join(summary))
    print(f"\ntotal bench time {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
