"""What ``clustermesh status`` shows, computed from what it found. Pure.

The I/O side (``status.py``) reads the ClusterMesh object and looks at each
remote store once; everything here turns those findings into one document
(the ``--output json`` shape), the table, and the verdict. The rules that keep
the output from contradicting itself live here, in one place:

- a remote is ready only when its store answered and the agent's readiness
  rules found nothing missing; a remote that did not answer is never ready;
- counts come from the remote store (keys under the remote's prefixes), and
  are only shown for a store that answered.

The JSON document (``STATUS_FORMAT`` 1) is::

    {"format": 1,
     "localCluster": {"name": "cluster-1", "id": 1},
     "operator": {"conditions": [{"type": "Synced", "status": "True", "reason": "...", "message": "..."}],
                  "exportedServices": 3, "exportedNodes": 2, "lastSyncTime": "2026-01-01T00:00:00Z"},
     "remotes": [{"name": "cluster-2", "id": 2, "endpoint": "https://...", "connected": true,
                  "ready": true, "reason": null, "services": 10000, "nodes": 2}],
     "certificates": [{"name": "remote cluster-2 tls.crt", "notAfter": "2027-12-03T09:00:00+00:00",
                       "daysLeft": 365.0, "state": "ok"}],
     "ready": true}

``operator.lastSyncTime`` and the counts are null when unknown; ``ready`` at the
top is true when every remote is ready (also when there is none). A certificate's
``state`` is ``ok``, ``expiring`` (within ``CERT_WARNING``: 30 days) or ``expired``;
an expired one makes the command fail as a remote that is not ready does.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

STATUS_FORMAT = 1
CERT_WARNING = dt.timedelta(days=30)
TABLE_HEADER = ["REMOTE", "ID", "ENDPOINT", "CONNECTED", "READY", "SERVICES", "NODES", "REASON"]


@dataclass(frozen=True)
class RemoteFinding:
    """One look at one remote, as the I/O side made it.

    ``error`` set: the remote could not be asked (bad Secret, refused by the
    mesh rules, store unreachable). Otherwise ``not_ready`` is the agent's
    readiness verdict (None: ready) and the counts are what the store holds.
    """

    name: str
    id: int | None
    endpoint: str | None
    error: str | None = None
    not_ready: str | None = None
    services: int | None = None
    nodes: int | None = None


def remote_view(found: RemoteFinding) -> dict[str, Any]:
    """One remote's entry of the document; the consistency rules are applied here."""
    connected = found.error is None
    ready = connected and found.not_ready is None
    reason = found.error if not connected else found.not_ready
    return {
        "name": found.name,
        "id": found.id,
        "endpoint": found.endpoint,
        "connected": connected,
        "ready": ready,
        "reason": reason,
        # Counts of a store we could not read would be stale or invented: none at all.
        "services": found.services if connected else None,
        "nodes": found.nodes if connected else None,
    }


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def operator_view(status: Mapping[str, Any]) -> dict[str, Any]:
    """The operator's side, from the ClusterMesh ``status`` (as the operator wrote it)."""
    conditions = []
    for cond in status.get("conditions") or []:
        if isinstance(cond, Mapping) and cond.get("type"):
            conditions.append({k: cond.get(k) for k in ("type", "status", "reason", "message")})
    last_sync = status.get("lastSyncTime")
    return {
        "conditions": conditions,
        "exportedServices": _int_or_none(status.get("exportedServices")),
        "exportedNodes": _int_or_none(status.get("exportedNodes")),
        "lastSyncTime": last_sync if isinstance(last_sync, str) else None,
    }


@dataclass(frozen=True)
class CertificateFinding:
    """One certificate the mesh depends on: where it is and when it ends."""

    name: str
    not_after: dt.datetime


def cached_finding(name: str, cid: int | None, reported: Mapping[str, Any] | None) -> RemoteFinding:
    """A remote as this cluster's store pods see it (the operator's ``status.remotes`` entry), for a
    mesh whose agents read the remotes from that cache: their view is the one that counts. Pure."""
    if not reported:
        return RemoteFinding(name, cid, "cache", not_ready="the store pods have not reported it yet")
    failure = reported.get("lastFailure")
    services, nodes = _int_or_none(reported.get("services")), _int_or_none(reported.get("nodes"))
    if not reported.get("connected"):
        return RemoteFinding(name, cid, "cache", error=str(failure or "not connected"))
    if not reported.get("ready"):
        return RemoteFinding(name, cid, "cache", not_ready=str(failure or "not ready"), services=services,
                             nodes=nodes)
    return RemoteFinding(name, cid, "cache", services=services, nodes=nodes)


def agent_views(pods: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One entry per agent pod: its node and whether it is Ready (its maps hold what its remotes
    say). Pure."""
    out = []
    for pod in pods:
        conditions = {c.get("type"): c.get("status") for c in (pod.get("status") or {}).get("conditions") or []}
        out.append({"node": (pod.get("spec") or {}).get("nodeName"), "ready": conditions.get("Ready") == "True"})
    return sorted(out, key=lambda a: str(a["node"]))


def certificate_view(found: CertificateFinding, at: dt.datetime) -> dict[str, Any]:
    left = found.not_after - at
    state = "expired" if left <= dt.timedelta(0) else "expiring" if left <= CERT_WARNING else "ok"
    return {"name": found.name, "notAfter": found.not_after.isoformat(),
            "daysLeft": round(left.total_seconds() / 86400, 1), "state": state}


def status_document(mesh: Mapping[str, Any], remotes: Sequence[RemoteFinding],
                    certificates: Sequence[CertificateFinding] = (), at: dt.datetime | None = None,
                    agents: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """The whole status: local identity, the operator's conditions, each remote, the certificates'
    expiry, the verdict."""
    local = (mesh.get("spec") or {}).get("localCluster") or {}
    views = [remote_view(r) for r in sorted(remotes, key=lambda r: r.name)]
    now = at or dt.datetime.now(dt.UTC)
    certs = [certificate_view(c, now) for c in sorted(certificates, key=lambda c: c.not_after)]
    doc: dict[str, Any] = {
        "format": STATUS_FORMAT,
        "localCluster": {"name": local.get("name"), "id": _int_or_none(local.get("id"))},
        "operator": operator_view(mesh.get("status") or {}),
        "remotes": views,
        "certificates": certs,
        "ready": all(v["ready"] for v in views) and not any(c["state"] == "expired" for c in certs),
    }
    if agents is not None:  # read through the API: with the cache, what the nodes use
        doc["agents"] = [dict(a) for a in agents]
        doc["ready"] = doc["ready"] and all(a["ready"] for a in agents)
    return doc


def certificate_lines(doc: Mapping[str, Any]) -> list[str]:
    """A warning per certificate within 30 days of its end, an error per expired one."""
    lines = []
    for c in doc.get("certificates") or []:
        day = c["notAfter"][:10]
        if c["state"] == "expired":
            lines.append(f"error: certificate {c['name']} expired on {day}: the mesh cannot use it. Renew with "
                         "`clustermesh certs --renew` (or the clustermesh-certs CronJob), then connect again")
        elif c["state"] == "expiring":
            lines.append(f"warning: certificate {c['name']} expires in {c['daysLeft']:g} days ({day}): run "
                         "`clustermesh certs --renew` (or let the clustermesh-certs CronJob run)")
    return lines


def not_ready(doc: Mapping[str, Any]) -> list[str]:
    """``name: why`` for every remote that is not ready and every expired certificate, for the
    error message of ``--wait``."""
    return ([f"{r['name']}: {r['reason'] or 'not ready'}" for r in doc["remotes"] if not r["ready"]]
            + [f"agent on {a['node']}: not Ready" for a in doc.get("agents") or [] if not a["ready"]]
            + [f"certificate {c['name']} expired" for c in doc.get("certificates") or [] if c["state"] == "expired"])


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return " ".join(str(value).split())  # one line per remote, whatever the error text holds


def headline(doc: Mapping[str, Any]) -> str:
    local, operator = doc["localCluster"], doc["operator"]
    conditions = {c["type"]: c.get("status") or "Unknown" for c in operator["conditions"]}
    services, nodes = operator["exportedServices"], operator["exportedNodes"]
    return (f"cluster {local['name']} (id {local['id']}): "
            f"store reachable={conditions.get('StoreReachable', 'Unknown')}, "
            f"synced={conditions.get('Synced', 'Unknown')}, "
            f"exported {_cell(services)} services and {_cell(nodes)} nodes")


def table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def render_text(doc: Mapping[str, Any]) -> str:
    """The human form: the headline, then one row per remote."""
    lines = [headline(doc)]
    if not doc["remotes"]:
        lines.append("no remote clusters in the ClusterMesh")
    else:
        rows = [TABLE_HEADER]
        for r in doc["remotes"]:
            rows.append([_cell(r[k]) for k in ("name", "id", "endpoint", "connected", "ready", "services", "nodes")]
                        + [_cell(r["reason"]) if r["reason"] else ""])
        lines.append(table(rows))
    agents = doc.get("agents")
    if agents is not None:
        ready = sum(1 for a in agents if a["ready"])
        waiting = ", ".join(str(a["node"]) for a in agents if not a["ready"])
        lines.append(f"agents: {ready}/{len(agents)} Ready" + (f" (not: {waiting})" if waiting else ""))
    return "\n".join(lines + certificate_lines(doc))
