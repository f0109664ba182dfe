"""Routes to remote pod CIDRs in a throwaway network namespace (never the host's)."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator

import pytest

from clustermesh.agent.routes import RouteTable, RoutingError
from tests.prereq import require_binary, require_root

pytestmark = pytest.mark.datapath


@pytest.fixture
def netns() -> Iterator[str]:
    require_root()
    require_binary("ip", "apt-get install iproute2")
    name = f"cmr-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for cmd in (["link", "add", "u0", "type", "veth", "peer", "name", "u1"],
                    ["addr", "add", "192.168.77.1/24", "dev", "u0"],
                    ["link", "set", "u0", "up"], ["link", "set", "u1", "up"]):
            subprocess.run(["ip", "-n", name, *cmd], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def routes(ns: str) -> str:
    return subprocess.run(["ip", "-n", ns, "route"], capture_output=True, text=True, check=True).stdout


def test_apply_adds_replaces_and_removes_only_its_own(netns: str) -> None:
    subprocess.run(["ip", "-n", netns, "route", "add", "10.250.0.0/24", "via", "192.168.77.9"], check=True)
    table = RouteTable(netns)
    changes = table.apply({"10.245.1.0/24": "192.168.77.2", "10.245.2.0/24": "192.168.77.3"})
    assert changes.added == ["10.245.1.0/24", "10.245.2.0/24"]
    assert table.current() == {"10.245.1.0/24": "192.168.77.2", "10.245.2.0/24": "192.168.77.3"}
    assert "10.245.1.0/24 via 192.168.77.2 dev u0 proto 177" in routes(netns)

    assert table.apply(dict(table.current())).added == []  # idempotent
    changes = table.apply({"10.245.1.0/24": "192.168.77.4"})
    assert (changes.replaced, changes.removed) == (["10.245.1.0/24"], ["10.245.2.0/24"])
    assert table.current() == {"10.245.1.0/24": "192.168.77.4"}

    table.apply({})
    assert table.current() == {}
    assert "10.250.0.0/24 via 192.168.77.9" in routes(netns), "a route we did not make is left alone"


def test_an_unreachable_gateway_is_a_clear_error_and_the_other_routes_go_in(netns: str) -> None:
    changes = RouteTable(netns).apply({"10.245.1.0/24": "172.31.255.1", "10.245.2.0/24": "192.168.77.3"})
    assert "on a local link" in changes.failed["10.245.1.0/24"]
    assert changes.added == ["10.245.2.0/24"]


def test_a_route_someone_else_made_is_not_taken_over_and_blocks_nothing_else(netns: str) -> None:
    subprocess.run(["ip", "-n", netns, "route", "add", "10.245.1.0/24", "via", "192.168.77.9"], check=True)
    table = RouteTable(netns)
    table.apply({"10.245.9.0/24": "192.168.77.5"})  # ours, stale below
    changes = table.apply({"10.245.1.0/24": "192.168.77.2", "10.245.3.0/24": "192.168.77.3"})
    assert "not ours" in changes.failed["10.245.1.0/24"]
    assert (changes.added, changes.removed) == (["10.245.3.0/24"], ["10.245.9.0/24"])
    assert "10.245.1.0/24 via 192.168.77.9" in routes(netns)
    assert table.current() == {"10.245.3.0/24": "192.168.77.3"}


def test_a_missing_namespace_is_an_error_not_created() -> None:
    require_root()
    name = f"cmr-missing-{uuid.uuid4().hex[:6]}"
    with pytest.raises(RoutingError):
        RouteTable(name).current()
    assert name not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
