"""A remote cluster as the local ClusterMesh names it (``RemoteConfig``, made from a ``spec.clusters``
entry and its Secret) and the rules that refuse a remote before anything is dialled
(``mesh_problems``: bad or colliding names and IDs). Used by the agent, the operator, ``connect`` and
``status`` alike."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clustermesh import schema
from clustermesh.kvstore import Endpoint, KVClient
from clustermesh.private_files import write_private
from clustermesh.schema import SchemaError


@dataclass(frozen=True)
class RemoteConfig:
    """A remote cluster as the local ClusterMesh object names it."""

    name: str
    id: int
    endpoints: tuple[str, ...]
    """``access.endpoints`` in order: the first until it fails, then the next."""
    ca_cert: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        """The first endpoint: what a person is told about."""
        return self.endpoints[0]

    def client(self, timeout: float = 5.0) -> KVClient:
        """A client of this remote's store (nothing is dialled before its first call)."""
        return KVClient([Endpoint.parse(e, self.ca_cert, self.cert_file, self.key_file) for e in self.endpoints],
                        timeout=timeout, user=self.user, password=self.password)


def remote_config_from_spec(kube: Any, spec: dict[str, Any], secrets_dir: Path, default_namespace: str) -> RemoteConfig:
    """A ``spec.clusters[]`` entry of the ClusterMesh -> RemoteConfig. The TLS Secret
    (``ca.crt``, ``tls.crt``, ``tls.key``, optional ``username``/``password``) is read
    with ``kube.get_secret`` and its files written under ``secrets_dir``."""
    ca = cert = key = user = password = None
    tls = spec.get("tls") or {}
    if tls.get("secretName"):
        data = kube.get_secret(tls.get("secretNamespace") or default_namespace, tls["secretName"])
        folder = secrets_dir / spec["name"]
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        paths = {}
        for name in ("ca.crt", "tls.crt", "tls.key"):
            if name in data:
                write_private(folder / name, data[name])  # created 0600, never looser for a moment
                paths[name] = str(folder / name)
        ca, cert, key = paths.get("ca.crt"), paths.get("tls.crt"), paths.get("tls.key")
        user = data["username"].decode() if "username" in data else None
        password = data["password"].decode() if "password" in data else None
    endpoints = tuple(str(e) for e in spec.get("endpoints") or ())
    if not endpoints:
        raise ValueError(f"remote {spec['name']}: no endpoints; give spec.clusters[].endpoints")
    return RemoteConfig(spec["name"], int(spec["id"]), endpoints, ca, cert, key, user, password)


def mesh_problems(
    local_name: str, local_id: int, remotes: Iterable[RemoteConfig], max_cluster_id: int = schema.MAX_CLUSTER_ID
) -> dict[str, str]:
    """Remotes that must be refused (name -> why): bad or colliding names and IDs, IDs above
    what this mesh allows (``max_cluster_id``: 255, or 511 when configured so). Pure."""
    refused: dict[str, str] = {}
    seen_ids: dict[int, str] = {local_id: local_name}
    seen_names = {local_name}
    for remote in remotes:
        try:
            schema.validate_cluster_name(remote.name)
            schema.validate_cluster_id(remote.id, max_cluster_id)
        except SchemaError as exc:
            refused[remote.name] = str(exc)
            continue
        if remote.name in seen_names:
            refused[remote.name] = f"cluster name {remote.name} is used twice in the mesh"
        elif remote.id in seen_ids:
            refused[remote.name] = f"cluster ID {remote.id} is already used by {seen_ids[remote.id]}"
        else:
            seen_ids[remote.id] = remote.name
            seen_names.add(remote.name)
    return refused
