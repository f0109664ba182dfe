"""The incremental merge gives exactly what a full merge gives, over random event sequences."""

from __future__ import annotations

import random

import pytest

from clustermesh.agent.merge import LocalService, merge
from clustermesh.agent.merger import Ref, ServiceMerger
from clustermesh.datapath.model import Affinity
from clustermesh.schema import ClusterService, PortConfig

LOCAL_ID = 1
REMOTES = {"c2": 2, "c3": 3, "c4": 4}
NAMES = [("ns", f"svc-{i}") for i in range(12)]


def ports(rng: random.Random) -> dict[str, PortConfig]:
    return {"http": PortConfig("TCP", rng.choice([80, 8080]))} | (
        {"dns": PortConfig("UDP", 53)} if rng.random() < 0.3 else {})


def backends(rng: random.Random, net: int) -> dict[str, dict[str, PortConfig]]:
    return {f"10.{net}.{rng.randrange(4)}.{rng.randrange(1, 9)}": ports(rng) for _ in range(rng.randrange(4))}


class World:
    """Local global Services and remote records, changed by random events."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.locals: dict[Ref, LocalService] = {}
        self.records: dict[str, dict[Ref, ClusterService]] = {name: {} for name in REMOTES}
        self.usable = set(REMOTES)
        self.exclude: list[str] = []

    def local_service(self, ref: Ref) -> LocalService:
        rng = self.rng
        ip = f"10.96.0.{NAMES.index(ref) + 1}"
        return LocalService(ref[0], ref[1], {ip: ports(rng)}, backends(rng, 244),
                            rng.choice(list(Affinity)))

    def record(self, cluster: str, ref: Ref) -> ClusterService:
        return ClusterService(cluster, ref[0], ref[1], REMOTES[cluster], frontends={"10.97.0.1": ports(self.rng)},
                              backends=backends(self.rng, 244 + REMOTES[cluster]), shared=self.rng.random() < 0.8)

    def step(self, merger: ServiceMerger) -> None:
        """One random event, told to the merger the way the agent tells it."""
        rng = self.rng
        ref = rng.choice(NAMES)
        kind = rng.choice(["local", "local-gone", "remote", "remote-gone", "usable", "cidrs"])
        if kind == "local":
            self.locals[ref] = self.local_service(ref)
            merger.touch(ref)
        elif kind == "local-gone":
            self.locals.pop(ref, None)
            merger.touch(ref)
        elif kind == "remote":
            cluster = rng.choice(list(REMOTES))
            self.records[cluster][ref] = self.record(cluster, ref)
            merger.touch(ref)
        elif kind == "remote-gone":
            self.records[rng.choice(list(REMOTES))].pop(ref, None)
            merger.touch(ref)
        elif kind == "usable":
            self.usable ^= {rng.choice(list(REMOTES))}
            merger.touch_all()
        else:
            self.exclude = rng.choice([[], ["10.246.0.0/16"], ["10.245.1.0/24", "10.247.0.0/16"]])
            merger.touch_all()

    def records_of(self, ref: Ref) -> list[ClusterService]:
        return [by_ref[ref] for name, by_ref in sorted(self.records.items()) if name in self.usable and ref in by_ref]

    def full(self) -> list:
        records = [rec for name in sorted(self.usable) for rec in self.records[name].values()]
        result = merge(LOCAL_ID, self.locals, records, exclude_remote_cidrs=self.exclude)
        return sorted(result.specs, key=lambda s: (str(s.frontend.ip), s.frontend.port, s.frontend.proto))


def incremental(merger: ServiceMerger, world: World) -> list:
    merger.update(lambda: world.locals, world.locals.get, world.records_of, world.exclude)
    return sorted(merger.specs(), key=lambda s: (str(s.frontend.ip), s.frontend.port, s.frontend.proto))


@pytest.mark.parametrize("seed", range(40))
def test_incremental_merge_equals_full_merge_after_every_event(seed: int) -> None:
    rng = random.Random(seed)
    world, merger = World(rng), ServiceMerger(LOCAL_ID)
    for _ in range(60):
        for _ in range(rng.randrange(1, 4)):  # several events may land between two updates
            world.step(merger)
        assert incremental(merger, world) == world.full()


@pytest.mark.parametrize("seed", range(20))
def test_the_table_by_frontend_follows_and_the_outcome_names_every_frontend_that_moved(seed: int) -> None:
    """What the datapath relies on when it looks only at the frontends an update names."""
    rng = random.Random(seed)
    world, merger = World(rng), ServiceMerger(LOCAL_ID)
    table = merger.by_frontend
    before: dict = {}
    for _ in range(60):
        for _ in range(rng.randrange(1, 4)):
            world.step(merger)
        outcome = merger.update(lambda: world.locals, world.locals.get, world.records_of, world.exclude)
        now = {spec.frontend: spec for spec in world.full()}
        assert dict(table) == now  # the same object, kept up to date
        moved = {f for f in before.keys() | now.keys() if before.get(f) != now.get(f)}
        assert set(outcome.frontends) == moved and outcome.changed == bool(moved)
        before = now


def test_a_frontend_two_services_claim_is_served_by_one_and_the_rest_keep_working() -> None:
    world, merger = World(random.Random(5)), ServiceMerger(LOCAL_ID)
    http = {"http": PortConfig("TCP", 80)}
    a, b, c = NAMES[:3]
    world.locals[a] = LocalService(*a, {"10.96.0.9": http}, {"10.244.0.1": http}, Affinity.NONE)
    world.locals[b] = LocalService(*b, {"10.96.0.9": http}, {"10.244.0.2": http}, Affinity.NONE)
    world.locals[c] = LocalService(*c, {"10.96.0.3": http}, {"10.244.0.3": http}, Affinity.NONE)
    outcome = merger.update(lambda: world.locals, world.locals.get, world.records_of)
    served = {str(s.frontend.ip): {str(be.ip) for be in s.backends} for s in merger.specs()}
    assert served == {"10.96.0.9": {"10.244.0.1"}, "10.96.0.3": {"10.244.0.3"}}  # the first by name: a
    assert outcome.problems is not None
    assert [p for p in outcome.problems if "claimed" in p] == [
        "frontend 10.96.0.9:80/TCP is claimed by ns/svc-0 and by ns/svc-1: ns/svc-0 serves it until it lets go"]
    del world.locals[a]  # the owner lets go: the other takes over, and the problem is gone
    merger.touch(a)
    outcome = merger.update(lambda: world.locals, world.locals.get, world.records_of)
    assert {str(be.ip) for be in merger.by_frontend[next(iter(outcome.frontends))].backends} == {"10.244.0.2"}
    assert outcome.problems == []


def test_only_touched_services_are_merged_and_changed_says_whether_specs_moved() -> None:
    world, merger = World(random.Random(7)), ServiceMerger(LOCAL_ID)
    for ref in NAMES:
        world.locals[ref] = world.local_service(ref)
    first = merger.update(lambda: world.locals, world.locals.get, world.records_of)
    assert first.merged == len(NAMES) and first.changed
    merger.touch(NAMES[3])
    again = merger.update(lambda: world.locals, world.locals.get, world.records_of)
    assert again.merged == 1 and not again.changed  # merged again, nothing moved
    world.records["c2"][NAMES[3]] = ClusterService("c2", *NAMES[3], 2, frontends={},
                                                   backends={"10.246.1.1": {"http": PortConfig("TCP", 80)}})
    local = world.locals[NAMES[3]]
    world.locals[NAMES[3]] = LocalService(*NAMES[3], local.frontends, local.backends, local.affinity)
    merger.touch(NAMES[3])
    moved = merger.update(lambda: world.locals, world.locals.get, world.records_of)
    assert moved.merged == 1 and moved.changed
    assert merger.update(lambda: world.locals, world.locals.get, world.records_of).merged == 0


def test_problems_are_listed_only_when_they_moved() -> None:
    world, merger = World(random.Random(3)), ServiceMerger(LOCAL_ID)
    ref = NAMES[0]
    world.locals[ref] = LocalService(*ref, {"10.96.0.1": {"http": PortConfig("TCP", 80)}}, {}, Affinity.NONE)
    assert merger.update(lambda: world.locals, world.locals.get, world.records_of).problems is None  # none, still
    merger.touch(ref)
    assert merger.update(lambda: world.locals, world.locals.get, world.records_of).problems is None
    # A remote record that uses our own cluster ID is a problem of this Service.
    world.records["c2"][ref] = ClusterService("c2", *ref, LOCAL_ID, frontends={}, backends={})
    merger.touch(ref)
    problems = merger.update(lambda: world.locals, world.locals.get, world.records_of).problems
    assert problems is not None and any("uses this cluster's ID" in p for p in problems)
