"""MCS-API (KEP-1645) over the mesh, as pure functions of plain data.

A ``ServiceExport`` beside a Service makes one :class:`~clustermesh.schema.ServiceExportRecord`
(``export_record``). Every cluster gathers the records of every cluster of the set, one group per
namespace/name, and ``merge_exports`` turns a group into the ServiceImport's spec: the union of the
ports, the type and session affinity of the oldest export (creation time, then cluster name), and a
conflict for each export that disagrees with it. ``desired_objects`` makes the Kubernetes objects of
one cluster out of that: the ServiceImport, its derived Service (``derived-<hash>``: no selector,
global, its ClusterIP the ClusterSetIP) and, where the cluster exports too, EndpointSlices of the
derived Service copied from the exported Service's own. From there the derived Service is a global
Service like any other: the operator exports its endpoints, the agents merge every cluster's and
balance the ClusterSetIP in the socket-LB.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from clustermesh.schema import McsPort, SchemaError, ServiceExportRecord

GROUP = "multicluster.x-k8s.io"
VERSION = "v1alpha1"
"""The version this controller writes and reads; the CRDs serve v1alpha1 and v1beta1 (same schema)."""
API_VERSION = f"{GROUP}/{VERSION}"
LABEL_SERVICE_NAME = "multicluster.kubernetes.io/service-name"
LABEL_SOURCE_CLUSTER = "multicluster.kubernetes.io/source-cluster"
DERIVED_SERVICE_ANNOTATION = "multicluster.kubernetes.io/derived-service"
LABEL_MANAGED_BY = "endpointslice.kubernetes.io/managed-by"
MANAGED_BY = "mcs.clustermesh.io"
"""Our EndpointSlices of derived Services: Kubernetes' controllers leave slices with another manager alone."""
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
GLOBAL_ANNOTATION = "service.cilium.io/global"
SHARED_ANNOTATION = "service.cilium.io/shared"

Body = Mapping[str, Any]


def derived_name(namespace: str, name: str) -> str:
    """The derived Service's name, the same in every cluster (and in Cilium and mcs-api's controller):
    ``derived-`` and the first 10 characters of the lowercase unpadded base32hex of sha256("ns/name")."""
    digest = hashlib.sha256(f"{namespace}/{name}".encode()).digest()
    return "derived-" + base64.b32hexencode(digest).decode().rstrip("=").lower()[:10]


def clusterset_hostname(namespace: str, name: str) -> str:
    return f"{name}.{namespace}.svc.clusterset.local"


# ---------------------------------------------------------------- one cluster's export


@dataclass(frozen=True)
class Condition:
    type: str
    status: bool
    reason: str
    message: str

    def to_json(self, since: str) -> dict[str, Any]:
        return {"type": self.type, "status": "True" if self.status else "False", "reason": self.reason,
                "message": self.message, "lastTransitionTime": since}


@dataclass(frozen=True)
class ExportResult:
    record: ServiceExportRecord | None
    valid: Condition


def export_record(cluster: str, export: Body, service: Body | None) -> ExportResult:
    """The record a ServiceExport makes, with its ``Valid`` condition. ``service`` is the Service of
    the same namespace and name (None when there is none)."""
    meta = export.get("metadata") or {}
    namespace, name = str(meta.get("namespace") or ""), str(meta.get("name") or "")
    if service is None:
        return ExportResult(None, Condition("Valid", False, "NoService",
                                            f"Service {namespace}/{name} not found: create it to export it"))
    spec = service.get("spec") or {}
    if spec.get("type") == "ExternalName":
        return ExportResult(None, Condition("Valid", False, "InvalidServiceType",
                                            "a Service of type ExternalName cannot be exported"))
    ports = tuple(
        McsPort(port=int(p.get("port") or 0), protocol=str(p.get("protocol") or "TCP"), name=str(p.get("name") or ""),
                app_protocol=p.get("appProtocol"))
        for p in spec.get("ports") or []
    )
    timeout = (((spec.get("sessionAffinityConfig") or {}).get("clientIP") or {}).get("timeoutSeconds"))
    export_spec = export.get("spec") or {}
    try:
        record = ServiceExportRecord(
            cluster=cluster, namespace=namespace, name=name,
            export_created=str(meta.get("creationTimestamp") or ""),
            ports=ports,
            type="Headless" if spec.get("clusterIP") == "None" else "ClusterSetIP",
            session_affinity=str(spec.get("sessionAffinity") or "None"),
            session_affinity_timeout=timeout if spec.get("sessionAffinity") == "ClientIP" else None,
            ip_families=tuple(spec.get("ipFamilies") or ()),
            labels=dict(export_spec.get("exportedLabels") or {}),
            annotations=dict(export_spec.get("exportedAnnotations") or {}),
            internal_traffic_policy=spec.get("internalTrafficPolicy"),
            traffic_distribution=spec.get("trafficDistribution"),
        ).validate()
        for port in ports:
            McsPort.from_json("port", port.to_json())
    except (SchemaError, TypeError, ValueError) as exc:
        return ExportResult(None, Condition("Valid", False, "InvalidService", f"cannot export it: {exc}"))
    return ExportResult(record, Condition("Valid", True, "Valid", "the Service can be exported"))


# ---------------------------------------------------------------- every cluster's exports -> one import


@dataclass(frozen=True)
class ImportSpec:
    """What every exporting cluster's records of one namespace/name make together."""

    namespace: str
    name: str
    winner: str
    """The cluster of the oldest export: its type, affinity and port definitions win."""
    type: str
    ports: tuple[McsPort, ...]
    session_affinity: str
    session_affinity_timeout: int | None
    ip_families: tuple[str, ...]
    clusters: tuple[str, ...]
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    conflicts: Mapping[str, tuple[Condition, ...]] = field(default_factory=dict)
    """cluster -> its Conflict conditions (one per field that disagrees with the winner)."""


def _order(record: ServiceExportRecord) -> tuple[dt.datetime, str]:
    return record.created, record.cluster


def merge_exports(records: Iterable[ServiceExportRecord]) -> ImportSpec:
    """The import of one namespace/name (``records``: one per exporting cluster, at least one).

    As KEP-1645 says: the oldest export wins each conflicting property; ports are the union over the
    exports, by name (a port whose name another export defines differently is that export's conflict)."""
    ordered = sorted(records, key=_order)
    if not ordered:
        raise ValueError("merge_exports needs at least one export")
    oldest = ordered[0]
    won = f"the oldest export, in cluster {oldest.cluster} (created {oldest.export_created}), wins"
    ports: dict[tuple[str, str], McsPort] = {}
    by_name: dict[str, McsPort] = {}
    conflicts: dict[str, list[Condition]] = {}
    for record in ordered:
        found: list[Condition] = []
        if record.type != oldest.type:
            found.append(Condition("Conflict", True, "TypeConflict",
                                   f"type {record.type} conflicts with {oldest.type}: {won}"))
        if record.session_affinity != oldest.session_affinity:
            found.append(Condition("Conflict", True, "SessionAffinityConflict",
                                   f"sessionAffinity {record.session_affinity} conflicts with "
                                   f"{oldest.session_affinity}: {won}"))
        elif record.session_affinity_timeout != oldest.session_affinity_timeout:
            found.append(Condition("Conflict", True, "SessionAffinityConfigConflict",
                                   f"sessionAffinityConfig timeout {record.session_affinity_timeout} conflicts "
                                   f"with {oldest.session_affinity_timeout}: {won}"))
        bad_ports = []
        for port in record.ports:
            earlier = by_name.get(port.name)
            if earlier is not None and earlier != port:
                bad_ports.append(port.name or str(port.port))
                continue
            by_name.setdefault(port.name, port)
            ports.setdefault((port.name, port.protocol), port)
        if bad_ports:
            found.append(Condition("Conflict", True, "PortConflict",
                                   f"port {', '.join(bad_ports)} is defined differently by an older export; "
                                   f"{won}"))
        if found:
            conflicts[record.cluster] = found
    return ImportSpec(
        namespace=oldest.namespace, name=oldest.name, winner=oldest.cluster, type=oldest.type,
        ports=tuple(sorted(ports.values(), key=lambda p: (p.name, p.port, p.protocol))),
        session_affinity=oldest.session_affinity, session_affinity_timeout=oldest.session_affinity_timeout,
        ip_families=oldest.ip_families, clusters=tuple(sorted(r.cluster for r in ordered)),
        labels=oldest.labels, annotations=oldest.annotations,
        conflicts={k: tuple(v) for k, v in conflicts.items()},
    )


def group_exports(records: Iterable[ServiceExportRecord]) -> dict[tuple[str, str], ImportSpec]:
    """Every cluster's records -> one ImportSpec per (namespace, name)."""
    groups: dict[tuple[str, str], list[ServiceExportRecord]] = {}
    for record in records:
        groups.setdefault((record.namespace, record.name), []).append(record)
    return {ref: merge_exports(group) for ref, group in groups.items()}


def export_conditions(cluster: str, valid: Condition, spec: ImportSpec | None) -> list[Condition]:
    """A ServiceExport's conditions: Valid, Ready (its record is offered to the set), Conflict."""
    out = [valid]
    if not valid.status:
        out.append(Condition("Ready", False, "Invalid", "not exported: " + valid.message))
        out.append(Condition("Conflict", False, "NoConflicts", "not exported"))
        return out
    out.append(Condition("Ready", True, "Exported", "exported to every cluster of the set"))
    found = (spec.conflicts.get(cluster, ()) if spec is not None else ())
    if found:
        out.append(Condition("Conflict", True, found[0].reason, "; ".join(c.message for c in found)))
    else:
        out.append(Condition("Conflict", False, "NoConflicts", "no conflict with the other exports"))
    return out


# ---------------------------------------------------------------- one cluster's objects


def _port_json(port: McsPort) -> dict[str, Any]:
    out = port.to_json()
    out.setdefault("protocol", "TCP")
    return out


def service_import_spec(spec: ImportSpec, cluster_ip: str | None) -> dict[str, Any]:
    """The ServiceImport's spec: its ClusterSetIP is the derived Service's ClusterIP in this cluster."""
    out: dict[str, Any] = {
        "type": spec.type,
        "ports": [_port_json(p) for p in spec.ports],
        "sessionAffinity": spec.session_affinity,
        "ips": [cluster_ip] if spec.type == "ClusterSetIP" and cluster_ip and cluster_ip != "None" else [],
    }
    if spec.ip_families:
        out["ipFamilies"] = list(spec.ip_families)
    if spec.session_affinity == "ClientIP" and spec.session_affinity_timeout is not None:
        out["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": spec.session_affinity_timeout}}
    return out


def service_import(spec: ImportSpec, cluster_ip: str | None) -> dict[str, Any]:
    derived = derived_name(spec.namespace, spec.name)
    return {
        "apiVersion": API_VERSION, "kind": "ServiceImport",
        "metadata": {"name": spec.name, "namespace": spec.namespace,
                     "labels": dict(spec.labels),
                     "annotations": {**spec.annotations, DERIVED_SERVICE_ANNOTATION: derived}},
        "spec": service_import_spec(spec, cluster_ip),
        "status": {"clusters": [{"cluster": c} for c in spec.clusters]},
    }


def derived_service(spec: ImportSpec, cluster: str, exported_here: bool, owner: Body | None) -> dict[str, Any]:
    """The derived Service of ``spec`` in ``cluster``: global; shared when this cluster exports the
    Service (its endpoints are part of the set), so the other clusters only take what is exported."""
    annotations = {**spec.annotations, GLOBAL_ANNOTATION: "true",
                   SHARED_ANNOTATION: "true" if exported_here else "false"}
    labels = {**spec.labels, LABEL_SERVICE_NAME: spec.name, LABEL_SOURCE_CLUSTER: cluster}
    svc_spec: dict[str, Any] = {
        "type": "ClusterIP",
        "ports": [{k: v for k, v in _port_json(p).items()} for p in spec.ports],
        "sessionAffinity": spec.session_affinity,
    }
    if spec.type == "Headless":
        svc_spec["clusterIP"] = "None"
    if spec.session_affinity == "ClientIP" and spec.session_affinity_timeout is not None:
        svc_spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": spec.session_affinity_timeout}}
    meta: dict[str, Any] = {"name": derived_name(spec.namespace, spec.name), "namespace": spec.namespace,
                            "labels": labels, "annotations": annotations}
    if owner is not None:
        meta["ownerReferences"] = [_owner_reference(owner)]
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": svc_spec}


def _owner_reference(owner: Body) -> dict[str, Any]:
    meta = owner.get("metadata") or {}
    return {"apiVersion": owner.get("apiVersion", API_VERSION), "kind": owner.get("kind", "ServiceImport"),
            "name": meta.get("name"), "uid": meta.get("uid"), "controller": True, "blockOwnerDeletion": False}


def _short_hash(text: str) -> str:
    return base64.b32hexencode(hashlib.sha256(text.encode()).digest()).decode().rstrip("=").lower()[:8]


def mirrored_slices(cluster: str, namespace: str, name: str, slices: Sequence[Body], slice_api: str,
                    owner: Body | None) -> dict[str, dict[str, Any]]:
    """EndpointSlices of the derived Service carrying the endpoints of the exported Service's own
    slices (one per slice, named after it), labelled as KEP-1645 says; name -> body."""
    derived = derived_name(namespace, name)
    out: dict[str, dict[str, Any]] = {}
    for source in slices:
        source_name = str((source.get("metadata") or {}).get("name") or "")
        slice_name = f"{derived}-{_short_hash(source_name)}"
        meta: dict[str, Any] = {
            "name": slice_name, "namespace": namespace,
            "labels": {SERVICE_NAME_LABEL: derived, LABEL_MANAGED_BY: MANAGED_BY,
                       LABEL_SERVICE_NAME: name, LABEL_SOURCE_CLUSTER: cluster},
        }
        if owner is not None:
            meta["ownerReferences"] = [{**_owner_reference(owner), "controller": True}]
        out[slice_name] = {
            "apiVersion": slice_api, "kind": "EndpointSlice", "metadata": meta,
            "addressType": source.get("addressType") or "IPv4",
            "ports": [dict(p) for p in source.get("ports") or []],
            "endpoints": [dict(e) for e in source.get("endpoints") or []],
        }
    return out


def same_content(current: Body, desired: Body, fields: Iterable[str]) -> bool:
    """Whether ``current`` (as read back) already has ``desired``'s values for ``fields`` (top-level
    keys; for ``metadata``, only the labels, annotations and owners we set)."""
    for key in fields:
        if key == "metadata":
            have, want = current.get("metadata") or {}, desired.get("metadata") or {}
            for part in ("labels", "annotations"):
                if any((have.get(part) or {}).get(k) != v for k, v in (want.get(part) or {}).items()):
                    return False
            if "ownerReferences" in want and [o.get("uid") for o in have.get("ownerReferences") or []] != [
                    o.get("uid") for o in want["ownerReferences"]]:
                return False
        elif not _contains(current.get(key), desired.get(key)):
            return False
    return True


def _contains(have: Any, want: Any) -> bool:
    """``want``'s fields all in ``have`` (the API server adds defaults such as targetPort)."""
    if isinstance(want, Mapping):
        return isinstance(have, Mapping) and all(_contains(have.get(k), v) for k, v in want.items())
    if isinstance(want, list):
        return isinstance(have, list) and len(have) == len(want) and all(
            _contains(h, w) for h, w in zip(have, want, strict=True))
    return bool(have == want)
