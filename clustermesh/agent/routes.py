"""The routing table boundary: the only module that imports pyroute2.

Routes are tagged with our own routing protocol number, so the agent lists,
replaces and removes only the routes it made, whatever else the table holds."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

RTPROT_CLUSTERMESH = 177  # unassigned in iproute2's rt_protos; `ip route` shows "proto 177"


class RoutingError(Exception):
    pass


@dataclass
class RouteChanges:
    added: list[str]
    replaced: list[str]
    removed: list[str]
    failed: dict[str, str] = field(default_factory=dict)  # CIDR -> why; the other routes still went in


class RouteTable:
    """The main IPv4 table of one network namespace (None: the agent's own)."""

    def __init__(self, netns: str | None = None, proto: int = RTPROT_CLUSTERMESH) -> None:
        self.netns = netns
        self.proto = proto

    def _ipr(self) -> IPRoute:
        try:
            # flags=0: never create a namespace that a typo named (pyroute2 would, by default).
            return IPRoute(netns=self.netns, flags=0) if self.netns else IPRoute()
        except (OSError, NetlinkError) as exc:
            raise RoutingError(f"cannot open netlink in netns {self.netns or '(own)'}: {exc}") from exc

    def current(self) -> dict[str, str]:
        with self._ipr() as ipr:
            routes = ipr.get_routes(family=socket.AF_INET, proto=self.proto)
            return {f"{r.get('dst')}/{r.get('dst_len')}": str(r.get("gateway")) for r in routes}

    def apply(self, desired: dict[str, str]) -> RouteChanges:
        """Make our routes ``desired`` (CIDR -> gateway) as far as the table lets us: a route that
        cannot be made (a foreign route in the way, a gateway off-link) is reported in ``failed``
        and does not stop the others."""
        current = self.current()
        changes = RouteChanges([], [], [])
        with self._ipr() as ipr:
            for cidr, gateway in sorted(desired.items()):
                if current.get(cidr) == gateway:
                    continue
                # "add" for a new destination: a replace would take over a route someone else made.
                verb = "replace" if cidr in current else "add"
                try:
                    ipr.route(verb, dst=cidr, gateway=gateway, proto=self.proto)
                except NetlinkError as exc:
                    changes.failed[cidr] = (
                        f"route {cidr} exists and is not ours; not replaced" if exc.code == 17  # EEXIST
                        else f"route {cidr} via {gateway}: {exc}; is {gateway} on a local link?")
                    continue
                (changes.replaced if cidr in current else changes.added).append(cidr)
            for cidr in sorted(set(current) - set(desired)):
                try:
                    ipr.route("del", dst=cidr, proto=self.proto)
                except NetlinkError as exc:
                    if exc.code != 3:  # ESRCH: already gone
                        changes.failed[cidr] = f"removing route {cidr}: {exc}"
                    continue
                changes.removed.append(cidr)
        return changes
