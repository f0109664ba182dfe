"""Lab networking: an underlay, nodes and pods as network namespaces, made with `ip`.

Topology (everything in namespaces the lab makes; the host's namespace is never
touched and nothing has a route out of the machine):

    underlay netns: bridge br0 ---- veth ---- node netns (eth0, 192.168.100.N/24, forwarding on)
                                                  |-- veth (proxy ARP) -- pod netns (eth0, POD_IP/32,
                                                                            default via 169.254.1.1)

A pod reaches its node through a link-local gateway address that every pod link
of the node carries; the node routes each pod /32 to its veth. Routes between nodes of
different clusters are the agent's job (``--routes netns:NODE``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

UNDERLAY_CIDR = "192.168.100.0/24"
POD_GATEWAY = "169.254.1.1"
# Every node namespace has this address on lo, with the node agent's API forwarder behind it:
# the lab's API servers advertise it as the `kubernetes` Service's endpoint, so pods (through
# kube-proxy's DNAT of the ClusterIP in their node) reach their cluster's API server, which
# itself listens on the host's 127.0.0.1 only. Off the underlay's subnet, so no node asks
# another for it.
API_VIP = "192.168.99.1"


class NetnsError(RuntimeError):
    pass


def ip(*args: str, netns: str | None = None) -> str:
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    if res.returncode != 0:
        raise NetnsError(f"{' '.join(argv)}: {res.stderr.strip()}")
    return res.stdout


def masquerade_pods(netns: str, pod_cidr: str, native_cidr: str) -> None:
    """What a CNI does for pod traffic to addresses outside every cluster's pods (here: other
    nodes, e.g. another cluster's store NodePort): the node's address as its source, so that the
    answer comes back without a route to this node's pods. Pod-to-pod traffic, also across
    clusters, keeps its addresses (Cilium's native-routing CIDR)."""
    argv = ["ip", "netns", "exec", netns, "iptables", "-w", "-t", "nat", "-A", "POSTROUTING", "-s", pod_cidr,
            "!", "-d", native_cidr, "-m", "comment", "--comment", "clustermesh lab: pod egress",
            "-j", "MASQUERADE"]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    if res.returncode != 0:
        raise NetnsError(f"{' '.join(argv)}: {res.stderr.strip()}")


def sysctl(netns: str, key: str, value: str) -> None:
    res = subprocess.run(["ip", "netns", "exec", netns, "sysctl", "-qw", f"{key}={value}"],
                         capture_output=True, text=True, timeout=20)
    if res.returncode != 0:
        raise NetnsError(f"sysctl {key}={value} in {netns}: {res.stderr.strip()}")


_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def socket_in_netns(netns: str, kind: socket.SocketKind = socket.SOCK_STREAM) -> socket.socket:
    """An IPv4 socket that lives in the named network namespace.

    Only the calling thread switches namespace, and only for the socket() call: the
    socket stays in the namespace it was made in. This is how the host-side node agent
    probes pods and listens inside a node without any of its own traffic touching a lab
    address from the host's namespace.
    """
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    target = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(target, _CLONE_NEWNET) != 0:
            raise NetnsError(f"setns into {netns}: {os.strerror(ctypes.get_errno())}")
        try:
            return socket.socket(socket.AF_INET, kind)
        finally:
            if _libc.setns(own, _CLONE_NEWNET) != 0:
                # A thread left in a lab namespace would send the host's traffic there: never go on.
                os.write(2, b"socket_in_netns: cannot return to the host namespace\n")
                os.abort()
    finally:
        os.close(target)
        os.close(own)


def delete_netns(name: str) -> None:
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), 9)
    res = subprocess.run(["ip", "netns", "del", name], capture_output=True, text=True, check=False)
    if res.returncode != 0 and Path(f"/run/netns/{name}").exists():
        raise NetnsError(f"ip netns del {name}: {res.stderr.strip()}")


def _namespace_with_eth0(netns: str, peer: str, peer_netns: str) -> None:
    """A new namespace whose eth0 is one end of a veth; the other end, ``peer``, goes to ``peer_netns``."""
    ip("netns", "add", netns)
    ip("link", "set", "lo", "up", netns=netns)
    ip("link", "add", "eth0", "type", "veth", "peer", "name", peer, "netns", peer_netns, netns=netns)


@dataclass
class Underlay:
    netns: str

    def create(self) -> Underlay:
        ip("netns", "add", self.netns)
        ip("link", "set", "lo", "up", netns=self.netns)
        ip("link", "add", "br0", "type", "bridge", netns=self.netns)
        ip("link", "set", "br0", "up", netns=self.netns)
        return self

    def delete(self) -> None:
        delete_netns(self.netns)


@dataclass
class LabNode:
    netns: str
    underlay: Underlay
    address: str  # on the underlay
    pod_cidr: str
    port: str  # its veth name inside the underlay

    def create(self) -> LabNode:
        _namespace_with_eth0(self.netns, self.port, self.underlay.netns)
        ip("addr", "add", f"{self.address}/24", "dev", "eth0", netns=self.netns)
        ip("addr", "add", f"{API_VIP}/32", "dev", "lo", netns=self.netns)
        ip("link", "set", "lo", "up", netns=self.netns)
        ip("link", "set", "eth0", "up", netns=self.netns)
        ip("link", "set", self.port, "master", "br0", netns=self.underlay.netns)
        ip("link", "set", self.port, "up", netns=self.underlay.netns)
        sysctl(self.netns, "net.ipv4.ip_forward", "1")
        sysctl(self.netns, "net.ipv4.conf.all.rp_filter", "0")
        return self

    def delete(self) -> None:
        delete_netns(self.netns)


@dataclass
class LabPod:
    netns: str
    node_netns: str
    address: str
    port: str  # its veth name inside the node

    def create(self) -> LabPod:
        _namespace_with_eth0(self.netns, self.port, self.node_netns)
        ip("addr", "add", f"{self.address}/32", "dev", "eth0", netns=self.netns)
        ip("link", "set", "eth0", "up", netns=self.netns)
        ip("route", "add", POD_GATEWAY, "dev", "eth0", "scope", "link", netns=self.netns)
        ip("route", "add", "default", "via", POD_GATEWAY, "dev", "eth0", netns=self.netns)
        ip("link", "set", self.port, "up", netns=self.node_netns)
        # The pod's gateway is answered on every pod link of the node (Calico's trick without
        # needing a default route in the node to make proxy ARP work).
        ip("addr", "add", f"{POD_GATEWAY}/32", "dev", self.port, "scope", "link", netns=self.node_netns)
        sysctl(self.node_netns, f"net.ipv4.conf.{self.port}.proxy_arp", "1")
        sysctl(self.node_netns, f"net.ipv4.conf.{self.port}.rp_filter", "0")
        ip("route", "add", f"{self.address}/32", "dev", self.port, netns=self.node_netns)
        return self

    def delete(self) -> None:
        delete_netns(self.netns)


def make_cgroup(root: Path, name: str) -> Path:
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def cgroup_procs(path: Path) -> list[str]:
    """The processes of a cgroup and all its descendants."""
    found: list[str] = []
    for d in [path, *(p for p in path.rglob("*") if p.is_dir())]:
        with contextlib.suppress(OSError):
            found += (d / "cgroup.procs").read_text().split()
    return found


def kill_cgroup(path: Path, wait: float = 0.0) -> None:
    """SIGKILL every process of a cgroup subtree (cgroup.kill, kernel >= 5.14); with ``wait``,
    until none is left, or NetnsError."""
    if not path.exists():
        return
    with contextlib.suppress(FileNotFoundError):
        (path / "cgroup.kill").write_text("1")
    deadline = time.monotonic() + wait
    while wait and cgroup_procs(path):
        if time.monotonic() > deadline:
            raise NetnsError(f"processes left in {path} after cgroup.kill")
        time.sleep(0.02)


def remove_cgroup(path: Path) -> None:
    """Kill everything in a cgroup subtree, then remove its folders, deepest first."""
    if not path.exists():
        return
    kill_cgroup(path, wait=10)
    for d in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(FileNotFoundError):
            d.rmdir()
    path.rmdir()
