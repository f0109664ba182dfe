"""Pure planning: desired services -> desired map contents -> ordered map writes.

Nothing here touches the kernel. The loader hands :func:`sync_maps` two
MutableMappings backed by pinned BPF maps; the unit tests hand it plain dicts.

Ordering rule (:func:`diff`), so that a connect() racing with the agent never
sees a half-written service:

1. write new or changed backends;
2. write new or changed slots (slot >= 1);
3. write new or changed master entries (this is where a count goes up *after*
   its slots exist, or down *before* its slots go), and delete the masters of
   services that went away (the frontend stops being ours at once);
4. delete slots nobody counts any more;
5. delete backends no slot references any more.

At every step each master's slots 1..count exist and name existing backends.
Between steps 2 and 3 a connection may pick a new slot's backend under the
old preferred count for an instant; it never picks a removed backend or an
empty slot.

Backend ids are stable: a backend already in the map keeps its id, and a new
backend never takes an id that is still in the map, because deletions come
last and slots of live services may still point at that id.

Capacity (:func:`ordered_ops`): puts come before deletes, so a map holds the
old and the new entries together for a moment. When that union would not fit
but the desired state does, the services that go away are removed first (a
whole service at a time: master, slots, then the backends nobody uses); when
even that does not fit, or the desired state alone does not, nothing is
written and :class:`~clustermesh.datapath.errors.CapacityError` says which map,
how many entries and which setting.

The incremental planner that follows changes without reading the maps is in
:mod:`clustermesh.datapath.incremental`.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
from collections.abc import Iterable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, TypeAlias, TypeVar, runtime_checkable

from clustermesh.datapath.errors import CapacityError
from clustermesh.datapath.layout import BACKEND4_MAP, BACKEND6_MAP, SVC4_MAP, SVC6_MAP
from clustermesh.datapath.model import (
    BE_F_LOCAL,
    MAX_BACKEND_ID,
    MAX_SLOTS,
    Affinity,
    Backend,
    BackendEntry,
    Frontend,
    MapState,
    ServiceEntry,
    ServiceSpec,
    SlotKey,
)

K = TypeVar("K")
V = TypeVar("V")

# --- operations ----------------------------------------------------------------


# Operations are NamedTuples for the same reason as SlotKey: a first
# programming of 100,000 services makes two million of them.


class PutBackend(NamedTuple):
    backend_id: int
    entry: BackendEntry

    def __str__(self) -> str:
        e = self.entry
        return f"put backend {self.backend_id} = {e.ip}:{e.port} cluster {e.cluster_id}"


class PutService(NamedTuple):
    key: SlotKey
    entry: ServiceEntry

    def __str__(self) -> str:
        if self.key.is_master:
            e = self.entry
            return f"put {self.key.frontend} master count={e.count} preferred={e.preferred} flags={e.flags}"
        return f"put {self.key.frontend} slot {self.key.slot} = backend {self.entry.backend_id}"


class DeleteService(NamedTuple):
    key: SlotKey

    def __str__(self) -> str:
        what = "master" if self.key.is_master else f"slot {self.key.slot}"
        return f"delete {self.key.frontend} {what}"


class DeleteBackend(NamedTuple):
    backend_id: int

    def __str__(self) -> str:
        return f"delete backend {self.backend_id}"


Op: TypeAlias = PutBackend | PutService | DeleteService | DeleteBackend


# --- maps ----------------------------------------------------------------------


@runtime_checkable
class BatchMapping(Protocol):
    """A map that can write or delete many entries in one call (BPF batch ops)."""

    def update_many(self, items: Sequence[tuple[Any, Any]]) -> None: ...

    def delete_many(self, keys: Sequence[Any]) -> None: ...


@runtime_checkable
class Snapshottable(Protocol):
    """A map that can read all its entries at once (BPF batch lookup)."""

    def snapshot(self) -> dict[Any, Any]: ...


def _snapshot(source: MutableMapping[K, V]) -> dict[K, V]:
    if isinstance(source, Snapshottable):
        snap: dict[K, V] = source.snapshot()
        return snap
    return dict(source)


@dataclass(frozen=True)
class Capacity:
    """How many entries each map holds (its max_entries); None: no bound (a dict)."""

    services: int | None = None
    backends: int | None = None
    services6: int | None = None
    backends6: int | None = None
    services_setting: str = "MapLimits.services"
    """What to raise when cm_svc4 or cm_svc6 is too small; named in the error."""
    backends_setting: str = "MapLimits.backends"


@dataclass
class Maps:
    """The two maps the agent writes. Dicts in tests, pinned BPF maps for real."""

    services: MutableMapping[SlotKey, ServiceEntry]
    backends: MutableMapping[int, BackendEntry]
    capacity: Capacity = Capacity()

    def read(self) -> MapState:
        return MapState(services=_snapshot(self.services), backends=_snapshot(self.backends))


# --- desired state ---------------------------------------------------------------


def preferred_backends(
    affinity: Affinity, backends: Iterable[Backend], local_cluster_id: int
) -> set[Backend]:
    """The backends a node of cluster ``local_cluster_id`` should prefer."""
    if affinity is Affinity.LOCAL:
        return {b for b in backends if b.cluster_id == local_cluster_id}
    if affinity is Affinity.REMOTE:
        return {b for b in backends if b.cluster_id != local_cluster_id}
    return set(backends)


def _sort_key(backend: Backend) -> tuple[int, int, int]:
    return backend.key


def slot_order(spec: ServiceSpec, local_cluster_id: int) -> tuple[list[Backend], int]:
    """Backends in slot order (preferred first) and the preferred count.

    Sorting inside each group makes the layout a function of the set alone, so
    the same desired state always produces the same map contents and an
    unchanged state diffs to nothing, even in a fresh process.
    """
    preferred = preferred_backends(spec.affinity, spec.backends, local_cluster_id)
    rest = spec.backends - preferred
    ordered = sorted(preferred, key=_sort_key) + sorted(rest, key=_sort_key)
    if len(ordered) > MAX_SLOTS:
        raise ValueError(f"service {spec.frontend} has {len(ordered)} backends; the map holds {MAX_SLOTS}")
    return ordered, len(preferred)


def _free_ids(taken: Iterable[int]) -> Iterator[int]:
    """Backend ids not in ``taken``, lowest first."""
    used = set(taken)
    candidate = 0
    while candidate < MAX_BACKEND_ID:
        candidate += 1
        if candidate not in used:
            yield candidate
    raise ValueError("backend ids exhausted")


def desired_state(
    services: Iterable[ServiceSpec],
    local_cluster_id: int,
    current_backends: Mapping[int, BackendEntry] | None = None,
) -> MapState:
    """Map contents for ``services`` as seen from a node of ``local_cluster_id``.

    ``current_backends`` is the backend map as it is now: backends found there
    keep their ids; new ones get the lowest ids not present in it.
    """
    current_backends = current_backends or {}
    specs: dict[Frontend, ServiceSpec] = {}
    for spec in services:
        if spec.frontend in specs:
            raise ValueError(f"frontend {spec.frontend} is listed twice")
        specs[spec.frontend] = spec
    ordered_specs = sorted(specs.values(), key=lambda s: s.frontend.key)

    # Where the map holds one backend twice (an interrupted run), the lowest id wins.
    known: dict[tuple[int, int, int], int] = {}
    for bid, entry in sorted(current_backends.items(), reverse=True):
        known[entry.key] = bid
    free = _free_ids(current_backends)

    state = MapState()
    services_out, backends_out = state.services, state.backends
    ids: dict[tuple[int, int, int], int] = {}

    def add_backend(backend: Backend, bid: int) -> None:
        ids[backend.key] = bid
        flags = BE_F_LOCAL if backend.cluster_id == local_cluster_id else 0
        backends_out[bid] = BackendEntry(backend.ip, backend.port, backend.cluster_id, flags)

    # Reused ids first: whether a backend keeps its id must not depend on
    # the order services arrive in.
    for spec in ordered_specs:
        for backend in spec.backends:
            if backend.key in known and backend.key not in ids:
                add_backend(backend, known[backend.key])
    # New ids in (frontend, slot) order, so the same input gives the same ids.
    # This loop runs once per slot (a million times at 100,000 services):
    # kept flat on purpose.
    for spec in ordered_specs:
        frontend = spec.frontend
        ordered, preferred = slot_order(spec, local_cluster_id)
        services_out[SlotKey(frontend)] = ServiceEntry(0, len(ordered), preferred, spec.affinity.flags)
        for slot, backend in enumerate(ordered, start=1):
            known_id = ids.get(backend.key)
            if known_id is None:
                known_id = next(free)
                add_backend(backend, known_id)
            services_out[SlotKey(frontend, slot)] = ServiceEntry(known_id)
    return state


def specs_from_state(state: MapState) -> list[ServiceSpec]:
    """What the maps hold, as the specs that would program them: the inverse of
    :func:`desired_state`. A restarted agent reads it to keep serving what the previous
    one wrote while its remotes sync. Slots that are missing or name no backend are
    left out (they cannot be reached either)."""
    specs: list[ServiceSpec] = []
    for key, master in sorted(state.services.items(), key=_by_slot_key):
        if not key.is_master:
            continue
        backends: set[Backend] = set()
        for slot in range(1, master.count + 1):
            entry = state.services.get(SlotKey(key.frontend, slot))
            if entry is not None and entry.backend_id in state.backends:
                backends.add(state.backends[entry.backend_id].backend)
        specs.append(ServiceSpec(key.frontend, frozenset(backends), Affinity.from_flags(master.flags)))
    return specs


# --- consistency ---------------------------------------------------------------------


def broken(state: MapState) -> list[str]:
    """What a connect() could trip over in ``state``; empty when none.

    Every master's slots 1..count must exist and name existing backends.
    :func:`diff` keeps this list empty after every single write it orders.
    """
    found: list[str] = []
    for key, master in sorted(state.services.items(), key=_by_slot_key):
        if not key.is_master:
            continue
        if master.preferred > master.count:
            found.append(f"{key.frontend}: preferred {master.preferred} > count {master.count}")
        for slot in range(1, master.count + 1):
            entry = state.services.get(SlotKey(key.frontend, slot))
            if entry is None:
                found.append(f"{key.frontend} slot {slot}: missing (count is {master.count})")
            elif entry.backend_id not in state.backends:
                found.append(f"{key.frontend} slot {slot}: backend {entry.backend_id} does not exist")
    return found


def leftovers(state: MapState) -> list[str]:
    """Entries no connect() can reach (slots beyond a count or without a
    master, unreferenced backends): harmless, and gone after a reconcile."""
    found: list[str] = []
    counts = {key.frontend: entry.count for key, entry in state.services.items() if key.is_master}
    referenced: set[int] = set()
    for key, entry in sorted(state.services.items(), key=_by_slot_key):
        if key.is_master:
            continue
        count = counts.get(key.frontend)
        if count is None:
            found.append(f"{key.frontend} slot {key.slot}: no master entry")
        elif key.slot > count:
            found.append(f"{key.frontend} slot {key.slot}: beyond count {count}")
        else:
            referenced.add(entry.backend_id)
    found += [f"backend {bid}: no slot uses it" for bid in sorted(state.backends) if bid not in referenced]
    return found


# --- diff and apply ------------------------------------------------------------------


def _by_slot_key(item: tuple[SlotKey, ServiceEntry]) -> tuple[tuple[int, int, int], int]:
    return item[0].order


def _order(key: SlotKey) -> tuple[tuple[int, int, int], int]:
    return key.order


def diff(current: MapState, desired: MapState) -> list[Op]:
    """Ordered writes that turn ``current`` into ``desired`` (see the module doc)."""
    ops: list[Op] = []
    current_backends, current_services = current.backends, current.services
    ops += [
        PutBackend(bid, entry)
        for bid, entry in sorted(desired.backends.items())
        if current_backends.get(bid) != entry
    ]
    changed = sorted(
        (key for key, entry in desired.services.items() if current_services.get(key) != entry), key=_order
    )
    ops += [PutService(key, desired.services[key]) for key in changed if not key.is_master]
    gone = sorted((key for key in current_services if key not in desired.services), key=_order)
    masters: list[PutService | DeleteService] = [
        PutService(key, desired.services[key]) for key in changed if key.is_master
    ]
    masters += [DeleteService(key) for key in gone if key.is_master]
    masters.sort(key=lambda op: op.key.order)
    ops += masters
    ops += [DeleteService(key) for key in gone if not key.is_master]
    ops += [DeleteBackend(bid) for bid in sorted(current_backends) if bid not in desired.backends]
    return ops


def phase(op: Op) -> int:
    """The step of the module doc (1..5) that ``op`` belongs to."""
    if isinstance(op, PutBackend):
        return 1
    if isinstance(op, PutService):
        return 3 if op.key.is_master else 2
    if isinstance(op, DeleteService):
        return 3 if op.key.is_master else 4
    return 5


def _runs(ops: Sequence[Op]) -> Iterator[list[Op]]:
    """Consecutive ops of one kind and one step: each run can be one batch call.

    Steps are never merged, so the ordering rule does not depend on the kernel
    processing a batch in array order.
    """
    for _, run in itertools.groupby(ops, key=lambda op: (phase(op), type(op))):
        yield list(run)


def _put(target: MutableMapping[K, V], items: list[tuple[K, V]]) -> None:
    if isinstance(target, BatchMapping):
        target.update_many(items)
    else:
        for key, value in items:
            target[key] = value


def _delete(target: MutableMapping[K, V], keys: list[K]) -> None:
    if isinstance(target, BatchMapping):
        target.delete_many(keys)
    else:
        for key in keys:
            # A missing key is already in the state we want (idempotent apply).
            target.pop(key, None)


def apply(ops: Sequence[Op], maps: Maps) -> None:
    """Perform ``ops`` in order; runs of one kind go out as batches."""
    for run in _runs(ops):
        first = run[0]
        if isinstance(first, PutBackend):
            _put(maps.backends, [(op.backend_id, op.entry) for op in run if isinstance(op, PutBackend)])
        elif isinstance(first, PutService):
            _put(maps.services, [(op.key, op.entry) for op in run if isinstance(op, PutService)])
        elif isinstance(first, DeleteService):
            _delete(maps.services, [op.key for op in run if isinstance(op, DeleteService)])
        else:
            _delete(maps.backends, [op.backend_id for op in run if isinstance(op, DeleteBackend)])


def _without_gone(current: MapState, desired: MapState) -> MapState:
    """``current`` minus the services ``desired`` drops and the backends only they used.

    Every surviving service keeps all its entries, so the result is as whole
    as ``current`` (:func:`broken` finds nothing new).
    """
    keep = {key.frontend for key in desired.services if key.is_master}
    services = {key: entry for key, entry in current.services.items() if key.frontend in keep}
    used = {entry.backend_id for key, entry in services.items() if not key.is_master}
    backends = {bid: e for bid, e in current.backends.items() if bid in used or bid in desired.backends}
    return MapState(services, backends)


# Needs per map: (cm_svc4, cm_svc6, cm_backend4, cm_backend6) entries.
Needs: TypeAlias = tuple[int, int, int, int]


def _needs(state: MapState) -> Needs:
    svc6 = sum(1 for key in state.services if key.frontend.v6)
    be6 = sum(1 for entry in state.backends.values() if entry.ip.version == 6)
    return len(state.services) - svc6, svc6, len(state.backends) - be6, be6


def _peak(before: MapState, after: MapState) -> Needs:
    """Entries of each map at its fullest while :func:`diff` turns ``before`` into ``after``."""
    svc4, svc6, be4, be6 = _needs(after)
    for key in before.services:
        if key not in after.services:
            if key.frontend.v6:
                svc6 += 1
            else:
                svc4 += 1
    for bid, entry in before.backends.items():
        if bid not in after.backends:
            if entry.ip.version == 6:
                be6 += 1
            else:
                be4 += 1
    return svc4, svc6, be4, be6


def _overflow(capacity: Capacity, need: Needs, during_update: bool) -> CapacityError | None:
    # IPv6 maps are made with the same sizes as their IPv4 twins.
    limits = (
        (SVC4_MAP, capacity.services, capacity.services_setting),
        (SVC6_MAP, capacity.services6, capacity.services_setting),
        (BACKEND4_MAP, capacity.backends, capacity.backends_setting),
        (BACKEND6_MAP, capacity.backends6, capacity.backends_setting),
    )
    for (name, size, setting), needed in zip(limits, need, strict=True):
        if size is not None and needed > size:
            return CapacityError(name, needed, size, setting, during_update=during_update)
    return None


_NO_NEEDS: Needs = (0, 0, 0, 0)


def _plus(a: Needs, b: Needs) -> Needs:
    return a[0] + b[0], a[1] + b[1], a[2] + b[2], a[3] + b[3]


def ordered_ops(current: MapState, desired: MapState, capacity: Capacity = Capacity()) -> list[Op]:
    """:func:`diff`, with the removals first when the maps could not hold old and
    new together; raises :class:`CapacityError` (before any write) when even
    that does not fit. See the module doc."""
    return _ordered_ops(current, desired, capacity, _NO_NEEDS)


def _ordered_ops(current: MapState, desired: MapState, capacity: Capacity, rest: Needs) -> list[Op]:
    """:func:`ordered_ops` of a part of the maps; ``rest`` counts the entries of
    the other part, which this change leaves alone but which fill the maps too."""
    refused = _overflow(capacity, _plus(rest, _needs(desired)), False)
    if refused is not None:
        raise refused
    if _overflow(capacity, _plus(rest, _peak(current, desired)), True) is None:
        return diff(current, desired)
    middle = _without_gone(current, desired)
    refused = _overflow(capacity, _plus(rest, _peak(middle, desired)), True)
    if refused is not None:
        raise refused
    return diff(current, middle) + diff(middle, desired)


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """No cyclic garbage collection inside the block.

    Planning 100,000 services makes millions of small objects, none of them
    in a cycle (reference counting frees them all); the cyclic collector
    would walk the growing heap again and again, for seconds.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def dry_run(maps: Maps, services: Iterable[ServiceSpec], local_cluster_id: int) -> list[Op]:
    """The writes :func:`sync_maps` would do now, without doing them.

    Raises :class:`CapacityError` when the maps cannot hold ``services``.
    """
    with paused_gc():
        current = maps.read()
        desired = desired_state(services, local_cluster_id, current.backends)
        return ordered_ops(current, desired, maps.capacity)


def sync_maps(maps: Maps, services: Iterable[ServiceSpec], local_cluster_id: int) -> list[Op]:
    """Make ``maps`` hold exactly ``services``; returns what was written.

    Idempotent: a second call with the same services writes nothing. When the
    maps are too small, raises :class:`CapacityError` and writes nothing.
    """
    with paused_gc():
        current = maps.read()
        desired = desired_state(services, local_cluster_id, current.backends)
        ops = ordered_ops(current, desired, maps.capacity)
        apply(ops, maps)
    return ops
