"""Who writes the ClusterMesh status among HA store replicas: the Lease decision, without a cluster."""

from __future__ import annotations

import datetime as dt

from clustermesh.operator.leader import claim

NOW = dt.datetime(2026, 12, 2, 12, 0, 0, tzinfo=dt.UTC)


def lease(holder: str, seconds_ago: float, duration: int = 15, transitions: int = 0) -> dict[str, object]:
    renewed = (NOW - dt.timedelta(seconds=seconds_ago)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return {"metadata": {"resourceVersion": "7"},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": duration, "renewTime": renewed,
                     "acquireTime": "2026-12-02T11:00:00.000000Z", "leaseTransitions": transitions}}


def test_no_lease_is_taken() -> None:
    spec = claim(None, "store-a", NOW, 15)
    assert spec is not None
    assert spec["holderIdentity"] == "store-a" and spec["leaseDurationSeconds"] == 15
    assert spec["renewTime"] == spec["acquireTime"] == "2026-12-02T12:00:00.000000Z"
    assert spec["leaseTransitions"] == 0


def test_another_live_holder_keeps_it() -> None:
    assert claim(lease("store-b", 14), "store-a", NOW, 15) is None


def test_an_expired_holder_loses_it() -> None:
    spec = claim(lease("store-b", 16, transitions=2), "store-a", NOW, 15)
    assert spec is not None and spec["holderIdentity"] == "store-a"
    assert spec["leaseTransitions"] == 3
    assert spec["acquireTime"] == spec["renewTime"]


def test_the_holder_renews_and_keeps_its_acquire_time() -> None:
    spec = claim(lease("store-a", 5, transitions=1), "store-a", NOW, 15)
    assert spec is not None
    assert spec["acquireTime"] == "2026-12-02T11:00:00.000000Z"
    assert spec["renewTime"] == "2026-12-02T12:00:00.000000Z"
    assert spec["leaseTransitions"] == 1


def test_the_lease_duration_written_by_the_holder_counts() -> None:
    # The holder said 60 s: 30 s without renewal is still live, whatever our own duration.
    assert claim(lease("store-b", 30, duration=60), "store-a", NOW, 15) is None


def test_an_unreadable_renew_time_is_no_live_holder() -> None:
    broken = {"spec": {"holderIdentity": "store-b", "renewTime": "yesterday"}}
    spec = claim(broken, "store-a", NOW, 15)
    assert spec is not None and spec["holderIdentity"] == "store-a"
