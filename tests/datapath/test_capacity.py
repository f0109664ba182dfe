"""Full maps on a real kernel: a desired state that does not fit is refused whole.

See conftest.py for the topology and why no test address can leave the machine.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from clustermesh.datapath import Backend, DatapathError, Frontend, ServiceSpec, SocketLB
from clustermesh.datapath.errors import CapacityError
from clustermesh.datapath.loader import MapLimits
from clustermesh.datapath.model import BackendEntry, SlotKey
from clustermesh.datapath.plan import broken
from tests.datapath.conftest import Topology

pytestmark = pytest.mark.datapath

LOCAL_CLUSTER = 1
CLUSTER_IP = "10.96.0.10"
WEB = Frontend(CLUSTER_IP, 80)
OTHER = Frontend("10.96.0.11", 80)
BACKENDS = {"local-a": "10.244.1.10", "remote-b": "10.245.1.10", "remote-c": "10.245.2.10"}
# Room for WEB with its three backends (1 master + 3 slots, 3 backends), not more.
LIMITS = MapLimits(services=6, backends=3, rev_nat=16)


def spec(frontend: Frontend, *ips: str) -> ServiceSpec:
    return ServiceSpec(frontend, frozenset(Backend(ip, 8080, 1 + i) for i, ip in enumerate(ips)))


def refusals(map_name: str) -> float:
    return REGISTRY.get_sample_value("clustermesh_datapath_map_full_total", {"map": map_name}) or 0.0


@pytest.fixture
def small_lb(cgroup: Path, pin_dir: Path) -> Iterator[SocketLB]:
    socket_lb = SocketLB(
        cgroup, pin_dir, LOCAL_CLUSTER, limits=LIMITS, setting_names=("--svc-map-max", "--backend-map-max")
    )
    socket_lb.load()
    yield socket_lb
    socket_lb.destroy()


def names(results: list[dict[str, object]]) -> set[str]:
    assert all(r["ok"] for r in results), results
    return {str(r["name"]) for r in results}


def test_full_map_refuses_the_update_and_keeps_serving_the_previous_state(
    topology: Topology, small_lb: SocketLB, caplog: pytest.LogCaptureFixture
) -> None:
    topology.add_backends(BACKENDS)
    small_lb.program([spec(WEB, *BACKENDS.values())])
    before = small_lb.read()
    assert small_lb.maps.capacity.services == 6 and small_lb.maps.capacity.backends == 3

    too_big = [spec(WEB, *BACKENDS.values()), spec(OTHER, "10.245.3.10")]  # a 4th backend
    counted = refusals("cm_backend4")
    with caplog.at_level(logging.ERROR, logger="clustermesh.datapath.loader"):
        for _ in range(3):
            with pytest.raises(CapacityError) as caught:
                small_lb.program(too_big)
    err = caught.value
    assert (err.map_name, err.need, err.size) == ("cm_backend4", 4, 3)
    assert "Raise --backend-map-max" in str(err) and "4 entries" in str(err)
    assert refusals("cm_backend4") == counted + 3  # a metric per refusal ...
    assert len([r for r in caplog.records if "cm_backend4" in r.getMessage()]) == 1  # ... one log line

    after = small_lb.read()
    assert after == before and broken(after) == []
    assert names(topology.client("tcp", CLUSTER_IP, "80", "20")) <= set(BACKENDS)

    # A state that fits again is written, and the next refusal is logged again.
    small_lb.program([spec(OTHER, "10.245.3.10")])
    assert {key.frontend for key in small_lb.read().services} == {OTHER}


def test_removed_services_make_room_before_new_ones_are_written(small_lb: SocketLB) -> None:
    small_lb.program([spec(WEB, *BACKENDS.values())])
    # Together the two states need 8 service entries and 6 backends; one at a time they fit.
    replacement = spec(OTHER, "10.245.3.10", "10.245.3.11", "10.245.3.12")
    small_lb.program([replacement])
    state = small_lb.read()
    assert {key.frontend for key in state.services} == {OTHER}
    assert len(state.backends) == 3 and broken(state) == []


def test_a_batch_into_a_full_map_is_a_datapath_error_not_a_raw_oserror(small_lb: SocketLB) -> None:
    """Beneath the planner's check (another writer, a race): the kernel's E2BIG is explained."""
    backends = small_lb.maps.backends
    entries = [(i, BackendEntry(Frontend(f"10.245.9.{i}", 1).ip, 1, 2)) for i in range(1, 5)]
    with pytest.raises(DatapathError, match=r"cm_backend4.*full"):
        backends.update_many(entries)  # type: ignore[attr-defined]
    assert SlotKey(WEB) not in small_lb.maps.services
