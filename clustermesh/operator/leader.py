"""Which store replica speaks for the cluster in Kubernetes: a coordination.k8s.io Lease.

Every replica exports to its own etcd (a reader sent to any replica sees the whole
state); only what is written to Kubernetes, the ClusterMesh status, needs one voice,
or two replicas would overwrite each other's view every few seconds. The decision is
a pure function of the Lease as read (``claim``); ``StatusLeader`` reads and writes it.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping
from typing import Any

from clustermesh import metrics
from clustermesh.kube import KubeClient, KubeConflict, KubeError

log = logging.getLogger(__name__)

MICROTIME = "%Y-%m-%dT%H:%M:%S.%fZ"


def claim(lease: Mapping[str, Any] | None, me: str, now: dt.datetime, duration: int) -> dict[str, Any] | None:
    """The Lease spec to write so that ``me`` holds it, or None while another holder's
    lease is live. Pure; ``now`` is timezone-aware."""
    spec = (lease or {}).get("spec") or {}
    holder = spec.get("holderIdentity")
    renewed = _parse(spec.get("renewTime"))
    lasts = int(spec.get("leaseDurationSeconds") or duration)
    live = renewed is not None and renewed + dt.timedelta(seconds=lasts) > now
    if holder and holder != me and live:
        return None
    stamp = now.strftime(MICROTIME)
    mine = holder == me and live
    return {
        "holderIdentity": me,
        "leaseDurationSeconds": duration,
        "acquireTime": spec.get("acquireTime") if mine and spec.get("acquireTime") else stamp,
        "renewTime": stamp,
        "leaseTransitions": int(spec.get("leaseTransitions") or 0) + (0 if mine or not holder else 1),
    }


def _parse(value: Any) -> dt.datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


class StatusLeader:
    """Holds (or waits for) one Lease; ``refresh()`` says whether this replica holds it now."""

    def __init__(self, kube: KubeClient, namespace: str, name: str, me: str, duration: int = 15) -> None:
        self.kube = kube
        self.namespace = namespace
        self.name = name
        self.me = me
        self.duration = duration
        self.leading = False
        self._last_error = ""

    def refresh(self, now: dt.datetime | None = None) -> bool:
        """Renew or take the Lease when free; blocking (call it from a thread)."""
        now = now or dt.datetime.now(dt.UTC)
        try:
            lease = self.kube.get_lease(self.namespace, self.name)
            spec = claim(lease, self.me, now, self.duration)
            if spec is not None:
                version = (lease or {}).get("metadata", {}).get("resourceVersion")
                self.kube.write_lease(self.namespace, self.name, spec, version if lease else None)
        except KubeConflict:
            spec = None  # another replica wrote it first: it leads
        except KubeError as exc:
            # Unsure: stop speaking (another replica may take over meanwhile). Said once per cause:
            # a Lease this replica may not read or write (RBAC) would otherwise keep status unwritten unseen.
            if self.leading or str(exc) != self._last_error:
                log.warning("status lease %s/%s: %s; not writing status until it is renewed",
                            self.namespace, self.name, exc)
                metrics.ERRORS.labels("operator", "kube-api").inc()
            self._last_error = str(exc)
            spec = None
        else:
            self._last_error = ""
        leading = spec is not None
        if leading != self.leading:
            log.info("status lease %s/%s: this replica (%s) %s", self.namespace, self.name, self.me,
                     "writes the ClusterMesh status" if leading else "leaves the ClusterMesh status to another")
        self.leading = leading
        return leading
