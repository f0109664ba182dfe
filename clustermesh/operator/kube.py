"""The operator's direct Kubernetes API calls (beside kopf's watches): the
ClusterMesh object and its status. The only module that imports the kubernetes client."""

from __future__ import annotations

import logging
from typing import Any, cast

import kubernetes
from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)

GROUP = "clustermesh.io"
VERSION = "v1alpha1"
PLURAL = "clustermeshes"


class KubeError(Exception):
    pass


class KubeClient:
    def __init__(self, kubeconfig: str | None = None, context: str | None = None) -> None:
        self.configuration = kubernetes.client.Configuration()
        try:
            if kubeconfig or context or not _in_cluster():
                kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
                    config_file=kubeconfig, context=context, client_configuration=self.configuration
                )
            else:
                kubernetes.config.load_incluster_config(  # type: ignore[no-untyped-call]
                    client_configuration=self.configuration
                )
        except (kubernetes.config.ConfigException, OSError) as exc:
            raise KubeError(
                f"cannot load Kubernetes credentials ({exc}); pass --kubeconfig/--context or run in a pod"
            ) from exc
        self.api = kubernetes.client.ApiClient(self.configuration)
        self.custom = kubernetes.client.CustomObjectsApi(self.api)

    def connection(self) -> dict[str, Any]:
        """What kopf needs to log in the same way (server, CA, token or client cert)."""
        cfg = self.configuration
        token = None
        auth = (cfg.api_key or {}).get("authorization") or (cfg.api_key or {}).get("BearerToken")
        if auth:
            token = auth.split(" ", 1)[1] if auth.lower().startswith("bearer ") else auth
        return {
            "server": cfg.host,
            "ca_path": cfg.ssl_ca_cert,
            "insecure": not cfg.verify_ssl,
            "token": token,
            "certificate_path": cfg.cert_file,
            "private_key_path": cfg.key_file,
        }

    def get_mesh(self, name: str) -> dict[str, Any] | None:
        try:
            return cast(dict[str, Any], self.custom.get_cluster_custom_object(GROUP, VERSION, PLURAL, name))
        except ApiException as exc:
            if exc.status == 404:
                if "could not find the requested resource" in (exc.body or "") or "page not found" in (
                    exc.body or ""
                ):
                    raise KubeError(
                        "the ClusterMesh CRD is not installed; run: kubectl apply -f crds/"
                    ) from exc
                return None
            raise KubeError(f"reading ClusterMesh {name}: {exc.status} {exc.reason}") from exc

    def create_mesh(self, name: str, cluster_name: str, cluster_id: int) -> dict[str, Any]:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "ClusterMesh",
            "metadata": {"name": name},
            "spec": {"localCluster": {"name": cluster_name, "id": cluster_id}},
        }
        try:
            return cast(dict[str, Any], self.custom.create_cluster_custom_object(GROUP, VERSION, PLURAL, body))
        except ApiException as exc:
            raise KubeError(f"creating ClusterMesh {name}: {exc.status} {exc.reason}: {exc.body}") from exc

    def patch_mesh_status(self, name: str, status: dict[str, Any]) -> None:
        """Merge-patch the status. The API client sends "" as null, which a string field
        rejects; an empty value therefore becomes an explicit null (removing the field)."""
        body = {k: (None if v == "" else v) for k, v in status.items()}
        try:
            self.custom.patch_cluster_custom_object_status(GROUP, VERSION, PLURAL, name, {"status": body})
        except ApiException as exc:
            raise KubeError(f"updating ClusterMesh {name} status: {exc.status} {exc.reason}: {exc.body}") from exc


def _in_cluster() -> bool:
    import os

    return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
