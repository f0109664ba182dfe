"""The status Lease on a real kube-apiserver: the first replica creates and holds it, the other
waits; the holder renews it; once it expires unrenewed the other takes it over."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest

from clustermesh.kube import KubeClient
from clustermesh.operator.leader import StatusLeader

pytestmark = pytest.mark.integration


def test_one_replica_holds_the_status_lease_and_the_other_takes_it_when_it_expires(kubeconfig: str) -> None:
    kube = KubeClient(kubeconfig)
    name = f"status-{uuid.uuid4().hex[:8]}"
    assert kube.get_lease("default", name) is None  # absent: None, not an error
    first = StatusLeader(kube, "default", name, "replica-a", duration=15)
    second = StatusLeader(kube, "default", name, "replica-b", duration=15)
    t0 = dt.datetime.now(dt.UTC)

    assert first.refresh(t0) is True  # created it
    assert second.refresh(t0 + dt.timedelta(seconds=1)) is False
    lease = kube.get_lease("default", name)
    assert lease is not None and lease["spec"]["holderIdentity"] == "replica-a"

    assert first.refresh(t0 + dt.timedelta(seconds=10)) is True  # renewed, still inside its 15 s
    assert second.refresh(t0 + dt.timedelta(seconds=20)) is False  # 10 s after the renewal: still live

    assert second.refresh(t0 + dt.timedelta(seconds=26)) is True  # 16 s unrenewed: taken over
    assert first.refresh(t0 + dt.timedelta(seconds=27)) is False
    lease = kube.get_lease("default", name)
    assert lease is not None and lease["spec"]["holderIdentity"] == "replica-b"
