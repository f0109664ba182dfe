"""``clustermesh connect`` / ``disconnect``: make two clusters remotes of each other, or undo it.

Each cluster publishes how others reach it in its ClusterMesh ``spec.access``
(grpc-proxy endpoints). Connecting A and B gives A its own reader in B's store
(identity.py: an etcd user named ``A``, its password and client certificate, from B's
store CA), copies that access Secret into A as ``clustermesh-remotes/clustermesh-remote-B``
(a namespace holding only such copies) and adds B to A's ``spec.clusters``, and the
other way round. Names and IDs must not collide anywhere in either mesh. Without B's CA
at hand (``--destination-pki-dir``, the default folder of ``clustermesh certs``, or the
Secret ``clustermesh-store-ca``), B's ``spec.access.tls`` Secret is copied instead: every
peer then shares one identity, which cannot be revoked for one peer alone (a warning says so).

Connect is all or nothing: when a write fails, every write made before it is
undone (each ClusterMesh patch carries the resourceVersion it was computed
from, and nothing someone else changed meanwhile is overwritten). Disconnect
removes the ``spec.clusters`` entries and the Secrets connect copied, and revokes
each side's reader in the other's store; run twice, the second run finds nothing to do.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clustermesh.certs import NAMESPACE, CertsError
from clustermesh.identity import StoreCA, add_reader, revoke_reader, store_ca
from clustermesh.kube import REMOTE_SECRETS_NAMESPACE, KubeClient, KubeConflict, KubeError
from clustermesh.schema import MAX_CLUSTER_ID
from clustermesh.store.remote_config import RemoteConfig, mesh_problems

SECRETS_NAMESPACE = REMOTE_SECRETS_NAMESPACE
ACCESS_NAMESPACE = NAMESPACE  # where spec.access.tls points when it names no namespace: where certs writes
REMOTE_LABEL = "clustermesh.io/remote"
CONFLICT_RETRIES = 5  # the operator's status updates bump resourceVersion too; a retry re-reads


log = logging.getLogger(__name__)


class ConnectError(Exception):
    pass


@dataclass
class Side:
    kube: KubeClient
    mesh_name: str
    mesh: dict[str, Any]
    pki_dir: Path | None = None
    """The folder of this cluster's store CA (default: ``clustermesh certs``'s default for its name)."""

    @property
    def spec(self) -> dict[str, Any]:
        return dict(self.mesh.get("spec") or {})

    @property
    def name(self) -> str:
        return str((self.spec.get("localCluster") or {}).get("name"))

    @property
    def id(self) -> int:
        return int((self.spec.get("localCluster") or {}).get("id") or 0)

    @property
    def max_cluster_id(self) -> int:
        """spec.maxConnectedClusters: 255 unless the mesh is configured for 511."""
        return int(self.spec.get("maxConnectedClusters") or MAX_CLUSTER_ID)


def load_side(kube: KubeClient, mesh_name: str, pki_dir: Path | None = None) -> Side:
    mesh = kube.get_mesh(mesh_name)
    if mesh is None:
        raise ConnectError(f"no ClusterMesh {mesh_name!r} there; apply one with localCluster and access first")
    return Side(kube, mesh_name, mesh, pki_dir)


def copied_secret_name(remote: str) -> str:
    return f"clustermesh-remote-{remote}"


def remote_entry(remote: Side, ca: StoreCA | None = None) -> tuple[dict[str, Any], dict[str, bytes] | None]:
    """The spec.clusters entry for ``remote`` and, without ``remote``'s CA, the content of its shared
    access Secret (read, not copied). With the CA, the reader is issued later (``add_reader``)."""
    access = remote.spec.get("access") or {}
    endpoints = access.get("endpoints") or []
    if not endpoints:
        raise ConnectError(f"cluster {remote.name} has no spec.access.endpoints: set its grpc-proxy URL first")
    entry: dict[str, Any] = {"name": remote.name, "id": remote.id, "endpoints": list(endpoints)}
    if ca is not None:
        entry["tls"] = {"secretName": copied_secret_name(remote.name), "secretNamespace": SECRETS_NAMESPACE}
        return entry, None
    tls = access.get("tls") or {}
    if not tls.get("secretName"):
        if any(str(e).startswith("https://") for e in endpoints):
            raise ConnectError(f"no store CA of {remote.name} at hand to give its peer a reader: pass the folder "
                               f"`clustermesh certs` used for it (--pki-dir or --destination-pki-dir), or put the "
                               f"CA in the cluster (certs --in-cluster-ca)")
        return entry, None
    log.warning("no store CA of %s at hand: copying its shared access Secret %s; peers that share it cannot be "
                "revoked one by one (give --pki-dir/--destination-pki-dir for one identity per peer)",
                remote.name, tls["secretName"])
    namespace = tls.get("secretNamespace") or ACCESS_NAMESPACE
    try:
        data = remote.kube.get_secret(namespace, tls["secretName"])
    except KubeError as exc:
        raise ConnectError(f"cluster {remote.name}'s access Secret {namespace}/{tls['secretName']}: {exc}") from exc
    entry["tls"] = {"secretName": copied_secret_name(remote.name), "secretNamespace": SECRETS_NAMESPACE}
    return entry, data


def _clusters(mesh: dict[str, Any]) -> list[dict[str, Any]]:
    return list((mesh.get("spec") or {}).get("clusters") or [])


def _entry_of(mesh: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((c for c in _clusters(mesh) if c.get("name") == name), None)


def _with_entry(clusters: list[dict[str, Any]], name: str, entry: dict[str, Any] | None) -> list[dict[str, Any]]:
    """``clusters`` with ``name``'s entry replaced in place, added at the end, or (None) removed."""
    out = [entry if c.get("name") == name else c for c in clusters]
    if entry is not None and not any(c.get("name") == name for c in clusters):
        out.append(entry)
    return [c for c in out if c is not None]


def _others(into: Side, remote: Side) -> list[dict[str, Any]]:
    return [c for c in into.spec.get("clusters") or [] if c.get("name") != remote.name]


def check_remote(into: Side, remote: Side, ca: StoreCA | None = None) -> tuple[dict[str, Any], dict[str, bytes] | None]:
    """Everything that can refuse the connection, before anything is written."""
    configs = [RemoteConfig(str(c["name"]), int(c["id"]), tuple(map(str, c.get("endpoints") or ())))
               for c in _others(into, remote)]
    configs.append(RemoteConfig(remote.name, remote.id, ("-",)))
    if into.max_cluster_id != remote.max_cluster_id:
        raise ConnectError(f"{into.name} allows cluster IDs up to {into.max_cluster_id}, {remote.name} up to "
                           f"{remote.max_cluster_id}: set the same spec.maxConnectedClusters on both")
    refused = mesh_problems(into.name, into.id, configs, into.max_cluster_id)
    if remote.name in refused:
        raise ConnectError(f"cannot add {remote.name} to {into.name}: {refused[remote.name]}")
    return remote_entry(remote, ca)


# ------------------------------------------------------------ writes, each with its undo

Undo = Callable[[], None]


def _set_entry(side: Side, remote: str, new: dict[str, Any] | None, still: Callable[[dict[str, Any]], bool],
               changed: str, mesh: dict[str, Any] | None = None) -> bool:
    """Set ``remote``'s spec.clusters entry of ``side`` to ``new`` (None: remove it).

    Every patch carries the resourceVersion of the state it was computed from. The
    operator's status updates bump that version too, so a conflict reads the object
    again and retries, as long as ``still(mesh)`` says the spec is what the change was
    decided on; otherwise nothing is written and ``changed`` is the error. ``mesh``: the
    state already read (default: read now). Returns whether anything was written."""
    for attempt in range(CONFLICT_RETRIES):
        if mesh is None:
            mesh = side.kube.get_mesh(side.mesh_name)
            if mesh is None:
                raise KubeError(f"ClusterMesh {side.mesh_name} of {side.name} is gone")
        if not still(mesh):
            raise KubeError(changed)
        if _entry_of(mesh, remote) == new:
            return False
        rv = (mesh.get("metadata") or {}).get("resourceVersion")
        try:
            side.kube.patch_mesh_spec(side.mesh_name, {"clusters": _with_entry(_clusters(mesh), remote, new)}, rv)
        except KubeError as exc:
            # kube.py reports a failed resourceVersion precondition (HTTP 409) with this text.
            if isinstance(exc, KubeConflict) and attempt + 1 < CONFLICT_RETRIES:
                mesh = None
                continue
            raise
        return True
    raise AssertionError("unreachable")


def copy_secret(into: Side, remote: Side, checked: tuple[dict[str, Any], dict[str, bytes] | None]) -> Undo | None:
    """Write ``remote``'s access Secret into ``into``; return how to put back what was there."""
    entry, secret = checked
    if secret is None:
        return None
    name = entry["tls"]["secretName"]
    labels = {REMOTE_LABEL: remote.name}
    before = into.kube.read_secret(SECRETS_NAMESPACE, name)
    if before is not None and before.data == secret and before.labels == labels:
        return None
    into.kube.ensure_namespace(SECRETS_NAMESPACE)  # deploy/ makes it; left in place by a rollback
    into.kube.put_secret(SECRETS_NAMESPACE, name, secret, labels=labels)

    def undo() -> None:
        now = into.kube.read_secret(SECRETS_NAMESPACE, name)
        if now is None or now.data != secret:
            raise KubeError(f"Secret {SECRETS_NAMESPACE}/{name} in {into.name} was changed by someone else "
                            "meanwhile; left as it is now")
        if before is None:
            into.kube.delete_secret(SECRETS_NAMESPACE, name, now.resource_version)
        else:
            into.kube.put_secret(SECRETS_NAMESPACE, name, before.data, labels=before.labels)

    return undo


def add_remote(into: Side, remote: Side, checked: tuple[dict[str, Any], dict[str, bytes] | None]) -> Undo | None:
    """Put ``remote``'s entry into ``into``'s spec.clusters, only while the list is the one
    the checks ran on; return how to put back the old entry."""
    entry, _secret = checked
    before = _entry_of(into.mesh, remote.name)
    checked_list = _clusters(into.mesh)
    if not _set_entry(into, remote.name, entry, lambda mesh: _clusters(mesh) == checked_list,
                      f"ClusterMesh {into.mesh_name} ({into.name}) changed while connecting: its spec.clusters "
                      "is not the one checked; run the command again", mesh=into.mesh):
        return None

    def undo() -> None:
        _set_entry(into, remote.name, before, lambda mesh: _entry_of(mesh, remote.name) == entry,
                   f"{remote.name}'s entry in {into.name}'s spec.clusters was changed by someone else meanwhile; "
                   "left as it is now")

    return undo


def _roll_back(undos: list[tuple[str, Undo]]) -> list[str]:
    """Undo in reverse order; every undo is tried. Returns what could not be undone."""
    failed = []
    for what, undo in reversed(undos):
        try:
            undo()
        except KubeError as exc:
            failed.append(f"{what}: {exc}")
    return failed


def connect(source: Side, destination: Side, both_ways: bool = True, per_peer: bool = True) -> None:
    """``per_peer=False``: copy each side's ``spec.access.tls`` Secret (one identity shared by every
    peer) even where a CA is at hand; for stores made without `clustermesh certs` (the lab's
    --processes mode)."""
    if source.name == destination.name:
        raise ConnectError(f"both sides are cluster {source.name}: names must differ across the mesh")
    if source.id == destination.id:
        raise ConnectError(f"{source.name} and {destination.name} both use cluster ID {source.id}")
    with contextlib.ExitStack() as stack:
        try:
            cas = {side.name: stack.enter_context(store_ca(side.kube, side.name, side.pki_dir)) if per_peer else None
                   for side in (source, destination)}
        except (CertsError, KubeError) as exc:
            raise ConnectError(str(exc)) from exc
        _connect(source, destination, both_ways, cas)


def _connect(source: Side, destination: Side, both_ways: bool, cas: dict[str, StoreCA | None]) -> None:
    # Check both directions first: a refused connect changes nothing on either side.
    forward = check_remote(source, destination, cas[destination.name])
    backward = check_remote(destination, source, cas[source.name]) if both_ways else None
    plan = [(source, destination, forward)]
    if backward is not None:
        plan.append((destination, source, backward))
    # Readers and Secrets first (harmless alone), then the spec changes back to back.
    steps = [("reader", into, remote, checked) for into, remote, checked in plan if cas[remote.name] is not None]
    steps += [("secret", into, remote, checked) for into, remote, checked in plan]
    steps += [("entry", into, remote, checked) for into, remote, checked in plan]
    issued: dict[tuple[str, str], dict[str, bytes]] = {}
    done: list[tuple[str, Undo]] = []
    for kind, into, remote, checked in steps:
        undo: Undo | None
        try:
            if kind == "reader":
                what = f"reader {into.name} in {remote.name}'s store"
                ca = cas[remote.name]
                assert ca is not None
                issued[into.name, remote.name], undo = add_reader(remote.kube, remote.name, ca, into.name)
            elif kind == "secret":
                what = f"Secret {SECRETS_NAMESPACE}/{copied_secret_name(remote.name)} in {into.name}"
                entry, data = checked
                undo = copy_secret(into, remote, (entry, issued.get((into.name, remote.name), data)))
            else:
                what = f"{remote.name} in {into.name}'s spec.clusters"
                undo = add_remote(into, remote, checked)
        except (KubeError, CertsError) as exc:
            failed = _roll_back(done)
            if failed:
                raise ConnectError(
                    f"writing {what} failed ({exc}); undoing the earlier writes failed too: "
                    f"{'; '.join(failed)}. Fix these by hand (kubectl get clustermesh,secret -o yaml), "
                    "or run `clustermesh disconnect` with the same flags, then connect again"
                ) from exc
            left = "both sides are" if both_ways else f"{source.name} is"
            raise ConnectError(
                f"writing {what} failed ({exc}); {left} as before. Fix the cause and run connect again"
            ) from exc
        if undo is not None:
            done.append((what, undo))


def forget_remote(into: Side, remote: str) -> list[str]:
    """Remove ``remote`` from ``into``: its spec.clusters entry first (agents stop using it),
    then the access Secret connect copied (only ours: named and labelled by connect).
    Returns what was changed."""
    changed = []
    if _set_entry(into, remote, None, lambda mesh: True, ""):
        changed.append(f"removed {remote} from {into.name}'s spec.clusters")
    name = copied_secret_name(remote)
    secret = into.kube.read_secret(SECRETS_NAMESPACE, name)
    if secret is not None and secret.labels.get(REMOTE_LABEL) == remote:
        into.kube.delete_secret(SECRETS_NAMESPACE, name, secret.resource_version)
        changed.append(f"deleted Secret {SECRETS_NAMESPACE}/{name} in {into.name}")
    return changed


def disconnect(source: Side, destination: Side, both_ways: bool = True) -> list[str]:
    """Undo :func:`connect`; returns what was changed (empty: they were not connected).

    Not all or nothing: every step is safe to repeat, so after a failure the same
    command finishes the job."""
    if source.name == destination.name:
        raise ConnectError(f"both sides are cluster {source.name}: nothing to disconnect")
    changed = forget_remote(source, destination.name)
    # The source no longer reads the destination: its reader there is revoked.
    changed += revoke(destination, source.name)
    if both_ways:
        try:
            changed += forget_remote(destination, source.name)
            changed += revoke(source, destination.name)
        except (KubeError, ConnectError) as exc:
            done = f"{'; '.join(changed)}; " if changed else ""
            raise ConnectError(f"{done}{destination.name} failed: {exc}; run disconnect again") from exc
    return changed


def revoke(store: Side, peer: str) -> list[str]:
    """Shut ``peer``'s reader out of ``store``'s store (identity.revoke_reader); returns what changed."""
    try:
        with store_ca(store.kube, store.name, store.pki_dir) as ca:
            changed, warnings = revoke_reader(store.kube, store.name, ca, peer)
    except (CertsError, KubeError) as exc:
        raise ConnectError(f"revoking {peer} in {store.name}: {exc}") from exc
    for warning in warnings:
        log.warning("%s", warning)
    return changed


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


def _load_pair(args: argparse.Namespace) -> tuple[Side, Side]:
    source = load_side(KubeClient(args.kubeconfig, args.context), args.clustermesh, _path(args.pki_dir))
    destination = load_side(
        KubeClient(args.destination_kubeconfig or args.kubeconfig, args.destination_context),
        args.destination_clustermesh, _path(args.destination_pki_dir),
    )
    return source, destination


def run_revoke(args: argparse.Namespace) -> int:
    try:
        store = load_side(KubeClient(args.kubeconfig, args.context), args.clustermesh, _path(args.pki_dir))
        changed = revoke(store, args.peer)
    except (KubeError, ConnectError) as exc:
        print(f"clustermesh revoke: {exc}", file=sys.stderr)
        return 1
    if not changed:
        print(f"{args.peer} holds no reader in {store.name}'s store; nothing to do")
        return 0
    for line in changed:
        print(line)
    print(f"{args.peer} can no longer read {store.name}'s store (the store pods apply it when the kubelet "
          "refreshes their Secrets, about a minute); its spec.clusters entries are unchanged")
    return 0


def run_connect(args: argparse.Namespace) -> int:
    try:
        source, destination = _load_pair(args)
        connect(source, destination, both_ways=not args.one_way)
    except (KubeError, ConnectError) as exc:
        print(f"clustermesh connect: {exc}", file=sys.stderr)
        return 1
    arrow = "->" if args.one_way else "<->"
    print(f"connected {source.name} {arrow} {destination.name}")
    return 0


def run_disconnect(args: argparse.Namespace) -> int:
    try:
        source, destination = _load_pair(args)
        changed = disconnect(source, destination, both_ways=not args.one_way)
    except (KubeError, ConnectError) as exc:
        print(f"clustermesh disconnect: {exc}", file=sys.stderr)
        return 1
    arrow = "->" if args.one_way else "<->"
    if not changed:
        print(f"{source.name} {arrow} {destination.name} is not connected; nothing to do")
        return 0
    for line in changed:
        print(line)
    print(f"disconnected {source.name} {arrow} {destination.name}")
    return 0
