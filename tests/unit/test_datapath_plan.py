"""Pure tests of clustermesh.datapath.plan: dicts stand in for the BPF maps."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from ipaddress import IPv4Address

import pytest

from clustermesh.datapath.errors import CapacityError
from clustermesh.datapath.model import (
    BE_F_LOCAL,
    SVC_F_AFFINITY_LOCAL,
    SVC_F_AFFINITY_REMOTE,
    Affinity,
    Backend,
    BackendEntry,
    Frontend,
    MapState,
    Proto,
    ServiceEntry,
    ServiceSpec,
    SlotKey,
)
from clustermesh.datapath.plan import (
    Capacity,
    DeleteBackend,
    DeleteService,
    Maps,
    PutBackend,
    PutService,
    apply,
    broken,
    desired_state,
    diff,
    dry_run,
    leftovers,
    ordered_ops,
    phase,
    specs_from_state,
    sync_maps,
)

LOCAL = 1
FE = Frontend("10.96.0.10", 80)
FE_UDP = Frontend("10.96.0.10", 53, "UDP")
FE2 = Frontend("10.96.0.11", 443)
L1 = Backend("10.244.1.10", 8080, 1)
L2 = Backend("10.244.1.11", 8080, 1)
R1 = Backend("10.245.1.10", 8080, 2)
R2 = Backend("10.245.2.10", 8080, 3)


def svc(frontend: Frontend, *backends: Backend, affinity: str = "none") -> ServiceSpec:
    return ServiceSpec(frontend, frozenset(backends), Affinity(affinity))


def slots(state: MapState, frontend: Frontend) -> list[Backend]:
    master = state.services[SlotKey(frontend)]
    return [
        state.backends[state.services[SlotKey(frontend, i)].backend_id].backend
        for i in range(1, master.count + 1)
    ]


def eligible(state: MapState, frontend: Frontend) -> set[Backend]:
    """What the BPF program may pick for ``frontend`` in ``state``."""
    master = state.services.get(SlotKey(frontend))
    if master is None or master.count == 0:
        return set()
    n = master.preferred or master.count
    return set(slots(state, frontend)[:n])


def fresh_maps(
    state: MapState | None = None,
) -> tuple[Maps, dict[SlotKey, ServiceEntry], dict[int, BackendEntry]]:
    state = state or MapState()
    services = dict(state.services)
    backends = dict(state.backends)
    return Maps(services, backends), services, backends


# --- desired state ------------------------------------------------------------------

AFFINITY_CASES = [
    # affinity, backends, expected slot order, preferred, flags
    ("none", [R2, L1, R1], [L1, R1, R2], 3, 0),
    ("local", [R2, R1, L1], [L1, R1, R2], 1, SVC_F_AFFINITY_LOCAL),
    ("local", [R2, R1], [R1, R2], 0, SVC_F_AFFINITY_LOCAL),  # no local left: all eligible
    ("local", [L2, L1, R1], [L1, L2, R1], 2, SVC_F_AFFINITY_LOCAL),
    ("remote", [L1, R2, R1], [R1, R2, L1], 2, SVC_F_AFFINITY_REMOTE),
    ("remote", [L1], [L1], 0, SVC_F_AFFINITY_REMOTE),
    ("none", [], [], 0, 0),
    ("local", [], [], 0, SVC_F_AFFINITY_LOCAL),
]


@pytest.mark.parametrize(("affinity", "backends", "order", "preferred", "flags"), AFFINITY_CASES)
def test_slot_order_and_preferred_count(
    affinity: str, backends: list[Backend], order: list[Backend], preferred: int, flags: int
) -> None:
    state = desired_state([svc(FE, *backends, affinity=affinity)], LOCAL)
    master = state.services[SlotKey(FE)]
    assert master == ServiceEntry(backend_id=0, count=len(order), preferred=preferred, flags=flags)
    assert slots(state, FE) == order
    assert broken(state) == []
    assert leftovers(state) == []


def test_backend_entries_carry_cluster_and_local_flag() -> None:
    state = desired_state([svc(FE, L1, R1)], LOCAL)
    entries = {e.backend: e for e in state.backends.values()}
    assert entries[L1] == BackendEntry(IPv4Address("10.244.1.10"), 8080, 1, BE_F_LOCAL)
    assert entries[R1] == BackendEntry(IPv4Address("10.245.1.10"), 8080, 2, 0)


def test_backend_shared_by_two_services_gets_one_id() -> None:
    state = desired_state([svc(FE, L1, R1), svc(FE2, L1)], LOCAL)
    assert len(state.backends) == 2
    assert state.services[SlotKey(FE2, 1)] == state.services[SlotKey(FE, 1)]


def test_protocol_is_part_of_the_frontend() -> None:
    state = desired_state([svc(FE, L1), svc(FE_UDP, R1)], LOCAL)
    assert slots(state, FE) == [L1]
    assert slots(state, FE_UDP) == [R1]


def test_duplicate_frontend_is_rejected() -> None:
    with pytest.raises(ValueError, match="listed twice"):
        desired_state([svc(FE, L1), svc(FE, R1)], LOCAL)


def test_ids_do_not_depend_on_input_order() -> None:
    a = desired_state([svc(FE, L1, R1), svc(FE2, R2)], LOCAL)
    b = desired_state([svc(FE2, R2), svc(FE, R1, L1)], LOCAL)
    assert a == b


def test_existing_backends_keep_their_ids_and_new_ones_avoid_used_ids() -> None:
    current = {
        7: BackendEntry(R1.ip, R1.port, R1.cluster_id, 0),
        1: BackendEntry(IPv4Address("10.245.9.9"), 80, 9, 0),  # going away
    }
    state = desired_state([svc(FE, L1, R1, R2)], LOCAL, current)
    ids = {e.backend: bid for bid, e in state.backends.items()}
    assert ids[R1] == 7
    # 1 is still referenced by live slots until the end of the diff: never reused.
    assert sorted(ids.values()) == [2, 3, 7]


def test_duplicate_backend_in_the_map_keeps_the_lowest_id() -> None:
    current = {
        4: BackendEntry(L1.ip, L1.port, L1.cluster_id, BE_F_LOCAL),
        2: BackendEntry(L1.ip, L1.port, L1.cluster_id, BE_F_LOCAL),
    }
    state = desired_state([svc(FE, L1)], LOCAL, current)
    assert list(state.backends) == [2]


def test_local_cluster_change_rewrites_flags_in_place() -> None:
    before = desired_state([svc(FE, L1, R1, affinity="local")], LOCAL)
    after = desired_state([svc(FE, L1, R1, affinity="local")], 2, before.backends)
    assert set(after.backends) == set(before.backends)
    assert slots(after, FE) == [R1, L1]
    ops = diff(before, after)
    assert all(isinstance(op, PutBackend | PutService) for op in ops)


# --- model validation ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Frontend("fe80::1%eth0", 80), "zoned"),
        (lambda: Frontend("10.96.0.1", 0), "port"),
        (lambda: Frontend("10.96.0.1", 70000), "port"),
        (lambda: Frontend("10.96.0.1", 80, "SCTP"), "protocol"),
        (lambda: Backend("10.0.0.1", 80, -1), "32 bits"),
        (lambda: Backend("not-an-ip", 80, 1), "not-an-ip"),
        (lambda: ServiceSpec(FE, frozenset(), "sideways"), "affinity"),  # type: ignore[arg-type]
    ],
)
def test_model_rejects_bad_values(make: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()  # type: ignore[operator]


def test_model_parses_strings() -> None:
    assert Frontend("10.96.0.1", 53, "udp").proto is Proto.UDP
    assert Affinity.parse(None) is Affinity.NONE
    assert Affinity.parse("Local") is Affinity.LOCAL
    assert str(Frontend("10.96.0.1", 53, 17)) == "10.96.0.1:53/UDP"


# --- diff: order and safety ---------------------------------------------------------------

TRANSITIONS: list[tuple[str, list[ServiceSpec], list[ServiceSpec]]] = [
    ("create", [], [svc(FE, L1, R1, R2, affinity="local"), svc(FE2, R1)]),
    ("grow", [svc(FE, L1)], [svc(FE, L1, L2, R1, R2)]),
    ("shrink", [svc(FE, L1, L2, R1, R2)], [svc(FE, R2)]),
    (
        "failover: local backend leaves",
        [svc(FE, L1, R1, R2, affinity="local")],
        [svc(FE, R1, R2, affinity="local")],
    ),
    (
        "failback: local backend returns",
        [svc(FE, R1, R2, affinity="local")],
        [svc(FE, L1, R1, R2, affinity="local")],
    ),
    ("to zero backends", [svc(FE, L1, R1)], [svc(FE)]),
    ("from zero backends", [svc(FE)], [svc(FE, L1, R1)]),
    ("delete service", [svc(FE, L1, R1), svc(FE2, R2)], [svc(FE2, R2)]),
    ("delete everything", [svc(FE, L1, R1), svc(FE2, R2)], []),
    ("affinity change", [svc(FE, L1, R1, R2, affinity="local")], [svc(FE, L1, R1, R2, affinity="remote")]),
    ("backend moves between services", [svc(FE, L1, R1), svc(FE2, R2)], [svc(FE, R1), svc(FE2, L1, R2)]),
    ("replace all backends", [svc(FE, L1, L2)], [svc(FE, R1, R2)]),
    ("unchanged", [svc(FE, L1, R1), svc(FE_UDP, R2)], [svc(FE, L1, R1), svc(FE_UDP, R2)]),
]


@pytest.mark.parametrize(("name", "before", "after"), TRANSITIONS, ids=[t[0] for t in TRANSITIONS])
def test_every_intermediate_state_is_whole(
    name: str, before: list[ServiceSpec], after: list[ServiceSpec]
) -> None:
    start = desired_state(before, LOCAL)
    target = desired_state(after, LOCAL, start.backends)
    ops = diff(start, target)

    phases = [phase(op) for op in ops]
    assert phases == sorted(phases), f"ops out of phase order: {[str(o) for o in ops]}"

    allowed = {spec.frontend: set(spec.backends) for spec in before}
    for spec in after:
        allowed.setdefault(spec.frontend, set()).update(spec.backends)

    maps, services, backends = fresh_maps(start)
    for op in ops:
        apply([op], maps)
        now = MapState(dict(services), dict(backends))
        assert broken(now) == [], f"after {op}"
        for frontend in allowed:
            # A connect() never lands on a backend that belongs to neither the
            # old nor the new version of its service.
            assert eligible(now, frontend) <= allowed[frontend], f"after {op}"
    assert MapState(services, backends) == target
    assert leftovers(MapState(services, backends)) == []


def test_failover_ends_on_remote_backends_only() -> None:
    maps, services, backends = fresh_maps()
    sync_maps(maps, [svc(FE, L1, R1, R2, affinity="local")], LOCAL)
    assert eligible(MapState(services, backends), FE) == {L1}
    ops = sync_maps(maps, [svc(FE, R1, R2, affinity="local")], LOCAL)
    assert eligible(MapState(services, backends), FE) == {R1, R2}
    # the local backend's id is deleted last, after no slot names it
    assert isinstance(ops[-1], DeleteBackend)


def test_zero_backends_keeps_a_master_with_count_zero() -> None:
    maps, services, _ = fresh_maps()
    sync_maps(maps, [svc(FE, L1)], LOCAL)
    sync_maps(maps, [svc(FE)], LOCAL)
    assert services == {SlotKey(FE): ServiceEntry(0, 0, 0, 0)}


# --- reconcile: idempotence ------------------------------------------------------------------

STATES = [t[2] for t in TRANSITIONS] + [[svc(Frontend(f"10.96.1.{i}", 80), L1, R1, R2) for i in range(50)]]


@pytest.mark.parametrize("services", STATES)
def test_reconcile_is_idempotent(services: list[ServiceSpec]) -> None:
    maps, _, _ = fresh_maps()
    first = sync_maps(maps, services, LOCAL)
    assert (first == []) == (services == [])
    assert sync_maps(maps, services, LOCAL) == []
    assert dry_run(maps, services, LOCAL) == []


def test_a_new_process_sees_an_empty_diff() -> None:
    """The restart case: a fresh Maps over the same (pinned) contents."""
    _, services, backends = fresh_maps()
    specs = [svc(FE, L1, R1, affinity="local"), svc(FE2, R2)]
    sync_maps(Maps(services, backends), specs, LOCAL)
    pinned = (copy.deepcopy(services), copy.deepcopy(backends))
    assert sync_maps(Maps(*pinned), list(reversed(specs)), LOCAL) == []


@pytest.mark.parametrize("services", STATES)
def test_specs_read_back_from_the_maps_are_the_specs_written(services: list[ServiceSpec]) -> None:
    """What a restarted agent reads from the pinned maps is exactly what was programmed."""
    assert sorted(specs_from_state(desired_state(services, LOCAL)), key=lambda s: s.frontend) == sorted(
        services, key=lambda s: s.frontend
    )


def test_specs_read_back_skip_slots_that_name_no_backend() -> None:
    state = desired_state([svc(FE, L1, R1)], LOCAL)
    assert slots(state, FE) == [L1, R1]
    del state.backends[state.services[SlotKey(FE, 2)].backend_id]
    assert specs_from_state(state) == [svc(FE, L1)]


def test_reconcile_removes_leftovers_of_an_interrupted_run() -> None:
    maps, services, backends = fresh_maps()
    sync_maps(maps, [svc(FE, L1, R1)], LOCAL)
    # as if the agent died between phases: a slot beyond count, an orphan slot
    # and a backend nobody uses
    services[SlotKey(FE, 9)] = ServiceEntry.slot(1)
    services[SlotKey(FE2, 1)] = ServiceEntry.slot(1)
    backends[99] = BackendEntry(IPv4Address("10.245.9.9"), 1, 9)
    assert len(leftovers(MapState(services, backends))) == 3
    ops = sync_maps(maps, [svc(FE, L1, R1)], LOCAL)
    assert {str(op) for op in ops} == {
        f"delete {FE} slot 9",
        f"delete {FE2} slot 1",
        "delete backend 99",
    }
    assert leftovers(MapState(services, backends)) == []


def test_broken_reports_what_a_connect_would_trip_over() -> None:
    state = MapState(
        services={
            SlotKey(FE): ServiceEntry.master(count=2, preferred=3),
            SlotKey(FE, 1): ServiceEntry.slot(5),
        },
        backends={},
    )
    assert broken(state) == [
        f"{FE}: preferred 3 > count 2",
        f"{FE} slot 1: backend 5 does not exist",
        f"{FE} slot 2: missing (count is 2)",
    ]


# --- apply: batches ---------------------------------------------------------------------------


class BatchDict(dict):  # type: ignore[type-arg]
    """A dict with the batch methods of bpfsys.BpfMap, recording each call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, int]] = []

    def update_many(self, items: Sequence[tuple[object, object]]) -> None:
        self.calls.append(("update", len(items)))
        self.update(items)

    def delete_many(self, keys: Sequence[object]) -> None:
        self.calls.append(("delete", len(keys)))
        for key in keys:
            self.pop(key, None)


def test_apply_batches_each_run_of_one_kind() -> None:
    services, backends = BatchDict(), BatchDict()
    maps = Maps(services, backends)
    specs = [svc(Frontend(f"10.96.2.{i}", 80), L1, R1) for i in range(10)]
    sync_maps(maps, specs, LOCAL)
    assert backends.calls == [("update", 2)]
    assert services.calls == [("update", 20), ("update", 10)]  # slots, then masters
    services.calls.clear()
    backends.calls.clear()
    sync_maps(maps, specs[:5], LOCAL)
    assert services.calls == [("delete", 5), ("delete", 10)]  # masters, then slots
    assert backends.calls == []


def test_apply_tolerates_deleting_what_is_gone() -> None:
    maps, _, _ = fresh_maps()
    apply([DeleteService(SlotKey(FE, 3)), DeleteBackend(42)], maps)


# --- capacity ---------------------------------------------------------------------------------


def bounded_maps(services: int, backends: int) -> tuple[Maps, dict[SlotKey, ServiceEntry], dict[int, BackendEntry]]:
    svc_map: dict[SlotKey, ServiceEntry] = {}
    be_map: dict[int, BackendEntry] = {}
    return Maps(svc_map, be_map, Capacity(services, backends)), svc_map, be_map


@pytest.mark.parametrize(
    ("specs", "services", "backends", "full_map", "need"),
    [
        # 2 masters + 3 slots = 5 service entries, 3 backends
        ([svc(FE, L1, R1), svc(FE2, R2)], 4, 10, "cm_svc4", 5),
        ([svc(FE, L1, R1), svc(FE2, R2)], 10, 2, "cm_backend4", 3),
    ],
)
def test_a_state_that_does_not_fit_is_refused_before_any_write(
    specs: list[ServiceSpec], services: int, backends: int, full_map: str, need: int
) -> None:
    maps, svc_map, be_map = bounded_maps(services, backends)
    with pytest.raises(CapacityError) as caught:
        sync_maps(maps, specs, LOCAL)
    err = caught.value
    assert (err.map_name, err.need, err.size, err.during_update) == (full_map, need, min(services, backends), False)
    setting = "MapLimits.services" if full_map == "cm_svc4" else "MapLimits.backends"
    assert full_map in str(err) and f"{need:,} entries" in str(err) and setting in str(err)
    assert svc_map == {} and be_map == {}


def test_a_refused_state_leaves_the_previous_one_in_place() -> None:
    maps, svc_map, be_map = bounded_maps(6, 3)
    sync_maps(maps, [svc(FE, L1, R1)], LOCAL)
    before = MapState(dict(svc_map), dict(be_map))
    with pytest.raises(CapacityError):
        sync_maps(maps, [svc(FE, L1, R1), svc(FE2, L2, R2)], LOCAL)  # 4 backends > 3
    assert MapState(dict(svc_map), dict(be_map)) == before
    assert broken(before) == []


def test_removals_go_first_when_old_and_new_do_not_fit_together() -> None:
    """Replacing one service by another in maps that hold one at a time."""
    maps, svc_map, be_map = bounded_maps(3, 2)
    sync_maps(maps, [svc(FE, L1, L2)], LOCAL)
    start = MapState(dict(svc_map), dict(be_map))
    target = desired_state([svc(FE2, R1, R2)], LOCAL, start.backends)
    ops = ordered_ops(start, target, maps.capacity)
    assert ops != diff(start, target)  # the plain order would need 6 entries and 4 backends
    for op in ops:
        apply([op], maps)
        now = MapState(dict(svc_map), dict(be_map))
        assert len(svc_map) <= 3 and len(be_map) <= 2, f"after {op}"
        assert broken(now) == [], f"after {op}"
    assert MapState(dict(svc_map), dict(be_map)) == target


def test_an_update_that_cannot_fit_even_with_removals_first_is_refused() -> None:
    """All backends of a kept service change: old and new ids coexist for a moment."""
    maps, svc_map, be_map = bounded_maps(10, 2)
    sync_maps(maps, [svc(FE, L1, L2)], LOCAL)
    before = dict(svc_map), dict(be_map)
    with pytest.raises(CapacityError) as caught:
        sync_maps(maps, [svc(FE, R1, R2)], LOCAL)
    assert (caught.value.map_name, caught.value.need, caught.value.during_update) == ("cm_backend4", 4, True)
    assert "while updating" in str(caught.value)
    assert (svc_map, be_map) == before


def test_unbounded_maps_keep_the_plain_order() -> None:
    start = desired_state([svc(FE, L1, R1), svc(FE2, R2)], LOCAL)
    target = desired_state([svc(FE, L1)], LOCAL, start.backends)
    assert ordered_ops(start, target) == diff(start, target)


# --- IPv6 and dual stack -------------------------------------------------------------------------

FE6 = Frontend("fd00:96::10", 80)
L6 = Backend("fd00:244:1::10", 8080, 1)
R6 = Backend("fd00:245:1::10", 8080, 2)
# ::a.b.c.d has the integer value of a.b.c.d: identities must still differ
MAPPED = Backend("::10.244.1.10", 8080, 1)


def test_both_families_share_one_backend_id_space_and_never_collide() -> None:
    state = desired_state([svc(FE, L1, R1), svc(FE6, L6, R6, MAPPED)], LOCAL)
    assert broken(state) == []
    assert len(state.backends) == 5  # L1 and ::10.244.1.10 are two backends
    assert {e.ip.version for e in state.backends.values()} == {4, 6}
    assert [e.backend for e in (state.backends[state.services[SlotKey(FE6, i)].backend_id] for i in (1, 2))] == [
        MAPPED,
        L6,
    ]  # slots sorted within the family
    assert sorted(specs_from_state(state), key=lambda s: s.frontend) == [
        svc(FE, L1, R1),
        svc(FE6, L6, R6, MAPPED),
    ]


def test_mixed_families_sort_ipv4_first_without_comparing_across_families() -> None:
    assert sorted([FE6, FE2, FE]) == [FE, FE2, FE6]
    assert sorted([R6, L1]) == [L1, R6]
    assert str(FE6) == "[fd00:96::10]:80/TCP" and str(L6) == "[fd00:244:1::10]:8080@1"


def test_each_family_is_checked_against_its_own_map() -> None:
    # room for the IPv4 service, not for the IPv6 one (cm_svc6 holds 2 entries)
    capacity = Capacity(services=3, backends=2, services6=2, backends6=2)
    maps = Maps({}, {}, capacity)
    sync_maps(maps, [svc(FE, L1, R1)], LOCAL)
    with pytest.raises(CapacityError) as caught:
        sync_maps(maps, [svc(FE, L1, R1), svc(FE6, L6, R6)], LOCAL)
    assert (caught.value.map_name, caught.value.need, caught.value.size) == ("cm_svc6", 3, 2)
    sync_maps(maps, [svc(FE, L1, R1), svc(FE6, L6)], LOCAL)  # 2 entries: fits
