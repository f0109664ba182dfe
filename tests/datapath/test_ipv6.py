"""IPv6 and dual-stack socket-LB on a real kernel, in namespaces with IPv6 addresses.

See conftest.py (``topology6``) for the addresses and why none can leave the machine.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable
from ipaddress import IPv6Address
from pathlib import Path

import pytest

from clustermesh.datapath import Affinity, Backend, Frontend, ServiceSpec, SocketLB, bpfsys, hooks
from clustermesh.datapath.layout import REV4_MAP, REV6_CODEC, REV6_MAP
from clustermesh.datapath.plan import broken, specs_from_state
from tests.datapath.conftest import LB_LOCAL_CLUSTER, Topology, names_of

pytestmark = pytest.mark.datapath

LOCAL_CLUSTER = LB_LOCAL_CLUSTER
CLUSTER_IP6 = "fd00:96::10"
CLUSTER_IP4 = "10.96.0.10"
EMPTY_IP6 = "fd00:96::20"
BACKENDS6 = {"local-a6": "fd00:244:1::10", "remote-b6": "fd00:245:1::10", "remote-c6": "fd00:245:2::10"}
BACKENDS4 = {"local-a": "10.244.1.10", "remote-b": "10.245.1.10"}
CLUSTER_OF = {"local-a6": 1, "remote-b6": 2, "remote-c6": 3, "local-a": 1, "remote-b": 2}


def backends(names: Iterable[str], port: int) -> frozenset[Backend]:
    ips = BACKENDS6 | BACKENDS4
    return frozenset(Backend(ips[n], port, CLUSTER_OF[n]) for n in names)


def web6(names: Iterable[str] = tuple(BACKENDS6), affinity: str = "none") -> ServiceSpec:
    return ServiceSpec(Frontend(CLUSTER_IP6, 80), backends(names, 8080), Affinity.parse(affinity))


def dns6(names: Iterable[str] = tuple(BACKENDS6)) -> ServiceSpec:
    return ServiceSpec(Frontend(CLUSTER_IP6, 53, "UDP"), backends(names, 5353))


def web4() -> ServiceSpec:
    return ServiceSpec(Frontend(CLUSTER_IP4, 80), backends(BACKENDS4, 8080))


@pytest.fixture
def lab6(topology6: Topology) -> Topology:
    topology6.add_backends(BACKENDS6 | BACKENDS4)
    return topology6


def addr(result: list[object]) -> tuple[str, int]:
    """(host, port) of a socket address, IPv6 ones having four fields."""
    return str(IPv6Address(str(result[0])) if ":" in str(result[0]) else result[0]), int(str(result[1]))


def rev6_entries(pin_dir: Path) -> dict[tuple[int, IPv6Address, int], tuple[IPv6Address, int]]:
    with bpfsys.BpfMap.open_pinned(pin_dir / REV6_MAP, REV6_CODEC) as rev:
        return rev.snapshot()


def test_tcp_to_an_ipv6_clusterip_reaches_backends_and_sees_the_clusterip(
    lab6: Topology, lb: SocketLB, pin_dir: Path
) -> None:
    lb.program([web6()])
    results = lab6.client("tcp", CLUSTER_IP6, "80", "30")
    assert len(names_of(results)) > 1 and names_of(results) <= set(BACKENDS6)
    assert {addr(r["peer"]) for r in results} == {(CLUSTER_IP6, 80)}  # getpeername6
    assert rev6_entries(pin_dir) == {}  # closed sockets took their entries (cm_release4, AF_INET6)


def test_udp_over_ipv6_replies_come_from_the_clusterip(lab6: Topology, lb: SocketLB) -> None:
    lb.program([dns6()])
    results = lab6.client("udp", CLUSTER_IP6, "53", "20")
    assert names_of(results) <= set(BACKENDS6)
    assert {addr(r["from"]) for r in results} == {(CLUSTER_IP6, 53)}  # recvmsg6
    connected = lab6.client("udp-connected", CLUSTER_IP6, "53")
    assert connected["ok"], connected
    assert addr(connected["peer"]) == (CLUSTER_IP6, 53)
    assert addr(connected["from"]) == (CLUSTER_IP6, 53)


def test_dual_stack_services_are_balanced_side_by_side(lab6: Topology, lb: SocketLB) -> None:
    specs = [web6(), web4(), dns6(), ServiceSpec(Frontend(EMPTY_IP6, 80))]
    lb.program(specs)
    state = lb.read()
    assert broken(state) == []
    assert sorted(specs_from_state(state), key=lambda s: s.frontend) == sorted(specs, key=lambda s: s.frontend)
    assert lb.program(specs) == []  # read back from both families: nothing to write
    assert names_of(lab6.client("tcp", CLUSTER_IP6, "80", "10")) <= set(BACKENDS6)
    assert names_of(lab6.client("tcp", CLUSTER_IP4, "80", "10")) <= set(BACKENDS4)
    (refused,) = lab6.client("tcp", EMPTY_IP6, "80", "1")
    assert refused["errno"] == errno.ECONNREFUSED

    # The IPv6 Service goes: its frontend is left to the kernel again; IPv4 is untouched.
    lb.program([web4()])
    (unrouted,) = lab6.client("tcp", CLUSTER_IP6, "80", "1")
    assert unrouted["errno"] == errno.ENETUNREACH, unrouted
    assert names_of(lab6.client("tcp", CLUSTER_IP4, "80", "5")) <= set(BACKENDS4)
    assert all(entry.ip.version == 4 for entry in lb.read().backends.values())


def test_ipv6_affinity_local_prefers_this_clusters_backend(lab6: Topology, lb: SocketLB) -> None:
    lb.program([web6(BACKENDS6, "local")])
    assert names_of(lab6.client("tcp", CLUSTER_IP6, "80", "15")) == {"local-a6"}
    lb.program([web6(["remote-b6", "remote-c6"], "local")])  # failover
    assert names_of(lab6.client("tcp", CLUSTER_IP6, "80", "20")) == {"remote-b6", "remote-c6"}


def test_the_ipv6_maps_are_their_own(lb: SocketLB, pin_dir: Path) -> None:
    lb.program([web6(), web4()])
    maps = lb.maps
    services, backends_map = maps.services, maps.backends
    assert isinstance(services, bpfsys.ByFamily) and isinstance(backends_map, bpfsys.ByFamily)
    assert {k.frontend.ip.version for k in services.v6.snapshot()} == {6}
    assert {k.frontend.ip.version for k in services.v4.snapshot()} == {4}
    assert {e.ip.version for e in backends_map.v6.snapshot().values()} == {6}
    # backend ids are one space across both families
    assert not set(backends_map.v4.snapshot()) & set(backends_map.v6.snapshot())
    for name in (REV4_MAP, REV6_MAP):
        with hooks.fd(bpfsys.obj_get(pin_dir / name)) as fd:
            assert bpfsys.map_info(fd).flags & bpfsys.BPF_F_NO_COMMON_LRU
