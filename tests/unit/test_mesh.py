"""Which remotes a mesh must refuse: bad or colliding names and IDs."""

from __future__ import annotations

from clustermesh.store.remote_config import RemoteConfig, mesh_problems


def test_mesh_problems() -> None:
    remotes = [RemoteConfig("c2", 2, ("http://x:1",)), RemoteConfig("c3", 2, ("http://x:1",)),
               RemoteConfig("c1", 4, ("http://x:1",)), RemoteConfig("Bad", 5, ("http://x:1",)),
               RemoteConfig("c6", 0, ("http://x:1",)), RemoteConfig("c7", 1, ("http://x:1",))]
    refused = mesh_problems("c1", 1, remotes)
    assert set(refused) == {"c3", "c1", "Bad", "c6", "c7"}
    assert "already used by c2" in refused["c3"]
    assert "already used by c1" in refused["c7"]
