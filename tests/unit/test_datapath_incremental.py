"""Pure tests of the incremental planner and of SocketLB's full/incremental policy.

The reference is the full reconcile (``desired_state`` + ``ordered_ops`` over the whole
maps): from the same maps, an incremental reconcile must order exactly the same writes.
Dicts stand in for the BPF maps.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Iterator
from typing import Any

import pytest

from clustermesh.datapath import loader
from clustermesh.datapath.errors import CapacityError
from clustermesh.datapath.incremental import IncrementalPlanner, full_sync
from clustermesh.datapath.loader import ReconcileSettings, SocketLB
from clustermesh.datapath.model import (
    Affinity,
    Backend,
    BackendEntry,
    Frontend,
    MapState,
    ServiceEntry,
    ServiceSpec,
    SlotKey,
)
from clustermesh.datapath.plan import (
    Capacity,
    Maps,
    Op,
    apply,
    broken,
    desired_state,
    leftovers,
    ordered_ops,
)

LOCAL = 1

# Pools small enough that services share backends (reference counts above one)
# and frontends come back after going away.
FRONTENDS = [Frontend(f"10.96.0.{i}", 80) for i in range(1, 9)] + [
    Frontend("10.96.0.1", 53, "UDP"),
    *(Frontend(f"fd00:96::{i}", 80) for i in range(1, 7)),
]
BACKENDS4 = [Backend(f"10.24{c}.0.{i}", 8080, c) for c in (1, 2, 3) for i in range(1, 6)]
BACKENDS6 = [Backend(f"fd00:24{c}::{i}", 8080, c) for c in (1, 2, 3) for i in range(1, 5)]
AFFINITIES = list(Affinity)


def state_of(maps: Maps) -> MapState:
    return MapState(dict(maps.services), dict(maps.backends))


def dict_maps(state: MapState | None = None, capacity: Capacity | None = None) -> Maps:
    state = state or MapState()
    return Maps(dict(state.services), dict(state.backends), capacity or Capacity())


def pool(frontend: Frontend) -> list[Backend]:
    return BACKENDS6 if frontend.v6 else BACKENDS4


def random_spec(rng: random.Random, frontend: Frontend) -> ServiceSpec:
    backends = rng.sample(pool(frontend), rng.randint(0, 5))
    return ServiceSpec(frontend, frozenset(backends), rng.choice(AFFINITIES))


def mutate(rng: random.Random, specs: dict[Frontend, ServiceSpec]) -> dict[Frontend, ServiceSpec]:
    """A few random changes of the kinds the agent makes; unchanged specs stay the same objects."""
    out = dict(specs)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        kind = rng.choice(("add", "remove", "backends", "affinity", "rebuilt", "replace", "nothing"))
        absent = [f for f in FRONTENDS if f not in out]
        if kind == "add" or not out:
            if absent:
                frontend = rng.choice(absent)
                out[frontend] = random_spec(rng, frontend)
            continue
        frontend = rng.choice(sorted(out, key=lambda f: f.key))
        spec = out[frontend]
        if kind == "remove":
            del out[frontend]
        elif kind == "backends":  # one backend joins or leaves
            backends = set(spec.backends) ^ {rng.choice(pool(frontend))}
            out[frontend] = ServiceSpec(frontend, frozenset(backends), spec.affinity)
        elif kind == "affinity":
            out[frontend] = ServiceSpec(frontend, spec.backends, rng.choice(AFFINITIES))
        elif kind == "rebuilt":  # equal content, another object: nothing to write
            out[frontend] = ServiceSpec(frontend, frozenset(spec.backends), spec.affinity)
        elif kind == "replace":
            out[frontend] = random_spec(rng, frontend)
    return out


def full_ops(maps: Maps, specs: list[ServiceSpec]) -> list[Op]:
    """What a full reconcile would write to ``maps`` now (the reference)."""
    current = state_of(maps)
    return ordered_ops(current, desired_state(specs, LOCAL, current.backends), maps.capacity)


def apply_one_by_one(ops: list[Op], maps: Maps) -> None:
    for op in ops:
        apply([op], maps)
        assert broken(state_of(maps)) == [], f"after {op}"


def run(seed: int, capacity: Capacity, steps: int, hinted: bool = False) -> Iterator[str]:
    """Random changes reconciled incrementally, each checked against a full reconcile;
    yields what happened at each step. ``hinted``: the planner is told which frontends may have
    changed (those that did, and a few that did not, as the agent's accumulated hint) and given
    the services by frontend, as the agent gives them."""
    rng = random.Random(seed)
    maps = dict_maps(capacity=capacity)
    specs: dict[Frontend, ServiceSpec] = {}
    planner = IncrementalPlanner(MapState(), [], LOCAL)
    written: dict[Frontend, ServiceSpec] = {}
    for _ in range(steps):
        # After a refusal, build on the refused state or on the one in the maps.
        specs = mutate(rng, rng.choice((specs, written)))
        # Any order: the planner must not depend on it.
        listed = rng.sample(list(specs.values()), len(specs))
        given: list[ServiceSpec] | dict[Frontend, ServiceSpec] = listed
        hint = None
        if hinted:
            given = dict(specs)
            moved = {f for f in specs.keys() | written.keys() if specs.get(f) != written.get(f)}
            hint = moved | set(rng.sample(sorted(specs, key=lambda f: f.key), min(2, len(specs))))
        before = state_of(maps)
        try:
            expected = full_ops(maps, listed)
        except CapacityError as refused:
            with pytest.raises(CapacityError) as caught:
                planner.plan(given, maps.capacity, hint)
            got = caught.value
            assert (got.map_name, got.need, got.size, got.during_update) == (
                refused.map_name,
                refused.need,
                refused.size,
                refused.during_update,
            )
            assert state_of(maps) == before and planner.state == before
            yield "refused"
            continue
        update = planner.plan(given, maps.capacity, hint)
        assert update.ops == expected
        apply_one_by_one(update.ops, maps)
        planner.commit(update)
        after = state_of(maps)
        assert after == desired_state(listed, LOCAL, before.backends)
        assert planner.state == after and leftovers(after) == []
        written = specs
        yield "written" if update.ops else "unchanged"


@pytest.mark.parametrize("seed", range(40))
def test_incremental_reconciles_write_what_a_full_reconcile_writes(seed: int) -> None:
    outcomes = list(run(seed, Capacity(), steps=60))
    assert "written" in outcomes and "refused" not in outcomes


@pytest.mark.parametrize("seed", range(20))
def test_a_plan_told_which_frontends_moved_writes_what_a_full_reconcile_writes(seed: int) -> None:
    outcomes = list(run(seed, Capacity(), steps=60, hinted=True))
    assert "written" in outcomes
    # In small maps too, where a refused change is retried with the hint it had plus the next one's.
    small = list(run(seed, Capacity(services=22, backends=9, services6=14, backends6=7), steps=80, hinted=True))
    assert "written" in small


def test_a_plan_told_which_frontends_moved_looks_at_no_other() -> None:
    """The point of the hint: a frontend left out is not compared (so not rewritten), however it differs."""
    a, b = Backend("10.245.0.1", 8080, 2), Backend("10.245.0.2", 8080, 2)
    fe1, fe2 = FRONTENDS[0], FRONTENDS[1]
    maps = dict_maps()
    planner = IncrementalPlanner(MapState(), [], LOCAL)
    planner.write(maps, [ServiceSpec(fe1, frozenset({a})), ServiceSpec(fe2, frozenset({a}))])
    wanted = {fe1: ServiceSpec(fe1, frozenset({a, b})), fe2: ServiceSpec(fe2, frozenset({b}))}
    update = planner.plan(wanted, maps.capacity, {fe1})
    assert update.changed == [fe1]
    assert update.ops == full_ops(maps, [wanted[fe1], ServiceSpec(fe2, frozenset({a}))])
    with pytest.raises(TypeError):
        planner.plan(list(wanted.values()), maps.capacity, {fe1})


@pytest.mark.parametrize("seed", range(40))
def test_in_small_maps_the_same_changes_are_refused_and_retried_alike(seed: int) -> None:
    # Room for about half the pools: some states fit, some only with removals first, some not at all.
    outcomes = list(run(seed, Capacity(services=22, backends=9, services6=14, backends6=7), steps=80))
    assert "written" in outcomes
    if "refused" in outcomes:
        first = outcomes.index("refused")
        assert "written" in outcomes[first:], "no later change was written after a refusal"


def test_the_random_runs_refuse_some_changes_and_write_later_ones() -> None:
    """The small-maps test above means something only if refusals and retries happen."""
    capacity = Capacity(services=22, backends=9, services6=14, backends6=7)
    refusals = retries = 0
    for seed in range(40):
        outcomes = list(run(seed, capacity, steps=80))
        refusals += outcomes.count("refused")
        retries += any(b == "written" for a, b in itertools.pairwise(outcomes) if a == "refused")
    assert refusals > 20 and retries > 10


def test_a_planner_started_from_pinned_maps_continues_where_they_are() -> None:
    """A restarted agent: a full reconcile reads what an earlier one left (ids with holes)."""
    a, b, c = (Backend(f"10.245.0.{i}", 8080, 2) for i in (1, 2, 3))
    fe1, fe2 = FRONTENDS[0], FRONTENDS[1]
    maps = dict_maps()
    apply(full_ops(maps, [ServiceSpec(fe1, frozenset({a, b, c}))]), maps)
    apply(full_ops(maps, [ServiceSpec(fe1, frozenset({a, c}))]), maps)  # id 2 is free again
    assert sorted(maps.backends) == [1, 3]

    kept = [ServiceSpec(fe1, frozenset({a, c}))]
    ops, found, planner = full_sync(maps, kept, LOCAL)
    assert ops == [] and found == planner.state == state_of(maps)

    new = Backend("10.245.0.9", 8080, 2)
    wanted = [*kept, ServiceSpec(fe2, frozenset({new, a}))]
    expected = full_ops(maps, wanted)
    assert planner.write(maps, wanted) == expected
    assert maps.backends[2] == BackendEntry(new.ip, new.port, new.cluster_id)  # the lowest free id


def test_a_refused_change_writes_nothing_and_a_retry_with_room_succeeds() -> None:
    l1, r1, r2 = Backend("10.244.0.1", 8080, 1), Backend("10.245.0.1", 8080, 2), Backend("10.246.0.1", 8080, 3)
    fe1, fe2 = FRONTENDS[0], FRONTENDS[1]
    small = Capacity(services=5, backends=3)
    maps = dict_maps(capacity=small)
    planner = IncrementalPlanner(MapState(), [], LOCAL)
    planner.write(maps, [ServiceSpec(fe1, frozenset({l1, r1}))])
    before = state_of(maps)

    too_big = [ServiceSpec(fe1, frozenset({l1, r1})), ServiceSpec(fe2, frozenset({r1, r2}), Affinity.REMOTE)]
    with pytest.raises(CapacityError) as caught:
        planner.write(maps, too_big)  # 2 masters + 4 slots
    assert (caught.value.map_name, caught.value.need, caught.value.during_update) == ("cm_svc4", 6, False)
    assert state_of(maps) == before and planner.state == before

    # The same change, once the maps are larger (a new Maps over the same entries).
    roomy = Maps(maps.services, maps.backends, Capacity(services=16, backends=8))
    expected = full_ops(roomy, too_big)
    assert planner.write(roomy, too_big) == expected
    assert state_of(roomy) == desired_state(too_big, LOCAL, before.backends)


def test_a_listed_twice_frontend_is_refused_and_changes_nothing() -> None:
    fe = FRONTENDS[0]
    planner = IncrementalPlanner(MapState(), [], LOCAL)
    maps = dict_maps()
    planner.write(maps, [ServiceSpec(fe)])
    before = state_of(maps)
    with pytest.raises(ValueError, match="listed twice"):
        planner.write(maps, [ServiceSpec(fe), ServiceSpec(fe, frozenset({BACKENDS4[0]}))])
    assert state_of(maps) == before and planner.state == before
    assert planner.write(maps, [ServiceSpec(fe)]) == []


def test_only_changed_frontends_are_planned() -> None:
    """The cost follows the change: unchanged specs (same objects or equal ones) are not planned."""
    rng = random.Random(7)
    specs = [random_spec(rng, fe) for fe in FRONTENDS]
    maps = dict_maps()
    _, _, planner = full_sync(maps, specs, LOCAL)
    rebuilt = [ServiceSpec(s.frontend, frozenset(s.backends), s.affinity) for s in specs]
    assert planner.plan(rebuilt).changed == []
    other = Affinity.REMOTE if specs[3].affinity is Affinity.LOCAL else Affinity.LOCAL
    moved = [*specs[:3], ServiceSpec(specs[3].frontend, specs[3].backends, other), *specs[5:]]
    assert planner.plan(moved).changed == sorted([specs[3].frontend, specs[4].frontend], key=lambda f: f.key)


# --- SocketLB: when it reads the maps --------------------------------------------------------


class CountingMaps(Maps):
    """Dict maps that count full reads (a read is what costs O(cluster))."""

    reads = 0

    def read(self) -> MapState:
        self.reads += 1
        return super().read()


class DictSocketLB(SocketLB):
    """SocketLB's reconcile policy over dict maps (no kernel)."""

    def __init__(self, settings: ReconcileSettings) -> None:
        super().__init__("/sys/fs/cgroup/none", "/sys/fs/bpf/none", LOCAL, reconcile_settings=settings)
        self.dict_maps = CountingMaps({}, {})
        self.now = 0.0
        self._clock = lambda: self.now

    @property
    def maps(self) -> Maps:
        return self.dict_maps


def changes(n: int) -> Iterator[list[ServiceSpec]]:
    """n successive spec lists, each one backend different from the last."""
    fe = FRONTENDS[0]
    for i in range(n):
        yield [ServiceSpec(fe, frozenset(BACKENDS4[: 1 + i % 4])), ServiceSpec(FRONTENDS[1])]


def test_socket_lb_reads_the_maps_first_then_only_every_n_reconciles() -> None:
    lb = DictSocketLB(ReconcileSettings(verify_interval=3600, verify_every=3))
    for specs in changes(8):
        before = state_of(lb.dict_maps)
        lb.program(specs)
        assert state_of(lb.dict_maps) == desired_state(specs, LOCAL, before.backends)
    # full, 3 incremental, full, 3 incremental
    assert lb.dict_maps.reads == 2


def test_socket_lb_reads_the_maps_again_after_the_interval() -> None:
    lb = DictSocketLB(ReconcileSettings(verify_interval=60, verify_every=1000))
    specs = list(changes(4))
    lb.program(specs[0])
    lb.now = 59
    lb.program(specs[1])
    assert lb.dict_maps.reads == 1
    lb.now = 60.5
    lb.program(specs[2])
    lb.program(specs[3])
    assert lb.dict_maps.reads == 2


def test_socket_lb_repairs_drift_when_it_verifies(caplog: pytest.LogCaptureFixture) -> None:
    lb = DictSocketLB(ReconcileSettings(verify_interval=3600, verify_every=2))
    specs = list(changes(4))
    lb.program(specs[0])
    # Someone else deletes a slot of a service no change touches.
    fe = FRONTENDS[0]
    lb.dict_maps.services[SlotKey(fe, 1)] = ServiceEntry(999)  # names no backend
    lb.program([*specs[0][:1], ServiceSpec(FRONTENDS[1], frozenset({BACKENDS4[9]}))])
    lb.program([*specs[0][:1], ServiceSpec(FRONTENDS[1], frozenset({BACKENDS4[10]}))])
    assert broken(state_of(lb.dict_maps)) != []  # incremental reconciles trust their memory
    with caplog.at_level(logging.WARNING, logger="clustermesh.datapath.loader"):
        lb.program([*specs[0][:1], ServiceSpec(FRONTENDS[1], frozenset({BACKENDS4[11]}))])
    assert broken(state_of(lb.dict_maps)) == []
    assert [r.getMessage() for r in caplog.records] == [
        "datapath: 1 map entries differed from what this agent wrote; repairing"
    ]


class FailingDict(dict):  # type: ignore[type-arg]
    fail = False

    def __setitem__(self, key: object, value: object) -> None:
        if self.fail:
            raise OSError("bpf map update failed")
        super().__setitem__(key, value)


def test_socket_lb_reads_the_maps_after_a_failed_write_but_not_after_a_refusal() -> None:
    lb = DictSocketLB(ReconcileSettings(verify_interval=3600, verify_every=1000))
    backends = FailingDict()
    lb.dict_maps = CountingMaps({}, backends, Capacity(services=8, backends=4))
    specs = list(changes(3))
    lb.program(specs[0])
    assert lb.dict_maps.reads == 1

    too_big = [ServiceSpec(FRONTENDS[0], frozenset(BACKENDS4[:5]))]
    with pytest.raises(CapacityError):
        lb.program(too_big)
    lb.program(specs[1])
    assert lb.dict_maps.reads == 1  # nothing was written: memory still holds

    backends.fail = True
    with pytest.raises(OSError):
        lb.program(specs[2])  # a new backend cannot be written
    backends.fail = False
    lb.program(specs[2])
    assert lb.dict_maps.reads == 2
    assert state_of(lb.dict_maps) == desired_state(specs[2], LOCAL, None)


@pytest.fixture
def full_plans(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Each call of the loader's full planner (every service planned)."""
    calls: list[object] = []
    original = loader.full_sync

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(loader, "full_sync", counting)
    return calls


def test_a_verification_that_finds_the_maps_as_remembered_plans_only_the_change(full_plans: list[object]) -> None:
    lb = DictSocketLB(ReconcileSettings(verify_interval=0))  # every reconcile verifies
    for specs in changes(4):
        before = state_of(lb.dict_maps)
        expected = full_ops(lb.dict_maps, specs)
        assert lb.program(specs) == expected
        assert state_of(lb.dict_maps) == desired_state(specs, LOCAL, before.backends)
    assert lb.dict_maps.reads == 4  # each one verified ...
    assert len(full_plans) == 1  # ... and only the first planned every service


def test_a_refusal_during_a_verification_keeps_the_memory_and_the_verification_due(
    full_plans: list[object],
) -> None:
    lb = DictSocketLB(ReconcileSettings(verify_interval=3600, verify_every=1))
    lb.dict_maps = CountingMaps({}, {}, Capacity(services=8, backends=4))
    specs = list(changes(2))
    lb.program(specs[0])
    lb.program(specs[0])  # incremental: nothing to write
    with pytest.raises(CapacityError):
        lb.program([ServiceSpec(FRONTENDS[0], frozenset(BACKENDS4[:5]))])  # verification due, refused
    assert lb.dict_maps.reads == 1  # refused before any write or read
    lb.program(specs[1])
    assert lb.dict_maps.reads == 2  # verified now ...
    assert len(full_plans) == 1  # ... against the memory kept through the refusal
    assert state_of(lb.dict_maps) == desired_state(specs[1], LOCAL, None)


def test_socket_lb_reads_the_maps_again_once_closed() -> None:
    """Reopened maps may be other maps (destroyed and loaded again): memory is not trusted."""
    lb = DictSocketLB(ReconcileSettings(verify_interval=3600, verify_every=1000))
    specs = list(changes(3))
    lb.program(specs[0])
    lb.program(specs[1])
    assert lb.dict_maps.reads == 1
    lb.close()
    lb.dict_maps = CountingMaps({}, {})  # what a destroy and a new load leave
    lb.program(specs[2])
    assert lb.dict_maps.reads == 1
    assert state_of(lb.dict_maps) == desired_state(specs[2], LOCAL, None)
