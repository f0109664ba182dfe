"""One membership code path (store/membership.py): how the agent, the cache and the operator's remote
view follow spec.clusters. Stand-ins for the readers and the Secrets; no I/O but the credential files."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clustermesh.kube import KubeError
from clustermesh.store.membership import RemoteSet
from clustermesh.store.remote_config import RemoteConfig

GRACE = 60.0


@dataclass
class Reader:
    """What RemoteSet asks of a RemoteCluster."""

    config: RemoteConfig
    max_cluster_id: int
    ready: bool = False
    stopped: bool = False
    removed: bool = False

    @property
    def name(self) -> str:
        return self.config.name

    def stop(self) -> None:
        self.stopped = True

    def remove(self) -> None:
        self.stopped = self.removed = True


@dataclass
class Secrets:
    data: dict[str, dict[str, bytes]] = field(default_factory=dict)
    broken: bool = False

    def get_secret(self, namespace: str, name: str) -> dict[str, bytes]:
        if self.broken:
            raise KubeError("the API server is away")
        return self.data[name]


def spec(*clusters: dict[str, Any], max_connected: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"localCluster": {"name": "a", "id": 1}, "clusters": list(clusters)}
    if max_connected is not None:
        out["maxConnectedClusters"] = max_connected
    return out


def entry(name: str, cid: int, secret: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "id": cid, "endpoints": [f"https://{name}.example:2379"]}
    if secret:
        out["tls"] = {"secretName": secret}
    return out


def members(tmp_path: Path, secrets: Secrets | None = None) -> tuple[RemoteSet, list[Reader], list[str]]:
    started: list[Reader] = []
    changed: list[str] = []

    def start(config: RemoteConfig, max_id: int) -> Any:
        started.append(Reader(config, max_id))
        return started[-1]

    rs = RemoteSet("agent", secrets or Secrets(), tmp_path, "clustermesh-remotes", start, GRACE,
                   on_change=changed.append)
    return rs, started, changed


def test_new_credentials_switch_once_the_new_connection_is_ready(tmp_path: Path) -> None:
    secrets = Secrets({"b": {"password": b"one"}})
    rs, started, changed = members(tmp_path, secrets)
    rs.apply(spec(entry("b", 2, "b")), now=0.0, first=True)
    old = started[0]
    old.ready = True
    secrets.data["b"] = {"password": b"two"}
    rs.apply(None, now=10.0)  # the periodic re-read of the Secrets
    new = started[1]
    assert new.config.password == "two" and changed == ["b", "b"]
    # Until the new connection is ready, the old one serves; asking changes nothing.
    assert rs.sources(20.0) == [old] and rs.sources(20.0) == [old] and rs.switching() == {"b"}
    rs.retire(20.0)
    assert not old.stopped and rs.sources(20.0) == [old]
    new.ready = True
    assert rs.sources(21.0) == [new]
    rs.retire(21.0)
    assert old.stopped and not old.removed and rs.switching() == frozenset()


def test_a_new_connection_that_never_gets_ready_replaces_the_old_after_the_grace_period(tmp_path: Path) -> None:
    secrets = Secrets({"b": {"password": b"one"}})
    rs, started, _ = members(tmp_path, secrets)
    rs.apply(spec(entry("b", 2, "b")), now=0.0)
    secrets.data["b"] = {"password": b"two"}
    rs.apply(None, now=10.0)
    assert rs.sources(10.0 + GRACE - 1) == [started[0]]
    assert rs.sources(10.0 + GRACE) == [started[1]]


def test_unchanged_settings_keep_their_connection(tmp_path: Path) -> None:
    rs, started, changed = members(tmp_path, Secrets({"b": {"password": b"one"}}))
    rs.apply(spec(entry("b", 2, "b")), now=0.0)
    rs.apply(None, now=5.0)
    rs.apply(spec(entry("b", 2, "b")), now=6.0)
    assert len(started) == 1 and changed == ["b"]


def test_a_secret_that_cannot_be_read_keeps_the_connection_a_removed_entry_does_not(tmp_path: Path) -> None:
    secrets = Secrets({"b": {"password": b"one"}, "c": {"password": b"x"}})
    rs, started, changed = members(tmp_path, secrets)
    rs.apply(spec(entry("b", 2, "b"), entry("c", 3, "c")), now=0.0)
    secrets.broken = True
    rs.apply(None, now=1.0)
    assert set(rs.snapshot()) == {"b", "c"} and "b" in rs.refused
    secrets.broken = False
    rs.apply(spec(entry("c", 3, "c")), now=2.0)
    assert set(rs.snapshot()) == {"c"} and started[0].removed and changed[-1] == "b"


def test_colliding_and_out_of_range_remotes_are_refused_the_rest_connect(tmp_path: Path) -> None:
    rs, started, _ = members(tmp_path)
    rs.apply(spec(entry("b", 2), entry("c", 2), entry("a", 3), entry("d", 300), entry("e", 5)), now=0.0)
    assert set(rs.snapshot()) == {"b", "e"}
    assert set(rs.refused) == {"c", "a", "d"}
    assert all(r.max_cluster_id == 255 for r in started)


def test_max_connected_clusters_is_read_once_and_bounds_every_id(tmp_path: Path) -> None:
    rs, started, _ = members(tmp_path)
    rs.apply(spec(entry("b", 400), max_connected=511), now=0.0)
    assert set(rs.snapshot()) == {"b"} and started[0].max_cluster_id == 511
    # A change needs a restart: the IDs stay bounded by the first value.
    rs.apply(spec(entry("b", 400), entry("c", 300), max_connected=255), now=1.0)
    assert set(rs.snapshot()) == {"b", "c"} and "maxConnectedClusters" not in rs.snapshot()
    # A value Cilium does not allow: refused, IDs up to 255.
    fresh, _, _ = members(tmp_path / "x")
    fresh.apply(spec(entry("b", 2), entry("c", 300), max_connected=300), now=0.0)
    assert set(fresh.snapshot()) == {"b"} and "c" in fresh.refused


def test_remotes_of_the_first_spec_are_awaited_until_ready(tmp_path: Path) -> None:
    rs, started, _ = members(tmp_path)
    rs.apply(spec(entry("b", 2), entry("c", 3)), now=0.0, first=True)
    rs.apply(spec(entry("b", 2), entry("c", 3), entry("d", 4)), now=1.0)
    assert rs.awaiting_first_sync() == {2, 3}
    started[0].ready = True
    assert rs.awaiting_first_sync() == {2, 3}, "a query changes nothing"
    rs.retire(2.0)
    assert rs.awaiting_first_sync() == {3}
