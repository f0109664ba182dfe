from __future__ import annotations

from clustermesh.agent.route_plan import plan_routes
from clustermesh.schema import Node, NodeAddress


def node(cluster: str, name: str, ip: str | None, cidr: str | None) -> Node:
    addrs = (NodeAddress("InternalIP", ip),) if ip else ()
    return Node(name, cluster, 2, addrs, cidr)


def test_one_route_per_remote_node() -> None:
    plan = plan_routes(["10.244.0.0/16"], [node("c2", "a", "192.168.2.1", "10.245.1.0/24"),
                                           node("c2", "b", "192.168.2.2", "10.245.2.0/24")])
    assert plan.routes == {"10.245.1.0/24": "192.168.2.1", "10.245.2.0/24": "192.168.2.2"}
    assert plan.problems == []


def test_overlaps_and_missing_addresses_are_refused() -> None:
    plan = plan_routes(["10.244.0.0/16"], [
        node("c2", "overlaps-local", "192.168.2.1", "10.244.5.0/24"),
        node("c2", "no-ip", None, "10.245.9.0/24"),
        node("c2", "a", "192.168.2.2", "10.245.2.0/24"),
        node("c3", "b", "192.168.3.2", "10.245.2.0/25"),  # inside c2/a's CIDR
        node("c3", "no-cidr", "192.168.3.3", None),
    ])
    assert plan.routes == {"10.245.2.0/24": "192.168.2.2"}
    assert len(plan.problems) == 3
    assert any("overlaps this cluster" in p for p in plan.problems)
    assert any("overlaps node c2/a" in p for p in plan.problems)


def test_secondary_pod_cidrs_are_routed_through_the_same_node() -> None:
    multi = Node("m", "c2", 2, (NodeAddress("InternalIP", "192.168.2.9"),), "10.245.8.0/24",
                 ipv4_secondary_pod_cidrs=("10.246.8.0/24", "10.244.8.0/24"))
    plan = plan_routes(["10.244.0.0/16"], [multi])
    assert plan.routes == {"10.245.8.0/24": "192.168.2.9", "10.246.8.0/24": "192.168.2.9"}
    assert plan.problems == ["node c2/m: pod CIDR 10.244.8.0/24 overlaps this cluster's pod CIDRs; not routed"]
