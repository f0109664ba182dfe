"""Pure planning: desired services -> desired map contents -> ordered map writes.

Nothing here touches the kernel. The loader hands :func:`reconcile` two
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
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias, TypeVar, runtime_checkable

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


@dataclass(frozen=True)
class PutBackend:
    backend_id: int
    entry: BackendEntry

    def __str__(self) -> str:
        e = self.entry
        return f"put backend {self.backend_id} = {e.ip}:{e.port} cluster {e.cluster_id}"


@dataclass(frozen=True)
class PutService:
    key: SlotKey
    entry: ServiceEntry

    def __str__(self) -> str:
        if self.key.is_master:
            e = self.entry
            return f"put {self.key.frontend} master count={e.count} preferred={e.preferred} flags={e.flags}"
        return f"put {self.key.frontend} slot {self.key.slot} = backend {self.entry.backend_id}"


@dataclass(frozen=True)
class DeleteService:
    key: SlotKey

    def __str__(self) -> str:
        what = "master" if self.key.is_master else f"slot {self.key.slot}"
        return f"delete {self.key.frontend} {what}"


@dataclass(frozen=True)
class DeleteBackend:
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


@dataclass
class Maps:
    """The two maps the agent writes. Dicts in tests, pinned BPF maps for real."""

    services: MutableMapping[SlotKey, ServiceEntry]
    backends: MutableMapping[int, BackendEntry]

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


def _id_allocator(taken: Iterable[int]) -> Callable[[], int]:
    used = set(taken)
    counter = itertools.count(1)

    def allocate() -> int:
        for candidate in counter:
            if candidate > MAX_BACKEND_ID:
                break
            if candidate not in used:
                used.add(candidate)
                return candidate
        raise ValueError("backend ids exhausted")

    return allocate


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

    known: dict[tuple[int, int, int], int] = {}
    for bid, entry in sorted(current_backends.items()):
        known.setdefault(entry.key, bid)
    allocate = _id_allocator(current_backends)

    state = MapState()
    ids: dict[Backend, int] = {}

    def id_of(backend: Backend) -> int:
        if backend not in ids:
            ids[backend] = known[backend.key] if backend.key in known else allocate()
            flags = BE_F_LOCAL if backend.cluster_id == local_cluster_id else 0
            state.backends[ids[backend]] = BackendEntry(backend.ip, backend.port, backend.cluster_id, flags)
        return ids[backend]

    # Reused ids first, so allocation order (and so the ids) does not depend
    # on the order services arrive in.
    for spec in sorted(specs.values(), key=lambda s: s.frontend):
        for backend in sorted(spec.backends, key=_sort_key):
            if backend.key in known:
                id_of(backend)
    for spec in sorted(specs.values(), key=lambda s: s.frontend):
        ordered, preferred = slot_order(spec, local_cluster_id)
        state.services[SlotKey(spec.frontend)] = ServiceEntry.master(
            count=len(ordered), preferred=preferred, flags=spec.affinity.flags
        )
        for slot, backend in enumerate(ordered, start=1):
            state.services[SlotKey(spec.frontend, slot)] = ServiceEntry.slot(id_of(backend))
    return state


def specs_from_state(state: MapState) -> list[ServiceSpec]:
    """What the maps hold, as the specs that would program them: the inverse of
    :func:`desired_state`. A restarted agent reads it to keep serving what the previous
    one wrote while its remotes sync. Slots that are missing or name no backend are
    left out (they cannot be reached either)."""
    specs: list[ServiceSpec] = []
    for key, master in sorted(state.services.items()):
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
    for key, master in sorted(state.services.items()):
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
    for key, entry in sorted(state.services.items()):
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


def diff(current: MapState, desired: MapState) -> list[Op]:
    """Ordered writes that turn ``current`` into ``desired`` (see the module doc)."""
    ops: list[Op] = []
    ops += [
        PutBackend(bid, entry)
        for bid, entry in sorted(desired.backends.items())
        if current.backends.get(bid) != entry
    ]
    changed = sorted(
        (key for key, entry in desired.services.items() if current.services.get(key) != entry),
    )
    ops += [PutService(key, desired.services[key]) for key in changed if not key.is_master]
    gone = sorted(key for key in current.services if key not in desired.services)
    masters: list[PutService | DeleteService] = [
        PutService(key, desired.services[key]) for key in changed if key.is_master
    ]
    masters += [DeleteService(key) for key in gone if key.is_master]
    masters.sort(key=lambda op: op.key)
    ops += masters
    ops += [DeleteService(key) for key in gone if not key.is_master]
    ops += [DeleteBackend(bid) for bid in sorted(current.backends) if bid not in desired.backends]
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


def plan(maps: Maps, services: Iterable[ServiceSpec], local_cluster_id: int) -> list[Op]:
    """The writes :func:`reconcile` would do now, without doing them."""
    current = maps.read()
    return diff(current, desired_state(services, local_cluster_id, current.backends))


def reconcile(maps: Maps, services: Iterable[ServiceSpec], local_cluster_id: int) -> list[Op]:
    """Make ``maps`` hold exactly ``services``; returns what was written.

    Idempotent: a second call with the same services writes nothing.
    """
    ops = plan(maps, services, local_cluster_id)
    apply(ops, maps)
    return ops
