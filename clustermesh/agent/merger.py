"""The agent's desired state, kept per Service and merged again only where something moved.

A change to one EndpointSlice or one remote record touches one Service: `ServiceMerger` merges
that Service again (`merge_service`, pure) and leaves the other thousands as they were, so
the cost of an event follows the event, not the size of the cluster. Whatever changes the
inputs of every Service at once (the set of usable remotes, this cluster's pod CIDRs) marks
them all. Pure: the agent supplies the inputs as functions over its own state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from clustermesh.agent.merge import LocalService, merge_service
from clustermesh.datapath.model import Frontend, ServiceSpec
from clustermesh.schema import ClusterService

Ref = tuple[str, str]  # (namespace, name)


@dataclass
class MergeOutcome:
    changed: bool  # whether any Service's specs differ from the last outcome
    merged: int  # Services merged this time
    refs: frozenset[Ref] = frozenset()  # the Services merged this time
    problems: list[str] | None = None  # every current problem; None when they did not change
    frontends: frozenset[Frontend] = frozenset()  # frontends whose spec is new, changed or gone


class ServiceMerger:
    """Each Service's specs, and the datapath's desired state by frontend, kept up to date.

    A frontend belongs to one Service. Two Services claiming the same one (a ClusterIP handed
    out again while the old Service's deletion is still on its way) is a problem, not an error
    that stops every other Service: the first by namespace and name serves it until it lets go.
    """

    def __init__(self, local_cluster_id: int) -> None:
        self.local_cluster_id = local_cluster_id
        self._specs: dict[Ref, dict[Frontend, ServiceSpec]] = {}  # what each Service's merge gave
        self._claims: dict[Frontend, set[Ref]] = {}
        self._served: dict[Frontend, ServiceSpec] = {}  # the desired state: one spec per frontend
        self._problems: dict[Ref, tuple[str, ...]] = {}
        self._contested: dict[Frontend, str] = {}
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
        problems_moved = False
        moved: set[Frontend] = set()  # frontends some Service's specs changed at
        for ref in refs:
            local = local_of(ref)
            before = self._specs.get(ref, {})
            if local is None:  # not (or no longer) a global Service here
                after: dict[Frontend, ServiceSpec] = {}
                problems: tuple[str, ...] = ()
            else:
                result = merge_service(self.local_cluster_id, local, records_of(ref), exclude)
                after = {spec.frontend: spec for spec in result.specs}
                problems = tuple(result.problems)
            if after != before:
                for frontend in before.keys() - after.keys():
                    self._claims[frontend].discard(ref)
                for frontend, spec in after.items():
                    if before.get(frontend) != spec:
                        self._claims.setdefault(frontend, set()).add(ref)
                        moved.add(frontend)
                moved |= before.keys() - after.keys()
                if after:
                    self._specs[ref] = after
                else:
                    self._specs.pop(ref, None)
            if self._problems.get(ref, ()) != problems:
                problems_moved = True
            if problems:
                self._problems[ref] = problems
            else:
                self._problems.pop(ref, None)
        frontends = {f for f in moved if self._serve(f)}
        problems_moved |= self._contest(moved)
        if frontends:
            self._listed = None
        # Listing every Service's specs and problems costs as much as the cluster is big: only
        # when something moved.
        return MergeOutcome(bool(frontends), len(refs), frozenset(refs),
                            self.problems() if problems_moved else None, frozenset(frontends))

    def _serve(self, frontend: Frontend) -> bool:
        """Serve the spec of the frontend's owner; whether the served spec changed."""
        claims = self._claims.get(frontend)
        if not claims:
            self._claims.pop(frontend, None)
            return self._served.pop(frontend, None) is not None
        spec = self._specs[min(claims)][frontend]
        if self._served.get(frontend) == spec:
            return False
        self._served[frontend] = spec
        return True

    def _contest(self, frontends: Iterable[Frontend]) -> bool:
        """Note (or forget) the frontends more than one Service claims; whether that moved."""
        moved = False
        for frontend in frontends:
            claims = sorted(self._claims.get(frontend, ()))
            if len(claims) > 1:
                owner = "/".join(claims[0])
                others = ", ".join("/".join(ref) for ref in claims[1:])
                why = (f"frontend {frontend} is claimed by {owner} and by {others}: {owner} serves it "
                       "until it lets go")
                moved |= self._contested.get(frontend) != why
                self._contested[frontend] = why
            else:
                moved |= self._contested.pop(frontend, None) is not None
        return moved

    def specs(self) -> list[ServiceSpec]:
        """Every served spec, in no particular order (the datapath orders what it writes;
        sorting 10,000 Services on every change would cost more than the change). Listed again
        only after a change; callers must not modify the list."""
        if self._listed is None:
            self._listed = list(self._served.values())
        return self._listed

    @property
    def by_frontend(self) -> Mapping[Frontend, ServiceSpec]:
        """The served specs by frontend, kept up to date in place: a change to one Service costs
        what that Service costs (with :attr:`MergeOutcome.frontends` as the datapath's hint)."""
        return self._served

    def problems(self) -> list[str]:
        listed = [p for ref in sorted(self._problems) for p in self._problems[ref]]
        return listed + [self._contested[f] for f in sorted(self._contested, key=lambda f: f.key)]
