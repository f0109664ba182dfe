"""The operator's MCS-API part: this cluster's ServiceExports into the store, and every cluster's
ServiceExports into this cluster's ServiceImports, derived Services and their EndpointSlices.

The decisions are the pure functions of ``cluster/mcs.py``. This object keeps the local
ServiceExports (from kopf's events, on the event loop), hands a snapshot of what the set exports
to a thread that makes the Kubernetes objects match it (only the replica that writes the
ClusterMesh status does), and never deletes an import while a remote's exports are not known yet
(a restarting operator, a remote still connecting): an unknown is not a withdrawal.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from clustermesh import metrics, schema
from clustermesh.cluster import mcs
from clustermesh.cluster.state import ClusterState
from clustermesh.kube import KubeClient, KubeConflict, KubeError, KubeNotFound
from clustermesh.schema import ServiceExportRecord
from clustermesh.store.membership import RemoteSet
from clustermesh.store.sync import SyncStore

log = logging.getLogger(__name__)

Body = Mapping[str, Any]
Ref = tuple[str, str]
MCS_PATH = f"/apis/{mcs.API_VERSION}"
EXPORTS_PATH = f"{MCS_PATH}/serviceexports"
IMPORTS_PATH = f"{MCS_PATH}/serviceimports"


def slim_export(body: Body) -> dict[str, Any]:
    meta = body.get("metadata") or {}
    return {
        "metadata": {k: meta.get(k) for k in ("name", "namespace", "uid", "creationTimestamp", "resourceVersion")},
        "spec": dict(body.get("spec") or {}),
        "conditions": list((body.get("status") or {}).get("conditions") or []),
    }


@dataclass
class Snapshot:
    """What the set exports, as one thread needs it (copied on the event loop)."""

    cluster: str
    specs: dict[Ref, mcs.ImportSpec]
    local: dict[Ref, mcs.ExportResult]
    exports: dict[Ref, dict[str, Any]]
    slices: dict[Ref, list[dict[str, Any]]]
    pending: frozenset[str] = field(default_factory=frozenset)
    """Remotes whose exports are not known yet: nothing they might export is deleted meanwhile."""

    def key(self) -> Any:
        return (sorted(self.specs.items(), key=lambda kv: kv[0]).__repr__(),
                sorted((k, v.record, v.valid) for k, v in self.local.items()).__repr__(),
                sorted((k, e["metadata"].get("resourceVersion")) for k, e in self.exports.items()).__repr__(),
                repr(sorted(self.slices.items())), self.pending)


class McsController:
    def __init__(self, kube: KubeClient, state: ClusterState, members: RemoteSet,
                 leading: Callable[[], bool], interval: float = 0.5, full_interval: float = 30.0) -> None:
        self.kube = kube
        self.state = state
        self.members = members
        self.leading = leading
        self.interval = interval
        self.full_interval = full_interval
        self.enabled = False
        self.cluster = ""
        self.writer: SyncStore | None = None
        self.exports: dict[Ref, dict[str, Any]] = {}  # event loop only
        self._records: dict[Ref, mcs.ExportResult] = {}
        self._applied: Any = None
        self._next_full = 0.0
        self._since: dict[tuple[str, str, str], str] = {}  # (ns, name, type) -> lastTransitionTime
        self._status: dict[Ref, list[dict[str, Any]]] = {}
        self._views: dict[str, str] = {}  # remote -> how its exports count now (event loop only)

    # ------------------------------------------------------------ this cluster's exports

    def detect(self) -> bool:
        """Whether the MCS-API CRDs are installed (blocking: call from a thread)."""
        try:
            self.enabled = self.kube.serves(mcs.API_VERSION, "serviceexports") and self.kube.serves(
                mcs.API_VERSION, "serviceimports")
        except KubeError as exc:
            log.warning("cannot tell whether the MCS-API CRDs are installed (%s); ServiceExports are off", exc)
            self.enabled = False
        if not self.enabled:
            log.info("MCS-API CRDs not installed (kubectl apply -f crds/ adds them, then restart the store "
                     "pods): ServiceExports are not read, and peers are told so")
        return self.enabled

    def list_exports(self) -> None:
        """The full listing (blocking), before the first export."""
        items = self.kube.list_path(EXPORTS_PATH)
        self.exports = {_ref(b): slim_export(b) for b in items}

    def start(self, cluster: str, writer: SyncStore) -> None:
        self.cluster, self.writer = cluster, writer
        for ref in list(self.exports):
            self._export(ref)

    def on_export(self, event_type: str | None, body: Body) -> None:
        ref = _ref(body)
        if event_type == "DELETED":
            self.exports.pop(ref, None)
        else:
            self.exports[ref] = slim_export(body)
        self._export(ref)

    def service_changed(self, ref: Ref) -> None:
        if ref in self.exports or ref in self._records:
            self._export(ref)

    def _export(self, ref: Ref) -> None:
        if self.writer is None or not self.enabled:
            return
        key = schema.service_export_key(self.cluster, *ref)
        export = self.exports.get(ref)
        if export is None:
            self._records.pop(ref, None)
            self.writer.set(key, None)
            return
        result = mcs.export_record(self.cluster, export, self.state.service(*ref))
        self._records[ref] = result
        self.writer.set(key, result.record.encode() if result.record else None)

    # ------------------------------------------------------------ every cluster's exports -> our objects

    def snapshot(self, now: float) -> Snapshot:
        """On the event loop: every cluster's exports and the slices our exports copy."""
        records: list[ServiceExportRecord] = [r.record for r in self._records.values() if r.record]
        pending = set()
        awaiting = self.members.awaiting_first_sync()
        views: dict[str, str] = {}
        for rc in self.members.sources(now):
            if rc.config.id in awaiting:
                pending.add(rc.name)
                views[rc.name] = "not known yet: waiting for the remote's first sync"
                continue
            if not rc.usable(now):
                # Gone past its grace period (or not ready): its exports leave with its services.
                views[rc.name] = f"not used: {rc.not_ready_reason() or 'unreachable past its grace period'}"
                continue
            found = rc.export_records()
            if found is None:
                pending.add(rc.name)
                views[rc.name] = "not known yet: its ServiceExports are not listed in full (no synced marker)"
            else:
                records += found
                views[rc.name] = f"{len(found)} exported"
        self._log_views(views)
        specs = mcs.group_exports(records)
        slices = {ref: [dict(s) for s in self.state.slices_of(*ref)]
                  for ref, r in self._records.items() if r.record is not None}
        return Snapshot(self.cluster, specs, dict(self._records),
                        {k: dict(v) for k, v in self.exports.items()}, slices, frozenset(pending))

    def _log_views(self, views: dict[str, str]) -> None:
        """Each remote's exports as this cluster counts them, logged when that changes (why an
        import lacks a cluster is then in the log)."""
        for name, view in sorted(views.items()):
            if self._views.get(name) != view:
                log.info("MCS-API: remote %s: %s", name, view)
        self._views = views

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if not self.enabled or not self.leading():
                self._applied = None
                continue
            snap = self.snapshot(time.monotonic())
            key = snap.key()
            due = time.monotonic() >= self._next_full
            if key == self._applied and not due:
                continue
            try:
                await asyncio.to_thread(self.apply, snap)
            except KubeError as exc:
                log.warning("MCS-API: %s; trying again", exc)
                metrics.ERRORS.labels("operator", "kube-api").inc()
                self._applied = None
                continue
            self._applied = key
            self._next_full = time.monotonic() + self.full_interval

    def apply(self, snap: Snapshot) -> None:
        """In a thread: make this cluster's ServiceImports, derived Services, their EndpointSlices and
        the ServiceExports' conditions what ``snap`` says."""
        slice_api = f"discovery.k8s.io/{self.kube.endpointslice_version()}"
        namespaces = {(n.get("metadata") or {}).get("name") for n in self.kube.list_path("/api/v1/namespaces")}
        imports = {_ref(b): b for b in self.kube.list_path(IMPORTS_PATH)}
        derived = {_ref(b): b for b in self.kube.list_path("/api/v1/services", mcs.LABEL_SERVICE_NAME)
                   if _ours(b)}
        ours = {_ref(b): b for b in self.kube.list_path(f"/apis/{slice_api}/endpointslices",
                                                        f"{mcs.LABEL_MANAGED_BY}={mcs.MANAGED_BY}")}
        wanted_imports: set[Ref] = set()
        wanted_derived: set[Ref] = set()
        wanted_slices: set[Ref] = set()
        for (ns, name), spec in sorted(snap.specs.items()):
            if ns not in namespaces:
                continue  # KEP-1645: imports appear only where the namespace exists
            dname = mcs.derived_name(ns, name)
            wanted_imports.add((ns, name))
            wanted_derived.add((ns, dname))
            imp: Body = imports.get((ns, name)) or self._create(
                f"{MCS_PATH}/namespaces/{ns}/serviceimports",
                _without_status(mcs.service_import(spec, None)))
            exported_here = (ns, name) in snap.local and snap.local[(ns, name)].record is not None
            svc = self._derived(spec, exported_here, imp, derived.get((ns, dname)))
            imp = self._import(spec, imp, (svc.get("spec") or {}).get("clusterIP"))
            want = (mcs.mirrored_slices(snap.cluster, ns, name, snap.slices.get((ns, name), []), slice_api, svc)
                    if exported_here else {})
            for slice_name, body in want.items():
                wanted_slices.add((ns, slice_name))
                self._slice(slice_api, body, ours.get((ns, slice_name)))
        if not snap.pending:
            for ref, imp in imports.items():
                if ref not in wanted_imports and mcs.DERIVED_SERVICE_ANNOTATION in (
                        (imp.get("metadata") or {}).get("annotations") or {}):
                    log.info("MCS-API: %s/%s is exported by no cluster any more: ServiceImport removed", *ref)
                    self._delete(f"{MCS_PATH}/namespaces/{ref[0]}/serviceimports/{ref[1]}")
            for ref in derived:
                if ref not in wanted_derived:
                    self._delete(f"/api/v1/namespaces/{ref[0]}/services/{ref[1]}")
        for ref in ours:
            if ref not in wanted_slices:
                self._delete(f"/apis/{slice_api}/namespaces/{ref[0]}/endpointslices/{ref[1]}")
        for ref, export in snap.exports.items():
            self._export_status(ref, export, snap)

    # ------------------------------------------------------------ one object each

    def _create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            return self.kube.request_json("POST", path, body)
        except KubeConflict:  # made meanwhile (another pass, or a replica that led a moment ago)
            return self.kube.get(f"{path}/{body['metadata']['name']}")

    def _delete(self, path: str) -> None:
        with contextlib.suppress(KubeNotFound):
            self.kube.request_json("DELETE", path)

    def _derived(self, spec: mcs.ImportSpec, exported_here: bool, imp: Body,
                 current: Body | None) -> dict[str, Any]:
        want = mcs.derived_service(spec, self.cluster, exported_here, imp)
        ns, name = spec.namespace, want["metadata"]["name"]
        base = f"/api/v1/namespaces/{ns}/services"
        if current is not None and ((current.get("spec") or {}).get("clusterIP") == "None") != (
                spec.type == "Headless"):
            # A Service cannot switch to or from headless: make it again.
            self._delete(f"{base}/{name}")
            current = None
        if current is None:
            log.info("MCS-API: derived Service %s/%s for %s/%s", ns, name, ns, spec.name)
            return self._create(base, want)
        if mcs.same_content(current, want, ("metadata", "spec")):
            return dict(current)
        patch = {"metadata": {k: want["metadata"][k] for k in ("labels", "annotations", "ownerReferences")
                              if k in want["metadata"]},
                 "spec": {"ports": want["spec"]["ports"], "sessionAffinity": want["spec"]["sessionAffinity"],
                          "sessionAffinityConfig": want["spec"].get("sessionAffinityConfig")}}
        return self.kube.request_json("PATCH", f"{base}/{name}", patch, "application/merge-patch+json")

    def _import(self, spec: mcs.ImportSpec, imp: Body, cluster_ip: str | None) -> Body:
        want = mcs.service_import(spec, cluster_ip)
        path = f"{MCS_PATH}/namespaces/{spec.namespace}/serviceimports/{spec.name}"
        if not (mcs.same_content(imp, want, ("metadata",)) and (imp.get("spec") or {}) == want["spec"]):
            body = dict(imp)
            meta = dict(body.get("metadata") or {})
            meta["labels"] = {**(meta.get("labels") or {}), **want["metadata"]["labels"]}
            meta["annotations"] = {**(meta.get("annotations") or {}), **want["metadata"]["annotations"]}
            body["metadata"], body["spec"] = meta, want["spec"]
            imp = self.kube.request_json("PUT", path, _without_status(body))
        if (imp.get("status") or {}) != want["status"]:
            body = {**imp, "status": want["status"]}
            imp = self.kube.request_json("PUT", f"{path}/status", body)
        return imp

    def _slice(self, slice_api: str, want: dict[str, Any], current: Body | None) -> None:
        ns, name = want["metadata"]["namespace"], want["metadata"]["name"]
        base = f"/apis/{slice_api}/namespaces/{ns}/endpointslices"
        if current is None:
            self._create(base, want)
        elif not mcs.same_content(current, want, ("metadata", "addressType", "ports", "endpoints")):
            body = {**want, "metadata": {**want["metadata"],
                                         "resourceVersion": (current.get("metadata") or {}).get("resourceVersion")}}
            self.kube.request_json("PUT", f"{base}/{name}", body)

    def _export_status(self, ref: Ref, export: Body, snap: Snapshot) -> None:
        result = snap.local.get(ref)
        if result is None:
            return
        conditions = mcs.export_conditions(snap.cluster, result.valid, snap.specs.get(ref))
        current = {c.get("type"): c for c in export.get("conditions") or []}
        out = []
        for cond in conditions:
            old = current.get(cond.type) or {}
            same = old.get("status") == ("True" if cond.status else "False")
            since = old.get("lastTransitionTime")
            out.append(cond.to_json(str(since) if same and since else _now()))
        if [{k: c.get(k) for k in ("type", "status", "reason", "message")} for c in export.get("conditions") or []] \
                == [{k: c[k] for k in ("type", "status", "reason", "message")} for c in out]:
            return
        path = f"{MCS_PATH}/namespaces/{ref[0]}/serviceexports/{ref[1]}/status"
        with contextlib.suppress(KubeNotFound):
            self.kube.request_json("PATCH", path, {"status": {"conditions": out}}, "application/merge-patch+json")


def _ref(body: Body) -> Ref:
    meta = body.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


def _ours(service: Body) -> bool:
    meta = service.get("metadata") or {}
    return str(meta.get("name") or "").startswith("derived-") and (
        (meta.get("annotations") or {}).get(mcs.GLOBAL_ANNOTATION) == "true")


def _without_status(body: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != "status"}


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
