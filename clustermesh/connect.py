"""``clustermesh connect``: make two clusters remotes of each other.

Each cluster publishes how others reach it in its ClusterMesh ``spec.access``
(grpc-proxy endpoints, and a Secret with ca.crt, tls.crt, tls.key, username and
password). Connecting A and B copies B's access Secret into A as
``kube-system/clustermesh-remote-B`` and adds B to A's ``spec.clusters``, and
the other way round. Names and IDs must not collide anywhere in either mesh.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any

from clustermesh.agent.remote import RemoteConfig, mesh_problems
from clustermesh.kube import KubeClient, KubeError

SECRETS_NAMESPACE = "kube-system"


class ConnectError(Exception):
    pass


@dataclass
class Side:
    kube: KubeClient
    mesh_name: str
    mesh: dict[str, Any]

    @property
    def spec(self) -> dict[str, Any]:
        return dict(self.mesh.get("spec") or {})

    @property
    def name(self) -> str:
        return str((self.spec.get("localCluster") or {}).get("name"))

    @property
    def id(self) -> int:
        return int((self.spec.get("localCluster") or {}).get("id") or 0)


def load_side(kube: KubeClient, mesh_name: str) -> Side:
    mesh = kube.get_mesh(mesh_name)
    if mesh is None:
        raise ConnectError(f"no ClusterMesh {mesh_name!r} there; apply one with localCluster and access first")
    return Side(kube, mesh_name, mesh)


def remote_entry(remote: Side) -> tuple[dict[str, Any], dict[str, bytes] | None]:
    """The spec.clusters entry for ``remote`` and the content of its access Secret (read, not copied)."""
    access = remote.spec.get("access") or {}
    endpoints = access.get("endpoints") or []
    if not endpoints:
        raise ConnectError(f"cluster {remote.name} has no spec.access.endpoints: set its grpc-proxy URL first")
    entry: dict[str, Any] = {"name": remote.name, "id": remote.id, "endpoints": list(endpoints)}
    tls = access.get("tls") or {}
    if not tls.get("secretName"):
        return entry, None
    namespace = tls.get("secretNamespace") or SECRETS_NAMESPACE
    try:
        data = remote.kube.get_secret(namespace, tls["secretName"])
    except KubeError as exc:
        raise ConnectError(f"cluster {remote.name}'s access Secret {namespace}/{tls['secretName']}: {exc}") from exc
    entry["tls"] = {"secretName": f"clustermesh-remote-{remote.name}", "secretNamespace": SECRETS_NAMESPACE}
    return entry, data


def _others(into: Side, remote: Side) -> list[dict[str, Any]]:
    return [c for c in into.spec.get("clusters") or [] if c.get("name") != remote.name]


def check_remote(into: Side, remote: Side) -> tuple[dict[str, Any], dict[str, bytes] | None]:
    """Everything that can refuse the connection, before anything is written."""
    configs = [RemoteConfig(str(c["name"]), int(c["id"]), str(c["endpoints"][0])) for c in _others(into, remote)]
    configs.append(RemoteConfig(remote.name, remote.id, "-"))
    refused = mesh_problems(into.name, into.id, configs)
    if remote.name in refused:
        raise ConnectError(f"cannot add {remote.name} to {into.name}: {refused[remote.name]}")
    return remote_entry(remote)


def copy_secret(into: Side, remote: Side, checked: tuple[dict[str, Any], dict[str, bytes] | None]) -> None:
    entry, secret = checked
    if secret is not None:
        into.kube.put_secret(SECRETS_NAMESPACE, entry["tls"]["secretName"], secret,
                             labels={"clustermesh.io/remote": remote.name})


def add_remote(into: Side, remote: Side, checked: tuple[dict[str, Any], dict[str, bytes] | None]) -> None:
    entry, _secret = checked
    rv = (into.mesh.get("metadata") or {}).get("resourceVersion")
    into.kube.patch_mesh_spec(into.mesh_name, {"clusters": [*_others(into, remote), entry]}, rv)


def connect(source: Side, destination: Side, both_ways: bool = True) -> None:
    if source.name == destination.name:
        raise ConnectError(f"both sides are cluster {source.name}: names must differ across the mesh")
    if source.id == destination.id:
        raise ConnectError(f"{source.name} and {destination.name} both use cluster ID {source.id}")
    # Check both directions first: a refused connect changes nothing on either side.
    forward = check_remote(source, destination)
    backward = check_remote(destination, source) if both_ways else None
    # Secrets first (harmless alone), then the two spec changes back to back.
    copy_secret(source, destination, forward)
    if backward is not None:
        copy_secret(destination, source, backward)
    add_remote(source, destination, forward)
    if backward is not None:
        add_remote(destination, source, backward)


def run_connect(args: argparse.Namespace) -> int:
    try:
        source = load_side(KubeClient(args.kubeconfig, args.context), args.clustermesh)
        destination = load_side(
            KubeClient(args.destination_kubeconfig or args.kubeconfig, args.destination_context),
            args.destination_clustermesh,
        )
        connect(source, destination, both_ways=not args.one_way)
    except (KubeError, ConnectError) as exc:
        print(f"clustermesh connect: {exc}", file=sys.stderr)
        return 1
    arrow = "->" if args.one_way else "<->"
    print(f"connected {source.name} {arrow} {destination.name}; agents pick the change up on restart")
    return 0
