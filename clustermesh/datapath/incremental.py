"""Incremental planning: the map writes for what changed, at a cost that follows the change.

:mod:`clustermesh.datapath.plan` reads and diffs every entry, which at 10,000 services costs far more
than the one service a change touches. :class:`IncrementalPlanner` remembers what it wrote and plans only
the frontends whose spec changed, with the same ids, order and capacity check as
:func:`~clustermesh.datapath.plan.diff` and :func:`~clustermesh.datapath.plan.ordered_ops` over the whole
maps (a randomized test holds it to that). It trusts its memory, so the loader starts it from a full
sync (:func:`full_sync`) and now and then reads the maps back to compare (:func:`drift`). Pure.
"""

from __future__ import annotations

import heapq
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TypeVar

from clustermesh.datapath.model import (
    BE_F_LOCAL,
    MAX_BACKEND_ID,
    BackendEntry,
    Frontend,
    MapState,
    ServiceEntry,
    ServiceSpec,
    SlotKey,
)
from clustermesh.datapath.plan import (
    Capacity,
    DeleteService,
    Maps,
    Needs,
    Op,
    PutBackend,
    PutService,
    _needs,
    _ordered_ops,
    apply,
    desired_state,
    ordered_ops,
    paused_gc,
    slot_order,
)

K = TypeVar("K")
V = TypeVar("V")
UNLIMITED = Capacity()

@dataclass
class Update:
    """What :meth:`IncrementalPlanner.plan` found: the ordered writes and what the
    planner must remember once they are in the maps (:meth:`IncrementalPlanner.commit`)."""

    ops: list[Op]
    specs: dict[Frontend, ServiceSpec] | None
    """The new desired state by frontend (a plan of everything), or None (a plan of named changes)."""
    changed: list[Frontend]
    """Frontends whose spec is new, changed or gone, in frontend order."""
    new_ids: dict[tuple[int, int, int], int]
    """Backends that get an id (:attr:`Backend.key` -> id)."""
    refs: dict[int, int]
    """Slot references of each backend id this update touches, after it."""
    patch: dict[Frontend, ServiceSpec | None] | None = None
    """A plan of named changes: the new spec of each changed frontend, None where it goes."""


class IncrementalPlanner:
    """A reconcile whose cost follows the change, not the number of services.

    It keeps in memory what it last wrote (the map contents, the specs by
    frontend, each backend's id and how many slots name it) and plans only the
    frontends whose spec moved. The writes are exactly those :func:`diff` /
    :func:`ordered_ops` would order for the whole maps when the maps hold what
    the planner remembers: same ids (kept ids stay, new ones take the lowest
    free ids in frontend and slot order), same order, same capacity check
    (counting the entries of the services left alone).

    It trusts its memory: start it from a full reconcile (:func:`full_sync`,
    which reads the maps), and now and then compare :attr:`state` with the maps.
    After a failed write, drop it: the maps are no longer what it remembers.
    """

    def __init__(self, state: MapState, services: Iterable[ServiceSpec], local_cluster_id: int) -> None:
        """``state``: the map contents that :func:`desired_state` gives for ``services``."""
        self.local_cluster_id = local_cluster_id
        self.state = MapState(dict(state.services), dict(state.backends))
        self._specs = {spec.frontend: spec for spec in services}
        self._ids = {entry.key: bid for bid, entry in state.backends.items()}
        self._refs: dict[int, int] = {}
        for key, entry in state.services.items():
            if not key.is_master:
                self._refs[entry.backend_id] = self._refs.get(entry.backend_id, 0) + 1
        self._needs = _needs(state)
        # Ids are handed out lowest first: the free ones are the holes below
        # _top (a heap) and everything from _top up.
        self._top = max(state.backends, default=0) + 1
        self._holes = [bid for bid in range(1, self._top) if bid not in state.backends]  # sorted: a heap

    def _fresh_ids(self) -> Iterator[int]:
        """Ids not in the maps now, lowest first (what :func:`_free_ids` gives)."""
        holes = list(self._holes)  # a copy: nothing is taken before commit()
        while holes:
            yield heapq.heappop(holes)
        yield from range(self._top, MAX_BACKEND_ID + 1)
        raise ValueError("backend ids exhausted")

    def plan(
        self,
        services: Iterable[ServiceSpec] | Mapping[Frontend, ServiceSpec],
        capacity: Capacity = UNLIMITED,
        changed_hint: Collection[Frontend] | None = None,
    ) -> Update:
        """The writes that make the maps hold ``services``; changes nothing here.

        With ``changed_hint``, ``services`` is a mapping by frontend and only the frontends named
        there are compared with what was planned last: every other one must be as it was. That is
        what keeps a change to one of 10,000 services from walking all of them.

        Raises :class:`CapacityError` (as :func:`ordered_ops`) and ValueError
        (as :func:`desired_state`).
        """
        old = self._specs
        if changed_hint is not None:
            if not isinstance(services, Mapping):
                raise TypeError("a plan of named changes takes the services by frontend")
            named = sorted((f for f in changed_hint if old.get(f) != services.get(f)), key=lambda f: f.key)
            patch = {f: services.get(f) for f in named}
            return self._plan_changed(patch, named, capacity, None, patch)
        specs: dict[Frontend, ServiceSpec] = {}
        changed: list[Frontend] = []
        listed = 0  # frontends of ``old`` still listed
        for spec in services.values() if isinstance(services, Mapping) else services:
            frontend = spec.frontend
            if frontend in specs:
                raise ValueError(f"frontend {frontend} is listed twice")
            specs[frontend] = spec
            # The merger hands back the same objects for unchanged services:
            # identity first, then equality (a spec rebuilt with the same content).
            before = old.get(frontend)
            if before is not None:
                listed += 1
            if before is not spec and before != spec:
                changed.append(frontend)
        if listed != len(old):  # some frontends went away
            changed += [frontend for frontend in old if frontend not in specs]
        changed.sort(key=lambda f: f.key)
        return self._plan_changed(specs, changed, capacity, specs, None)

    def _plan_changed(
        self,
        wanted_of: Mapping[Frontend, ServiceSpec | None],
        changed: list[Frontend],
        capacity: Capacity,
        specs: dict[Frontend, ServiceSpec] | None,
        patch: dict[Frontend, ServiceSpec | None] | None,
    ) -> Update:
        """The writes for ``changed`` (in frontend order), whose new specs ``wanted_of`` holds."""
        old = self._specs
        current = MapState()
        desired = MapState()
        delta: dict[int, int] = {}
        services_now = self.state.services
        for frontend in changed:
            if frontend not in old:
                continue
            master_key = SlotKey(frontend)
            master = services_now[master_key]
            current.services[master_key] = master
            for slot in range(1, master.count + 1):
                key = SlotKey(frontend, slot)
                slot_entry = services_now[key]
                current.services[key] = slot_entry
                delta[slot_entry.backend_id] = delta.get(slot_entry.backend_id, 0) - 1

        ids, local = self._ids, self.local_cluster_id
        new_ids: dict[tuple[int, int, int], int] = {}
        new_entries: dict[int, BackendEntry] = {}
        fresh = self._fresh_ids()
        for frontend in changed:
            wanted = wanted_of.get(frontend)
            if wanted is None:
                continue
            ordered, preferred = slot_order(wanted, local)
            desired.services[SlotKey(frontend)] = ServiceEntry(0, len(ordered), preferred, wanted.affinity.flags)
            for slot, backend in enumerate(ordered, start=1):
                bid = ids.get(backend.key)
                if bid is None:
                    bid = new_ids.get(backend.key)
                if bid is None:
                    bid = next(fresh)
                    new_ids[backend.key] = bid
                    flags = BE_F_LOCAL if backend.cluster_id == local else 0
                    new_entries[bid] = BackendEntry(backend.ip, backend.port, backend.cluster_id, flags)
                desired.services[SlotKey(frontend, slot)] = ServiceEntry(bid)
                delta[bid] = delta.get(bid, 0) + 1

        refs: dict[int, int] = {}
        backends_now = self.state.backends
        for bid, moved in delta.items():
            after = self._refs.get(bid, 0) + moved
            refs[bid] = after
            kept = backends_now.get(bid)
            if kept is not None:
                current.backends[bid] = kept
            if after > 0:
                desired.backends[bid] = kept if kept is not None else new_entries[bid]

        # Entries of the services left alone fill the maps too.
        here = _needs(current)
        rest: Needs = (
            self._needs[0] - here[0],
            self._needs[1] - here[1],
            self._needs[2] - here[2],
            self._needs[3] - here[3],
        )
        ops = _ordered_ops(current, desired, capacity, rest)
        return Update(ops, specs, changed, new_ids, refs, patch)

    def commit(self, update: Update) -> None:
        """Remember ``update`` as written (call it once its ops are in the maps)."""
        services, backends = self.state.services, self.state.backends
        svc4, svc6, be4, be6 = self._needs
        # New ids first: they are the lowest holes, in order, or ids from _top up.
        for bid in sorted(update.new_ids.values()):
            if bid < self._top:
                taken = heapq.heappop(self._holes)
                assert taken == bid, f"backend id {bid} planned, lowest free is {taken}"
            else:
                self._top = bid + 1
        for op in update.ops:
            if isinstance(op, PutService):
                if op.key not in services:
                    if op.key.frontend.v6:
                        svc6 += 1
                    else:
                        svc4 += 1
                services[op.key] = op.entry
            elif isinstance(op, DeleteService):
                if services.pop(op.key, None) is not None:
                    if op.key.frontend.v6:
                        svc6 -= 1
                    else:
                        svc4 -= 1
            elif isinstance(op, PutBackend):
                if op.backend_id not in backends:
                    if op.entry.ip.version == 6:
                        be6 += 1
                    else:
                        be4 += 1
                backends[op.backend_id] = op.entry
                self._ids[op.entry.key] = op.backend_id
            else:
                entry = backends.pop(op.backend_id, None)
                if entry is not None:
                    if entry.ip.version == 6:
                        be6 -= 1
                    else:
                        be4 -= 1
                    del self._ids[entry.key]
                    heapq.heappush(self._holes, op.backend_id)
        self._needs = (svc4, svc6, be4, be6)
        for bid, count in update.refs.items():
            if count > 0:
                self._refs[bid] = count
            else:
                self._refs.pop(bid, None)
        if update.specs is not None:
            self._specs = update.specs
        for frontend, spec in (update.patch or {}).items():
            if spec is None:
                self._specs.pop(frontend, None)
            else:
                self._specs[frontend] = spec

    def write(self, maps: Maps, services: Iterable[ServiceSpec] | Mapping[Frontend, ServiceSpec],
              changed_hint: Collection[Frontend] | None = None) -> list[Op]:
        """Plan, write and remember. On a failed write the planner is stale: drop it."""
        with paused_gc():
            update = self.plan(services, maps.capacity, changed_hint)
            apply(update.ops, maps)
            self.commit(update)
        return update.ops


def full_sync(
    maps: Maps, services: Iterable[ServiceSpec], local_cluster_id: int, found: MapState | None = None
) -> tuple[list[Op], MapState, IncrementalPlanner]:
    """:func:`sync_maps`, which reads the maps (unless given what they hold as
    ``found``), returning also what it found there and a planner for the next
    changes (starting from what it wrote)."""
    specs = list(services)
    with paused_gc():
        if found is None:
            found = maps.read()
        desired = desired_state(specs, local_cluster_id, found.backends)
        ops = ordered_ops(found, desired, maps.capacity)
        apply(ops, maps)
        planner = IncrementalPlanner(desired, specs, local_cluster_id)
    return ops, found, planner


def drift(expected: MapState, found: MapState) -> int:
    """How many entries of ``found`` differ from ``expected`` (missing, extra or changed)."""
    return _differ(expected.services, found.services) + _differ(expected.backends, found.backends)


def _differ(mine: Mapping[K, V], theirs: Mapping[K, V]) -> int:
    changed = sum(1 for key, value in mine.items() if theirs.get(key) != value)
    return changed + sum(1 for key in theirs if key not in mine)
