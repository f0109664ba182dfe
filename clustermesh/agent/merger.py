"""The agent's desired state, kept per Service and merged again only where something moved.

A change to one EndpointSlice or one remote record touches one Service: `ServiceMerger` merges
that Service again (`merge_service`, pure) and leaves the other thousands as they were, so
the cost of an event follows the event, not the size of the cluster. Whatever changes the
inputs of every Service at once (the set of usable remotes, this cluster's pod CIDRs) marks
them all. Pure: the agent supplies the inputs as functions over its own state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from clustermesh.agent.merge import LocalService, merge_service
from clustermesh.datapath.model import ServiceSpec
from clustermesh.schema import ClusterService

Ref = tuple[str, str]  # (namespace, name)


@dataclass
class MergeOutcome:
    changed: bool  # whether any Service's specs differ from the last outcome
    merged: int  # Services merged this time
    refs: frozenset[Ref] = frozenset()  # the Services merged this time
    problems: list[str] | None = None  # every current problem; None when they did not change


class ServiceMerger:
    def __init__(self, local_cluster_id: int) -> None:
        self.local_cluster_id = local_cluster_id
        self._specs: dict[Ref, tuple[ServiceSpec, ...]] = {}
        self._problems: dict[Ref, tuple[str, ...]] = {}
        self._dirty: set[Ref] = set()
        self._everything = True
        self._listed: list[ServiceSpec] | None = None  # specs() until the next change

    def touch(self, ref: Ref) -> None:
        """This Service's local objects or remote records changed."""
        self._dirty.add(ref)

    def touch_all(self) -> None:
        """An input of every Service changed (remotes usable or not, local pod CIDRs)."""
        self._everything = True

    @property
    def pending(self) -> bool:
        return self._everything or bool(self._dirty)

    def update(
        self,
        local_refs: Callable[[], Iterable[Ref]],
        local_of: Callable[[Ref], LocalService | None],
        records_of: Callable[[Ref], list[ClusterService]],
        exclude_remote_cidrs: Iterable[str] = (),
    ) -> MergeOutcome:
        """Merge the touched Services (all of them after ``touch_all``)."""
        exclude = list(exclude_remote_cidrs)
        refs = set(local_refs()) | set(self._specs) if self._everything else self._dirty
        self._everything, self._dirty = False, set()
        changed = problems_moved = False
        for ref in refs:
            local = local_of(ref)
            if local is None:  # not (or no longer) a global Service here
                changed |= self._specs.pop(ref, None) is not None
                problems_moved |= self._problems.pop(ref, None) is not None
                continue
            result = merge_service(self.local_cluster_id, local, records_of(ref), exclude)
            specs = tuple(sorted(result.specs, key=lambda s: s.frontend))
            if self._specs.get(ref) != specs:
                self._specs[ref] = specs
                changed = True
            problems = tuple(result.problems)
            if self._problems.get(ref, ()) != problems:
                problems_moved = True
            if problems:
                self._problems[ref] = problems
            else:
                self._problems.pop(ref, None)
        if changed:
            self._listed = None
        # Listing every Service's specs and problems costs as much as the cluster is big: only
        # when something moved.
        return MergeOutcome(changed, len(refs), frozenset(refs), self.problems() if problems_moved else None)

    def specs(self) -> list[ServiceSpec]:
        """Every Service's specs, in no particular order (the datapath orders what it writes;
        sorting 10,000 Services on every change would cost more than the change). Listed again
        only after a change; callers must not modify the list."""
        if self._listed is None:
            self._listed = [spec for specs in self._specs.values() for spec in specs]
        return self._listed

    def problems(self) -> list[str]:
        return [p for ref in sorted(self._problems) for p in self._problems[ref]]
