"""Fixtures of the datapath tier: root, BPF, a throwaway cgroup, pins and netns.

Safety: every address used here (10.96.x ClusterIPs, 10.244/10.245 backends,
10.250.0.0/30 on the veth) exists only inside network namespaces these
fixtures create, which have no link to the host's network and no default
route. Nothing in the host's namespace ever connects to them: clients run
through ``ip netns exec`` after joining the test cgroup.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.prereq import require, require_binary, require_root

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
BPFFS = Path("/sys/fs/bpf")
_counter = itertools.count()


def cgroup2_root() -> Path | None:
    with open("/proc/mounts") as mounts:
        for line in mounts:
            parts = line.split()
            if len(parts) > 2 and parts[2] == "cgroup2":
                return Path(parts[1])
    return None


def _is_bpffs(path: Path) -> bool:
    with open("/proc/mounts") as mounts:
        return any(line.split()[1:3] == [str(path), "bpf"] for line in mounts)


@pytest.fixture(scope="session")
def datapath_prereqs() -> Path:
    """Everything a socket-LB test needs; returns the cgroup v2 root."""
    require_root()
    require_binary("ip", "apt-get install iproute2")
    root = cgroup2_root()
    require(root is not None, "a cgroup v2 mount", "mount -t cgroup2 none /sys/fs/cgroup/unified")
    require(_is_bpffs(BPFFS), "bpffs at /sys/fs/bpf", "mount -t bpf bpf /sys/fs/bpf (scripts/setup.sh)")
    require(importlib.util.find_spec("bcc") is not None, "bcc importable", "run scripts/setup.sh")
    build = Path(f"/lib/modules/{os.uname().release}/build/include")
    require(build.exists(), f"kernel headers at {build.parent}", "run scripts/setup.sh")
    assert root is not None
    return root


def _kill_all(pids: Sequence[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def unique(prefix: str) -> str:
    return f"{prefix}{os.getpid() % 100000:05d}{next(_counter)}"


@pytest.fixture
def cgroup(datapath_prereqs: Path) -> Iterator[Path]:
    """A fresh cgroup v2 directory; processes, programs and the dir go at teardown."""
    path = datapath_prereqs / unique("clustermesh-test-")
    path.mkdir()
    yield path
    from clustermesh.datapath import hooks

    for _ in range(50):
        pids = [int(p) for p in (path / "cgroup.procs").read_text().split()]
        if not pids:
            break
        _kill_all(pids)
        time.sleep(0.05)
    with contextlib.suppress(Exception):
        hooks.detach(path, Path("/nonexistent"))
    path.rmdir()


@pytest.fixture
def pin_dir(datapath_prereqs: Path) -> Iterator[Path]:
    """A unique pin directory under /sys/fs/bpf, emptied and removed at teardown."""
    path = BPFFS / unique("clustermesh-test-")
    yield path
    if path.exists():
        for entry in path.iterdir():
            entry.unlink()
        path.rmdir()


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@dataclass
class Topology:
    """A client netns and a backend netns joined by one veth pair, nothing else."""

    client_ns: str
    backend_ns: str
    cgroup: Path
    servers: list[subprocess.Popen[str]] = field(default_factory=list)

    def add_backends(self, names: dict[str, str]) -> None:
        """Start backends NAME -> IP in the backend netns (tcp/8080, udp/5353)."""
        for ip in names.values():
            prefix = "128" if ":" in ip else "32"
            _ip("-n", self.backend_ns, "addr", "add", f"{ip}/{prefix}", "dev", "lo")
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.backend_ns, sys.executable, str(HERE / "_servers.py")]
            + [f"{name}={ip}" for name, ip in names.items()],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.servers.append(proc)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"

    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.client_ns]

    def _join_cgroup(self) -> None:
        # Runs in the child between fork and exec: the client is in the test
        # cgroup before it execs into the netns, so its connect() is hooked.
        (self.cgroup / "cgroup.procs").write_text(str(os.getpid()))

    def run(self, argv: list[str], *, in_cgroup: bool = True, timeout: float = 30) -> str:
        proc = subprocess.run(
            [*self.prefix(), *argv],
            preexec_fn=self._join_cgroup if in_cgroup else None,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        assert proc.returncode == 0, f"{argv} failed: {proc.stderr}"
        return proc.stdout

    def client(self, *args: str, in_cgroup: bool = True) -> Any:
        out = self.run([sys.executable, str(HERE / "_client.py"), *args], in_cgroup=in_cgroup)
        return json.loads(out)

    def start_loop(
        self, ip: str, port: int, stopfile: Path, max_seconds: float = 30
    ) -> subprocess.Popen[str]:
        args = ["loop", ip, str(port), str(stopfile), str(max_seconds)]
        proc = subprocess.Popen(
            [*self.prefix(), sys.executable, str(HERE / "_client.py"), *args],
            preexec_fn=self._join_cgroup,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "started"
        return proc

    def start_hold(self, proto: str, ip: str, port: int, stopfile: Path) -> tuple[subprocess.Popen[str], Any]:
        """A client holding one connected socket; returns it and its first getpeername()."""
        proc = subprocess.Popen(
            [*self.prefix(), sys.executable, str(HERE / "_client.py"), "hold", proto, ip, str(port), str(stopfile)],
            preexec_fn=self._join_cgroup,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        return proc, json.loads(proc.stdout.readline())

    @staticmethod
    def finish_loop(proc: subprocess.Popen[str], stopfile: Path) -> Any:
        stopfile.touch()
        out, _ = proc.communicate(timeout=40)
        return json.loads(out)


@pytest.fixture
def topology(cgroup: Path) -> Iterator[Topology]:
    tag = unique("cmt")
    client_ns, backend_ns = f"{tag}-c", f"{tag}-b"
    veth_c, veth_b = f"{tag}c", f"{tag}b"
    topo = Topology(client_ns, backend_ns, cgroup)
    try:
        _ip("netns", "add", client_ns)
        _ip("netns", "add", backend_ns)
        _ip(
            "-n",
            client_ns,
            "link",
            "add",
            veth_c,
            "type",
            "veth",
            "peer",
            "name",
            veth_b,
            "netns",
            backend_ns,
        )
        _ip("-n", client_ns, "addr", "add", "10.250.0.1/30", "dev", veth_c)
        _ip("-n", backend_ns, "addr", "add", "10.250.0.2/30", "dev", veth_b)
        for ns, dev in ((client_ns, veth_c), (backend_ns, veth_b)):
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", dev, "up")
        # Backends only; ClusterIPs (10.96/16) stay unroutable in the client
        # netns, so an address the hook does not rewrite fails at once there.
        _ip("-n", client_ns, "route", "add", "10.244.0.0/15", "via", "10.250.0.2")
        yield topo
    finally:
        for proc in topo.servers:
            proc.kill()
            proc.wait(timeout=10)
        for ns in (client_ns, backend_ns):
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            _kill_all([int(p) for p in pids])
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


@pytest.fixture
def topology6(topology: Topology) -> Topology:
    """``topology`` with IPv6 too: fd00:250::1/126 and ::2 on the veth (no DAD, so
    usable at once) and the backend prefixes fd00:244::/32 and fd00:245::/32
    routed to the backend netns. IPv6 ClusterIPs (fd00:96::/64) stay unroutable
    in the client netns, like the IPv4 ones. Unique local addresses, inside
    namespaces with no link out."""
    client_dev = _only_veth(topology.client_ns)
    backend_dev = _only_veth(topology.backend_ns)
    _ip("-n", topology.client_ns, "addr", "add", "fd00:250::1/126", "dev", client_dev, "nodad")
    _ip("-n", topology.backend_ns, "addr", "add", "fd00:250::2/126", "dev", backend_dev, "nodad")
    for prefix in ("fd00:244::/32", "fd00:245::/32"):
        _ip("-n", topology.client_ns, "-6", "route", "add", prefix, "via", "fd00:250::2")
    return topology


def _only_veth(ns: str) -> str:
    out = subprocess.run(
        ["ip", "-n", ns, "-o", "link", "show", "type", "veth"], capture_output=True, text=True, check=True
    ).stdout
    return out.split(":")[1].strip().split("@")[0]


LB_LOCAL_CLUSTER = 1  # the cluster of the node the `lb` fixture programs


@pytest.fixture
def lb(cgroup: Path, pin_dir: Path) -> Iterator[Any]:
    """A loaded socket-LB on the test's cgroup and pins, destroyed afterwards."""
    from clustermesh.datapath import SocketLB

    socket_lb = SocketLB(cgroup, pin_dir, LB_LOCAL_CLUSTER)
    socket_lb.load()
    yield socket_lb
    socket_lb.destroy()


def names_of(results: list[dict[str, object]]) -> set[str]:
    """The backends that answered a client run; every call must have worked."""
    failed = [r for r in results if not r["ok"]]
    assert not failed, failed
    return {str(r["name"]) for r in results}
