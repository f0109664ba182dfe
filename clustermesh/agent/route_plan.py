"""Which routes a node needs: remote pod CIDRs via the remote nodes that own them. Pure."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

from clustermesh.schema import Node


@dataclass
class RoutePlan:
    routes: dict[str, str]  # pod CIDR -> gateway (the remote node's InternalIP)
    problems: list[str] = field(default_factory=list)


def plan_routes(local_pod_cidrs: Iterable[str], remote_nodes: Iterable[Node]) -> RoutePlan:
    """One route per IPv4 pod CIDR (primary and secondary) of every remote node with an
    IPv4 InternalIP.

    A CIDR that overlaps this cluster's own pod CIDRs, or another remote node's, is
    refused: the mesh needs distinct pod CIDRs, and a wrong route would steal traffic."""
    local = [ipaddress.ip_network(c, strict=False) for c in local_pod_cidrs]
    taken: dict[ipaddress.IPv4Network, str] = {}
    plan = RoutePlan({})
    for node in sorted(remote_nodes, key=lambda n: (n.cluster, n.name)):
        where = f"node {node.cluster}/{node.name}"
        cidrs = node.ipv4_pod_cidrs()  # the primary first, then Cilium's secondary pod CIDRs
        if not cidrs:
            continue
        gateway = node.internal_ipv4()
        if gateway is None:
            plan.problems.append(f"{where}: no IPv4 InternalIP to route {', '.join(cidrs)} through")
            continue
        for text in cidrs:
            cidr = ipaddress.ip_network(text, strict=False)
            assert isinstance(cidr, ipaddress.IPv4Network)
            if any(cidr.overlaps(n) for n in local):
                plan.problems.append(f"{where}: pod CIDR {cidr} overlaps this cluster's pod CIDRs; not routed")
                continue
            clash = next((owner for net, owner in taken.items() if cidr.overlaps(net)), None)
            if clash is not None:
                plan.problems.append(f"{where}: pod CIDR {cidr} overlaps {clash}'s; not routed")
                continue
            taken[cidr] = where
            plan.routes[str(cidr)] = gateway
    return plan
