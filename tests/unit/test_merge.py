"""The agent's merge as a table: records of several clusters -> datapath services."""

from __future__ import annotations

from clustermesh.agent.merge import LocalService, merge, merge_service
from clustermesh.datapath.model import Affinity, Backend, Frontend, Proto, ServiceSpec
from clustermesh.schema import ClusterService, PortConfig

HTTP = {"http": PortConfig("TCP", 80)}
DNS = {"dns": PortConfig("UDP", 53), "dns-tcp": PortConfig("TCP", 53)}


def remote(cluster: str, cid: int, backends: dict, shared: bool = True, name: str = "echo") -> ClusterService:
    return ClusterService(cluster, "ns", name, cid, frontends={"10.97.0.1": HTTP}, backends=backends, shared=shared)


def local(backends: dict | None = None, frontends: dict | None = None, affinity: Affinity = Affinity.NONE):
    return LocalService("ns", "echo", frontends or {"10.96.0.10": HTTP}, backends or {}, affinity)


def test_local_and_remote_backends_meet_behind_the_local_frontend() -> None:
    result = merge_service(
        1,
        local({"10.244.1.1": {"http": PortConfig("TCP", 8080)}}, affinity=Affinity.LOCAL),
        [remote("c2", 2, {"10.245.1.1": {"http": PortConfig("TCP", 8081)}}),
         remote("c3", 3, {"10.246.1.1": {"http": PortConfig("TCP", 8082)}})],
    )
    assert result.problems == []
    assert result.specs == [ServiceSpec(
        Frontend("10.96.0.10", 80, Proto.TCP),
        frozenset({Backend("10.244.1.1", 8080, 1), Backend("10.245.1.1", 8081, 2), Backend("10.246.1.1", 8082, 3)}),
        Affinity.LOCAL,
    )]


def test_ports_match_by_name_and_protocol() -> None:
    result = merge_service(
        1,
        local(frontends={"10.96.0.10": DNS}),
        [remote("c2", 2, {"10.245.1.1": {"dns": PortConfig("UDP", 5353), "dns-tcp": PortConfig("TCP", 5353),
                                         "other": PortConfig("TCP", 9)}}),
         remote("c3", 3, {"10.246.1.1": {"dns": PortConfig("TCP", 5353)}})],  # wrong protocol: not used
    )
    by_frontend = {str(s.frontend): {str(b) for b in s.backends} for s in result.specs}
    assert by_frontend == {"10.96.0.10:53/UDP": {"10.245.1.1:5353@2"}, "10.96.0.10:53/TCP": {"10.245.1.1:5353@2"}}


def test_unshared_and_colliding_remotes_add_nothing() -> None:
    result = merge_service(
        1, local({"10.244.1.1": {"http": PortConfig("TCP", 8080)}}),
        [remote("c2", 2, {"10.245.1.1": {"http": PortConfig("TCP", 8080)}}, shared=False),
         remote("c9", 1, {"10.249.1.1": {"http": PortConfig("TCP", 8080)}})],
    )
    assert [str(b) for s in result.specs for b in s.backends] == ["10.244.1.1:8080@1"]
    assert any("uses this cluster's ID" in p for p in result.problems)


def test_no_backends_anywhere_keeps_the_frontend_with_none() -> None:
    result = merge_service(1, local(), [])
    assert result.specs == [ServiceSpec(Frontend("10.96.0.10", 80, Proto.TCP), frozenset())]


def test_ipv6_services_merge_across_clusters() -> None:
    result = merge_service(
        1,
        local({"fd00:244:1::1": {"http": PortConfig("TCP", 8080)}}, frontends={"fd00:96::10": HTTP}),
        [remote("c2", 2, {"fd00:245:1::1": {"http": PortConfig("TCP", 8081)}})],
    )
    assert result.problems == []
    assert result.specs == [ServiceSpec(
        Frontend("fd00:96::10", 80, Proto.TCP),
        frozenset({Backend("fd00:244:1::1", 8080, 1), Backend("fd00:245:1::1", 8081, 2)}),
    )]


def test_dual_stack_frontends_take_the_backends_of_their_own_family() -> None:
    """A dual-stack Service: ClusterIPs and endpoints of both families, in every cluster."""
    both = {"10.244.1.1": {"http": PortConfig("TCP", 8080)}, "fd00:244:1::1": {"http": PortConfig("TCP", 8080)}}
    result = merge_service(
        1,
        local(both, frontends={"10.96.0.10": HTTP, "fd00:96::10": HTTP}),
        [remote("c2", 2, {"10.245.1.1": {"http": PortConfig("TCP", 8080)},
                          "fd00:245:1::1": {"http": PortConfig("TCP", 8080)}}),
         remote("c3", 3, {"fd00:246:1::1": {"http": PortConfig("TCP", 8080)}})],  # IPv6-only cluster
        exclude_remote_cidrs=["fd00:244::/32"],
    )
    assert result.problems == []
    by_frontend = {str(s.frontend): {str(b) for b in s.backends} for s in result.specs}
    assert by_frontend == {
        "10.96.0.10:80/TCP": {"10.244.1.1:8080@1", "10.245.1.1:8080@2"},
        "[fd00:96::10]:80/TCP": {"[fd00:244:1::1]:8080@1", "[fd00:245:1::1]:8080@2", "[fd00:246:1::1]:8080@3"},
    }


def test_ipv6_remote_backends_inside_local_pod_cidrs_are_refused() -> None:
    result = merge_service(
        1, local(frontends={"fd00:96::10": HTTP}),
        [remote("c2", 2, {"fd00:244:1::7": {"http": PortConfig("TCP", 8080)}})],
        exclude_remote_cidrs=["fd00:244::/32"],
    )
    assert result.specs[0].backends == frozenset()
    assert any("pod CIDRs" in p for p in result.problems)


def test_merge_only_serves_local_global_services() -> None:
    records = [remote("c2", 2, {"10.245.1.1": {"http": PortConfig("TCP", 80)}}),
               remote("c2", 2, {"10.245.1.2": {"http": PortConfig("TCP", 80)}}, name="not-global-here")]
    result = merge(1, {("ns", "echo"): local()}, records)
    assert [str(s.frontend) for s in result.specs] == ["10.96.0.10:80/TCP"]
    assert {str(b) for b in result.specs[0].backends} == {"10.245.1.1:80@2"}


def test_remote_backends_inside_local_pod_cidrs_are_refused() -> None:
    result = merge(1, {("ns", "echo"): local()},
                   [remote("c2", 2, {"10.244.3.3": {"http": PortConfig("TCP", 80)},
                                     "10.245.1.1": {"http": PortConfig("TCP", 80)}})],
                   exclude_remote_cidrs=["10.244.0.0/16"])
    assert {str(b) for b in result.specs[0].backends} == {"10.245.1.1:80@2"}
    assert any("inside this cluster's pod CIDRs" in p for p in result.problems)


def test_wildcard_frontend_becomes_tcp_and_udp_frontends() -> None:
    # Cilium's ANY/NONE are protocol 0 in its maps, which match every protocol.
    for wildcard in ("ANY", "NONE"):
        result = merge_service(
            1,
            local({"10.244.1.1": {"dns": PortConfig(wildcard, 5353)}},
                  frontends={"10.96.0.10": {"dns": PortConfig(wildcard, 53)}}),
            [remote("c2", 2, {"10.245.1.1": {"dns": PortConfig("UDP", 5353)},
                              "10.245.1.2": {"dns": PortConfig("TCP", 5353)}})],
        )
        by_frontend = {str(s.frontend): {str(b) for b in s.backends} for s in result.specs}
        assert by_frontend == {
            "10.96.0.10:53/TCP": {"10.244.1.1:5353@1", "10.245.1.2:5353@2"},
            "10.96.0.10:53/UDP": {"10.244.1.1:5353@1", "10.245.1.1:5353@2"},
        }, wildcard
        assert result.problems == []


def test_wildcard_backend_serves_a_frontend_of_any_protocol() -> None:
    result = merge_service(
        1, local(frontends={"10.96.0.10": DNS}),
        [remote("c2", 2, {"10.245.1.1": {"dns": PortConfig("ANY", 5353), "dns-tcp": PortConfig("NONE", 5353)}})],
    )
    by_frontend = {str(s.frontend): {str(b) for b in s.backends} for s in result.specs}
    assert by_frontend == {"10.96.0.10:53/UDP": {"10.245.1.1:5353@2"}, "10.96.0.10:53/TCP": {"10.245.1.1:5353@2"}}


def test_sctp_frontend_is_reported_and_the_rest_is_merged() -> None:
    frontends = {"10.96.0.10": {"sig": PortConfig("SCTP", 3868), **HTTP}}
    result = merge_service(1, local({"10.244.1.1": {"http": PortConfig("TCP", 8080)}}, frontends=frontends), [])
    assert [str(s.frontend) for s in result.specs] == ["10.96.0.10:80/TCP"]
    assert result.problems == ["10.96.0.10:3868/SCTP: protocol not load-balanced yet"]


def test_a_wildcard_port_on_an_explicit_frontend_gives_one_frontend() -> None:
    frontends = {"10.96.0.10": {"dns": PortConfig("UDP", 53), "any": PortConfig("ANY", 53)}}
    backends = {"10.244.1.1": {"dns": PortConfig("UDP", 5353), "any": PortConfig("ANY", 5354)}}
    result = merge_service(1, local(backends, frontends=frontends), [])
    by_frontend = {str(s.frontend): {str(b) for b in s.backends} for s in result.specs}
    assert by_frontend == {"10.96.0.10:53/UDP": {"10.244.1.1:5353@1", "10.244.1.1:5354@1"},
                           "10.96.0.10:53/TCP": {"10.244.1.1:5354@1"}}
    assert len(result.specs) == 2
