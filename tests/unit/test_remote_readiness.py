"""When a remote is trusted (``not_ready_reason``) and which remotes a mesh refuses (``mesh_problems``)."""

from __future__ import annotations

import pytest

from clustermesh import schema
from clustermesh.store.readiness import Unready, not_ready_reason
from clustermesh.store.remote_config import RemoteConfig, mesh_problems

SERVICES, NODES = schema.SERVICES_PREFIX, schema.NODES_PREFIX
WITH_MARKERS = '{"id":2,"capabilities":{"syncedCanaries":true,"maxConnectedClusters":255}}'
# What cilium-operator writes in kvstore mode: no syncedCanaries, so no markers ever come.
NO_CANARIES = '{"id":2,"capabilities":{"maxConnectedClusters":255}}'
BARE = '{"id":2}'


@pytest.mark.parametrize(
    ("config", "synced", "expected"),
    [
        (None, {SERVICES, NODES}, "no cluster-config"),
        ("{nope", {SERVICES, NODES}, "cluster-config does not parse"),
        ('{"id":3,"capabilities":{"syncedCanaries":true}}', {SERVICES, NODES},
         "says its ID is 3, the ClusterMesh says 2"),
        (WITH_MARKERS, set(), "waiting for synced markers of services and nodes"),
        (WITH_MARKERS, {NODES}, "waiting for synced markers of services"),
        (WITH_MARKERS, {SERVICES}, "waiting for synced markers of nodes"),
        (WITH_MARKERS, {SERVICES, NODES}, None),
        (WITH_MARKERS, {SERVICES, NODES, "cilium/state/identities/v1"}, None),
        (NO_CANARIES, set(), None),
        (BARE, set(), None),
    ],
)
def test_not_ready_reason(config: str | None, synced: set[str], expected: str | None) -> None:
    reason = not_ready_reason("c2", 2, config, synced)
    if expected is None:
        assert reason is None
    else:
        assert reason is not None and reason.startswith(expected), reason
        kinds = {"no cluster-config": Unready.NO_CONFIG, "cluster-config does not parse": Unready.BAD_CONFIG,
                 "says its ID": Unready.ID_MISMATCH, "waiting": Unready.WAITING}
        assert reason.kind is next(k for text, k in kinds.items() if expected.startswith(text))
        assert reason.kind.misconfigured is (reason.kind in (Unready.BAD_CONFIG, Unready.ID_MISMATCH))


def test_ids_above_255_need_a_mesh_configured_for_511() -> None:
    config = '{"id":300,"capabilities":{"syncedCanaries":true,"maxConnectedClusters":511}}'
    both = {SERVICES, NODES}
    assert not_ready_reason("c2", 300, config, both, max_cluster_id=511) is None
    reason = not_ready_reason("c2", 300, config, both)
    assert reason is not None and "outside 1..255" in reason


def test_mesh_problems_refuse_bad_and_colliding_remotes() -> None:
    remotes = [RemoteConfig("b", 2, ("http://x",)), RemoteConfig("c", 2, ("http://x",)), RemoteConfig("a", 5, ("http://x",)),
               RemoteConfig("Bad", 6, ("http://x",)), RemoteConfig("d", 0, ("http://x",)),
               RemoteConfig("e", 300, ("http://x",)), RemoteConfig("b", 7, ("http://x",))]
    refused = mesh_problems("a", 1, remotes)
    assert set(refused) == {"c", "a", "Bad", "d", "e", "b"}
    assert refused["c"] == "cluster ID 2 is already used by b"
    assert refused["a"] == "cluster name a is used twice in the mesh"
    assert "outside 1..255" in refused["e"]
    assert refused["b"] == "cluster name b is used twice in the mesh"  # the second "b"
    assert "e" not in mesh_problems("a", 1, remotes[5:6], max_cluster_id=511)
    assert "outside 1..511" in mesh_problems("a", 1, [RemoteConfig("f", 512, ("http://x",))], max_cluster_id=511)["f"]
