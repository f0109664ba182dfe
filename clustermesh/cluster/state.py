"""The operator's view of the cluster: slim copies of Services, EndpointSlices and
Nodes, fed by watch events and by full listings. Pure data, no I/O.

Why not kopf's indices: kopf gates every handler on every indexed object, and
its gate wakes all waiting workers whenever one object is indexed, which is
quadratic in the number of objects (seconds at 2,000, minutes at 20,000).
Here events apply in O(1), and a full listing (at start and periodically)
removes what a missed DELETED event left behind: an object absent from a
listing and older than the listing's resourceVersion is gone.

The copies are kept as compact JSON text (:class:`PackedObjects`): as Python
dicts a slim Service or EndpointSlice costs about 3 KB, which is 60 MB for a
cluster of 10,000 Services; as text, a tenth of that. Only the objects an event
touches are decoded again (microseconds each).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from clustermesh.cluster.export import SERVICE_NAME_LABEL

Kind = Literal["Service", "EndpointSlice", "Node"]
Body = Mapping[str, Any]
ObjKey = tuple[str, str]  # (namespace, name); namespace "" for Nodes


@dataclass(frozen=True)
class ServiceRef:
    namespace: str
    name: str


@dataclass(frozen=True)
class NodeRef:
    name: str


Ref = ServiceRef | NodeRef

K = TypeVar("K")


class PackedObjects(MutableMapping[K, dict[str, Any]]):
    """A dict of JSON objects stored as their compact text; each read decodes a fresh copy
    (so a caller cannot change what is stored by changing what it got)."""

    __slots__ = ("_text",)

    def __init__(self) -> None:
        self._text: dict[K, str] = {}

    def __getitem__(self, key: K) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self._text[key])
        return value

    def __setitem__(self, key: K, value: Mapping[str, Any]) -> None:
        self._text[key] = json.dumps(value, separators=(",", ":"))

    def __delitem__(self, key: K) -> None:
        del self._text[key]

    def __contains__(self, key: object) -> bool:
        return key in self._text

    def __iter__(self) -> Iterator[K]:
        return iter(self._text)

    def __len__(self) -> int:
        return len(self._text)

    def __repr__(self) -> str:
        return f"PackedObjects({len(self._text)} objects)"


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _meta(body: Body, *fields: str) -> dict[str, Any]:
    meta = body.get("metadata") or {}
    wanted = ("name", "namespace", "resourceVersion", *fields)
    return {f: _plain(meta.get(f)) for f in wanted if meta.get(f) is not None}


def slim_service(body: Body) -> dict[str, Any]:
    spec = body.get("spec") or {}
    return {
        "metadata": _meta(body, "annotations", "labels"),
        # The rest of the spec is what an MCS-API export copies (cluster/mcs.py).
        "spec": {k: _plain(spec.get(k)) for k in ("type", "clusterIP", "clusterIPs", "ports", "selector",
                                                  "sessionAffinity", "sessionAffinityConfig", "ipFamilies",
                                                  "internalTrafficPolicy", "trafficDistribution")
                 if spec.get(k) is not None},
    }


# What export reads of an endpoint: conditions, and the hostname and zone it
# copies into records (``topology`` is discovery/v1beta1's zone, Kubernetes 1.20).
_ENDPOINT_FIELDS = ("addresses", "conditions", "hostname", "zone", "hints", "deprecatedTopology", "topology")


def slim_slice(body: Body) -> dict[str, Any]:
    return {
        "metadata": _meta(body, "labels"),
        "addressType": body.get("addressType"),
        "ports": _plain(body.get("ports")),
        "endpoints": [
            {f: _plain(ep.get(f)) for f in _ENDPOINT_FIELDS if f == "addresses" or ep.get(f) is not None}
            for ep in body.get("endpoints") or []
        ],
    }


def slim_node(body: Body) -> dict[str, Any]:
    spec = body.get("spec") or {}
    status = body.get("status") or {}
    return {
        "metadata": _meta(body),
        "spec": {"podCIDR": spec.get("podCIDR"), "podCIDRs": _plain(spec.get("podCIDRs"))},
        "status": {"addresses": _plain(status.get("addresses"))},
    }


def _without_version(slim: Mapping[str, Any]) -> dict[str, Any]:
    return {**slim, "metadata": {k: v for k, v in (slim.get("metadata") or {}).items() if k != "resourceVersion"}}


def _key(body: Body) -> ObjKey:
    meta = body.get("metadata") or {}
    return (meta.get("namespace") or "", meta.get("name") or "")


def _rv(body: Body | None) -> int | None:
    if body is None:
        return None
    value = (body.get("metadata") or {}).get("resourceVersion")
    return int(value) if isinstance(value, str) and value.isdigit() else None


def _older(existing: Body | None, incoming: Body) -> bool:
    """True when ``incoming`` is no newer than what we hold: a listing that lags the
    events, or the same version seen twice (kopf's own listing after ours)."""
    old, new = _rv(existing), _rv(incoming)
    return old is not None and new is not None and new <= old


@dataclass
class ClusterState:
    services: PackedObjects[ObjKey] = field(default_factory=PackedObjects)
    slices: PackedObjects[ObjKey] = field(default_factory=PackedObjects)
    nodes: PackedObjects[str] = field(default_factory=PackedObjects)
    # (namespace, service) -> names of its slices; the label can move a slice.
    _by_service: dict[ObjKey, set[str]] = field(default_factory=dict)
    # (kind, key) -> resourceVersion of a deletion seen by event: a listing taken before
    # it must not bring the object back.
    _tombstones: dict[tuple[str, ObjKey], int] = field(default_factory=dict)

    # ------------------------------------------------------------ reads

    def service(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.services.get((namespace, name))

    def slices_of(self, namespace: str, service: str) -> list[dict[str, Any]]:
        names = self._by_service.get((namespace, service), ())
        return [self.slices[(namespace, n)] for n in sorted(names)]

    def node(self, name: str) -> dict[str, Any] | None:
        return self.nodes.get(name)

    def refs(self) -> list[Ref]:
        return [ServiceRef(*k) for k in self.services] + [NodeRef(n) for n in self.nodes]

    # ------------------------------------------------------------ writes

    def upsert(self, kind: Kind, body: Body) -> list[Ref]:
        """Apply an added/modified object; returns what needs exporting again."""
        key = _key(body)
        dead = self._tombstones.get((kind, key))
        if dead is not None:
            rv = _rv(body)
            if rv is not None and rv <= dead:
                return []  # a copy from before its deletion
            del self._tombstones[(kind, key)]
        if kind == "Service":
            if _older(self.services.get(key), body):
                return []
            self.services[key] = slim_service(body)
            return [ServiceRef(*key)]
        if kind == "Node":
            old = self.nodes.get(key[1])
            if _older(old, body):
                return []
            slim = slim_node(body)
            self.nodes[key[1]] = slim
            # A Node is updated every few seconds (its status, heartbeats) while what is kept of it
            # (pod CIDRs, addresses) rarely moves: only that is news. Each NodeRef makes an agent
            # merge every Service again (pod CIDRs are an input of all of them).
            if old is not None and _without_version(old) == _without_version(slim):
                return []
            return [NodeRef(key[1])]
        if _older(self.slices.get(key), body):
            return []
        refs = self._unlink_slice(key)
        slim = slim_slice(body)
        self.slices[key] = slim
        service = (slim["metadata"].get("labels") or {}).get(SERVICE_NAME_LABEL)
        if service:
            self._by_service.setdefault((key[0], service), set()).add(key[1])
            refs.append(ServiceRef(key[0], service))
        return _unique(refs)

    def delete(self, kind: Kind, body: Body) -> list[Ref]:
        key = _key(body)
        rv = _rv(body)
        if rv is not None:
            self._tombstones[(kind, key)] = rv
        if kind == "Service":
            return [ServiceRef(*key)] if self.services.pop(key, None) is not None else []
        if kind == "Node":
            return [NodeRef(key[1])] if self.nodes.pop(key[1], None) is not None else []
        refs = self._unlink_slice(key)
        self.slices.pop(key, None)
        return refs

    def _unlink_slice(self, key: ObjKey) -> list[Ref]:
        old = self.slices.get(key)
        if old is None:
            return []
        service = (old["metadata"].get("labels") or {}).get(SERVICE_NAME_LABEL)
        if not service:
            return []
        names = self._by_service.get((key[0], service))
        if names is not None:
            names.discard(key[1])
            if not names:
                del self._by_service[(key[0], service)]
        return [ServiceRef(key[0], service)]

    def apply_listing(self, kind: Kind, items: Iterable[Body], list_rv: str | None) -> list[Ref]:
        """A full listing: take what is newer, and drop what the listing proves deleted."""
        refs: list[Ref] = []
        present: set[ObjKey] = set()
        for body in items:
            present.add(_key(body))
            refs += self.upsert(kind, body)
        try:
            snapshot = int(list_rv) if list_rv is not None else None
        except ValueError:
            snapshot = None
        held: Mapping[ObjKey, dict[str, Any]]
        if kind == "Service":
            held = self.services
        elif kind == "EndpointSlice":
            held = self.slices
        else:
            held = {("", n): b for n, b in self.nodes.items()}  # a few hundred at most
        for key in [k for k in held if k not in present]:  # only the absent ones are decoded
            body = held[key]
            rv = _rv(body)
            # Newer than the snapshot: it arrived by an event after the list was taken.
            if snapshot is not None and rv is not None and rv > snapshot:
                continue
            refs += self.delete(kind, body)
        if snapshot is not None:  # the listing is newer than these deletions: forget them
            for tomb in [t for t, rv in self._tombstones.items() if t[0] == kind and rv <= snapshot]:
                del self._tombstones[tomb]
        return _unique(refs)


def _unique(refs: list[Ref]) -> list[Ref]:
    return list(dict.fromkeys(refs))
