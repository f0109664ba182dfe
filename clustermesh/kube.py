"""Direct Kubernetes API calls: listings and watches of Services, EndpointSlices and
Nodes, the ClusterMesh object and its status, Secrets. The only module that imports
the kubernetes client; kopf (the operator's watches) logs in with the same credentials."""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlencode

import kubernetes
import urllib3
import yaml
from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)

GROUP = "clustermesh.io"
VERSION = "v1alpha1"
PLURAL = "clustermeshes"


# Copies of remote clusters' access Secrets (`clustermesh connect` writes them): a namespace with
# nothing else, so the operator and agents may read Secrets there and nowhere else (deploy/).
REMOTE_SECRETS_NAMESPACE = "clustermesh-remotes"


@dataclass(frozen=True)
class SecretState:
    """A Secret as connect/disconnect need it: data, labels, and the version to write against."""

    data: dict[str, bytes]
    labels: dict[str, str]
    resource_version: str


class KubeError(Exception):
    pass


class KubeConflict(KubeError):
    """The object changed since it was read, or exists already (HTTP 409): read it again and retry."""


class KubeNotFound(KubeError):
    """The object (or its kind: ``body`` says which) does not exist (HTTP 404)."""

    def __init__(self, message: str, body: str = "") -> None:
        super().__init__(message)
        self.body = body


def _reason(exc: ApiException) -> str:
    """The API server's own words (a Status object's message) when it sent them."""
    try:
        message = json.loads(exc.body or "").get("message")
    except (ValueError, AttributeError):
        message = None
    return f"{exc.status} {exc.reason}" + (f": {message}" if message else "")


def _status_error(what: str, exc: ApiException, conflict: str | None = None) -> KubeError:
    """Our error for an answer that is not a success: 404 KubeNotFound, 409 KubeConflict (with
    ``conflict`` as its message when given), anything else KubeError, naming what was being done."""
    if exc.status == 404:
        return KubeNotFound(f"{what}: {_reason(exc)}", str(exc.body or ""))
    if exc.status == 409:
        return KubeConflict(conflict or f"{what}: {_reason(exc)}")
    return KubeError(f"{what}: {_reason(exc)}")


@contextlib.contextmanager
def _api_errors(what: str, conflict: str | None = None) -> Iterator[None]:
    """Our errors (``_status_error``) for the API calls inside, and for a server out of reach."""
    try:
        yield
    except ApiException as exc:
        raise _status_error(what, exc, conflict) from exc
    except (OSError, urllib3.exceptions.HTTPError) as exc:  # refused, TLS, timeouts
        raise KubeError(f"{what}: {exc}; is the API server reachable?") from exc


UNROUTABLE_EXTENSION = "clustermesh.io/unroutable"
"""A kubeconfig cluster extension: ``{"networks": [CIDR, ...], "reason": "..."}``, addresses of that cluster
that the machine running kubectl must never dial (``clustermesh lab`` writes it: its node addresses exist
only inside the lab's network namespaces, and from the host a connection would leave by the default route)."""

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def unroutable_networks(kubeconfig: str | None, context: str | None) -> list[tuple[Network, str]]:
    """The networks the kubeconfig's cluster entry (of ``context``, else the current one) marks with
    :data:`UNROUTABLE_EXTENSION`, each with its reason. A kubeconfig without it, or one that cannot be
    read here (in a pod), marks nothing."""
    paths = [kubeconfig] if kubeconfig else [
        p for p in os.environ.get("KUBECONFIG", str(Path.home() / ".kube" / "config")).split(os.pathsep) if p]
    docs = []
    for path in paths:
        try:
            docs.append(yaml.safe_load(Path(path).read_text()) or {})
        except (OSError, yaml.YAMLError):
            continue
    wanted = context or next((d.get("current-context") for d in docs if d.get("current-context")), None)
    cluster = next((c.get("context", {}).get("cluster") for d in docs for c in d.get("contexts") or []
                    if c.get("name") == wanted), None)
    out: list[tuple[Network, str]] = []
    for d in docs:
        for entry in d.get("clusters") or []:
            if entry.get("name") != cluster:
                continue
            for ext in (entry.get("cluster") or {}).get("extensions") or []:
                if ext.get("name") != UNROUTABLE_EXTENSION:
                    continue
                body = ext.get("extension") or {}
                for cidr in body.get("networks") or []:
                    try:
                        out.append((ipaddress.ip_network(str(cidr)), str(body.get("reason") or "")))
                    except ValueError:
                        log.warning("kubeconfig: %s network %r is not a CIDR; ignored", UNROUTABLE_EXTENSION, cidr)
            return out
    return out


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
        self._slice_version: str | None = None
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

    def _headers(self) -> dict[str, str]:
        """JSON, plus the credentials the kubeconfig gave (a bearer token, when there is one)."""
        headers = {"Accept": "application/json"}
        settings = cast(dict[str, dict[str, str]], self.configuration.auth_settings())
        for auth in settings.values():
            if auth.get("in") == "header" and auth.get("value"):
                headers[auth["key"]] = auth["value"]
        return headers

    def _get_json(self, path: str, query: list[tuple[str, Any]] | None = None) -> dict[str, Any]:
        """A raw GET through the client's REST layer (its TLS and auth), returning JSON.

        Raw because EndpointSlices are v1beta1 on 1.20 and v1 today, and current
        clients no longer ship typed v1beta1 APIs."""
        url = self.configuration.host + path + (f"?{urlencode(query)}" if query else "")
        headers = self._headers()
        with _api_errors(f"GET {path}"):
            resp = self.api.rest_client.request(  # type: ignore[no-untyped-call]
                "GET", url, headers=headers, _request_timeout=60
            )
        data = resp.data if getattr(resp, "data", None) is not None else resp.read()
        if not 200 <= resp.status < 300:  # this client returns some failures instead of raising them
            raise _status_error(f"GET {path}", ApiException(http_resp=resp))
        return cast(dict[str, Any], json.loads(data))

    def request_json(self, method: str, path: str, body: Any = None,
                     content_type: str = "application/json") -> dict[str, Any]:
        """A raw write (POST, PUT, PATCH, DELETE) through the client's REST layer; the answer as JSON.
        404 raises KubeNotFound and 409 KubeConflict, as reads do."""
        url = self.configuration.host + path
        headers = {**self._headers(), "Content-Type": content_type}
        with _api_errors(f"{method} {path}"):
            resp = self.api.rest_client.request(  # type: ignore[no-untyped-call]
                method, url, headers=headers, body=body, _request_timeout=60
            )
        data = resp.data if getattr(resp, "data", None) is not None else resp.read()
        if not 200 <= resp.status < 300:
            raise _status_error(f"{method} {path}", ApiException(http_resp=resp))
        return cast(dict[str, Any], json.loads(data)) if data else {}

    def list_path(self, path: str, label_selector: str | None = None) -> list[dict[str, Any]]:
        """Every item of a collection (paginated), optionally with a label selector."""
        items: list[dict[str, Any]] = []
        cont: str | None = None
        while True:
            query: list[tuple[str, Any]] = [("limit", 500)]
            if label_selector:
                query.append(("labelSelector", label_selector))
            if cont:
                query.append(("continue", cont))
            page = self._get_json(path, query)
            items += page.get("items") or []
            cont = (page.get("metadata") or {}).get("continue")
            if not cont:
                return items

    def serves(self, group_version: str, resource: str) -> bool:
        """Whether the API server serves ``resource`` in ``group_version`` (a CRD is installed)."""
        try:
            found = self._get_json(f"/apis/{group_version}")
        except KubeNotFound:
            return False
        return any(r.get("name") == resource for r in found.get("resources") or [])

    def endpointslice_version(self) -> str:
        """The served version the API server prefers (v1beta1 on 1.20, v1 on current clusters);
        asked once per client, since every listing and watch needs it."""
        if self._slice_version is None:
            group = self._get_json("/apis/discovery.k8s.io")
            self._slice_version = str(group["preferredVersion"]["version"])
        return self._slice_version

    def watch_objects(
        self, kind: str, resource_version: str | None, timeout_seconds: int = 300, name: str | None = None
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """Events (ADDED/MODIFIED/DELETED, object) of ``kind`` cluster-wide after
        ``resource_version`` (only the object called ``name`` when given). Ends after
        ``timeout_seconds``; raises :class:`KubeError` when the version is too old (HTTP 410:
        list again)."""
        if kind == "Node":
            base = "/api/v1/nodes"
        elif kind == "ClusterMesh":
            base = f"/apis/{GROUP}/{VERSION}/{PLURAL}"
        elif kind == "Service":
            base = "/api/v1/services"
        else:
            base = f"/apis/discovery.k8s.io/{self.endpointslice_version()}/endpointslices"
        query: list[tuple[str, Any]] = [("watch", "1"), ("timeoutSeconds", timeout_seconds),
                                        ("allowWatchBookmarks", "true")]
        if resource_version:
            query.append(("resourceVersion", resource_version))
        if name:
            query.append(("fieldSelector", f"metadata.name={name}"))
        cfg = self.configuration
        headers = self._headers()
        # urllib3 directly: the generated clients differ across versions in how (and
        # whether) they stream a response body.
        pool = urllib3.PoolManager(
            cert_reqs="CERT_REQUIRED" if cfg.verify_ssl else "CERT_NONE",
            ca_certs=cfg.ssl_ca_cert, cert_file=cfg.cert_file, key_file=cfg.key_file,
        )
        try:
            resp = pool.request(
                "GET", f"{cfg.host}{base}?{urlencode(query)}", headers=headers, preload_content=False,
                timeout=urllib3.Timeout(connect=10, read=timeout_seconds + 30),
            )
        except urllib3.exceptions.HTTPError as exc:
            raise KubeError(f"watch {base}: {exc}") from exc
        try:
            if resp.status != 200:
                raise KubeError(f"watch {base}: {resp.status} {resp.reason}")
            buffer = b""
            for chunk in resp.stream(65536):
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    obj = event.get("object") or {}
                    if event.get("type") == "ERROR":
                        code = obj.get("code")
                        raise KubeError(f"watch {base}: {code} {obj.get('message', '')}; list again")
                    yield str(event.get("type")), obj
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise KubeError(f"watch {base}: {exc}") from exc
        finally:
            resp.release_conn()
            pool.clear()

    def get(self, path: str) -> dict[str, Any]:
        """One object by its API path (KubeNotFound when it does not exist)."""
        return self._get_json(path)

    def _get_json_or_none(self, path: str) -> dict[str, Any] | None:
        """``_get_json``, with None for an object that does not exist."""
        try:
            return self._get_json(path)
        except KubeNotFound:
            return None

    def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        """Pods matching a label selector (one page: a DaemonSet's pods)."""
        data = self._get_json(f"/api/v1/namespaces/{namespace}/pods", [("labelSelector", selector)])
        return list(data.get("items") or [])

    def get_peering(self, name: str) -> dict[str, Any] | None:
        """kopf's ClusterKopfPeering object (None when absent)."""
        return self._get_json_or_none(f"/apis/kopf.dev/v1/clusterkopfpeerings/{name}")

    def get_lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        """A coordination.k8s.io/v1 Lease (None when absent)."""
        return self._get_json_or_none(f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/{name}")

    def write_lease(self, namespace: str, name: str, spec: dict[str, Any], resource_version: str | None) -> None:
        """Create the Lease (``resource_version`` None) or replace the one read at that
        version; a Lease changed meanwhile by another holder raises KubeConflict."""
        coordination = kubernetes.client.CoordinationV1Api(self.api)
        metadata: dict[str, Any] = {"name": name, "namespace": namespace}
        if resource_version is not None:
            metadata["resourceVersion"] = resource_version
        # A plain dict: the typed V1Lease would send its datetimes without the microseconds MicroTime needs.
        body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": metadata, "spec": spec}
        with _api_errors(f"writing Lease {namespace}/{name}", conflict=f"Lease {namespace}/{name} changed meanwhile"):
            if resource_version is None:
                coordination.create_namespaced_lease(namespace, body)  # type: ignore[arg-type]
            else:
                coordination.replace_namespaced_lease(name, namespace, body)  # type: ignore[arg-type]

    def put_secret(
        self, namespace: str, name: str, data: dict[str, bytes], labels: dict[str, str] | None = None
    ) -> None:
        """Create or replace an Opaque Secret."""
        core = kubernetes.client.CoreV1Api(self.api)
        body = kubernetes.client.V1Secret(
            metadata=kubernetes.client.V1ObjectMeta(name=name, namespace=namespace, labels=labels or {}),
            type="Opaque", data={k: base64.b64encode(v).decode() for k, v in data.items()},
        )
        what = f"writing Secret {namespace}/{name}"
        try:
            with _api_errors(what):
                core.create_namespaced_secret(namespace, body)
        except KubeConflict:  # it exists: replace it
            with _api_errors(what):
                core.replace_namespaced_secret(name, namespace, body)

    def ensure_namespace(self, name: str) -> None:
        """Create the namespace unless it exists (deploy/ makes it; a bare cluster may not have it)."""
        core = kubernetes.client.CoreV1Api(self.api)
        with contextlib.suppress(KubeConflict), _api_errors(f"creating namespace {name}"):
            core.create_namespace(kubernetes.client.V1Namespace(metadata=kubernetes.client.V1ObjectMeta(name=name)))

    def read_secret(self, namespace: str, name: str) -> SecretState | None:
        """The Secret's data, labels and resourceVersion; None when there is none."""
        core = kubernetes.client.CoreV1Api(self.api)
        try:
            with _api_errors(f"reading Secret {namespace}/{name}"):
                obj = core.read_namespaced_secret(name, namespace)
        except KubeNotFound:
            return None
        data = {k: base64.b64decode(v) for k, v in (obj.data or {}).items()}
        meta = obj.metadata or kubernetes.client.V1ObjectMeta()
        return SecretState(data, dict(meta.labels or {}), str(meta.resource_version or ""))

    def delete_secret(self, namespace: str, name: str, resource_version: str) -> None:
        """Delete the Secret only if it is still at ``resource_version``; already gone is fine."""
        core = kubernetes.client.CoreV1Api(self.api)
        options = kubernetes.client.V1DeleteOptions(
            preconditions=kubernetes.client.V1Preconditions(resource_version=resource_version))
        with contextlib.suppress(KubeNotFound), _api_errors(
                f"deleting Secret {namespace}/{name}",
                conflict=f"Secret {namespace}/{name} changed meanwhile; left as it is now"):
            core.delete_namespaced_secret(name, namespace, body=options)

    def patch_mesh_spec(self, name: str, spec: dict[str, Any], resource_version: str | None = None) -> None:
        """Merge-patch the spec; with ``resource_version``, only if nobody changed the object since."""
        body: dict[str, Any] = {"spec": spec}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        with _api_errors(f"updating ClusterMesh {name}",
                         conflict=f"ClusterMesh {name} changed while connecting; run the command again"):
            self.custom.patch_cluster_custom_object(GROUP, VERSION, PLURAL, name, body)

    def get_secret(self, namespace: str, name: str) -> dict[str, bytes]:
        data = self._get_json(f"/api/v1/namespaces/{namespace}/secrets/{name}").get("data") or {}
        return {k: base64.b64decode(v) for k, v in data.items()}

    def list_objects(self, kind: str, namespaces: Sequence[str] = ()) -> tuple[list[dict[str, Any]], str | None]:
        """All objects of ``kind`` (Service, EndpointSlice, Node), paginated, and the list's
        resourceVersion. With ``namespaces``, only those (the version is the smallest seen)."""
        if kind == "Node":
            bases = ["/api/v1/nodes"]
        elif kind == "Service":
            bases = [f"/api/v1/namespaces/{ns}/services" for ns in namespaces] or ["/api/v1/services"]
        else:
            version = self.endpointslice_version()
            group = f"/apis/discovery.k8s.io/{version}"
            bases = [f"{group}/namespaces/{ns}/endpointslices" for ns in namespaces] or [f"{group}/endpointslices"]
        items: list[dict[str, Any]] = []
        versions: list[int] = []
        for base in bases:
            cont: str | None = None
            first_rv: str | None = None
            while True:
                query: list[tuple[str, Any]] = [("limit", 500)]
                if cont:
                    query.append(("continue", cont))
                page = self._get_json(base, query)
                items += page.get("items") or []
                meta = page.get("metadata") or {}
                first_rv = first_rv or meta.get("resourceVersion")
                cont = meta.get("continue")
                if not cont:
                    break
            if first_rv and first_rv.isdigit():
                versions.append(int(first_rv))
        return items, (str(min(versions)) if versions and len(versions) == len(bases) else None)

    def get_mesh(self, name: str) -> dict[str, Any] | None:
        try:
            with _api_errors(f"reading ClusterMesh {name}"):
                return cast(dict[str, Any], self.custom.get_cluster_custom_object(GROUP, VERSION, PLURAL, name))
        except KubeNotFound as exc:
            # The kind itself missing is answered with a 404 too, in other words.
            if "could not find the requested resource" in exc.body or "page not found" in exc.body:
                raise KubeError("the ClusterMesh CRD is not installed; run: kubectl apply -f crds/") from exc
            return None

    def create_mesh(self, name: str, cluster_name: str, cluster_id: int) -> dict[str, Any]:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "ClusterMesh",
            "metadata": {"name": name},
            "spec": {"localCluster": {"name": cluster_name, "id": cluster_id}},
        }
        with _api_errors(f"creating ClusterMesh {name}"):
            return cast(dict[str, Any], self.custom.create_cluster_custom_object(GROUP, VERSION, PLURAL, body))

    def patch_mesh_status(self, name: str, status: dict[str, Any]) -> None:
        """Merge-patch the status. The API client sends "" as null, which a string field
        rejects; an empty value therefore becomes an explicit null (removing the field)."""
        body = {k: (None if v == "" else v) for k, v in status.items()}
        with _api_errors(f"updating ClusterMesh {name} status"):
            self.custom.patch_cluster_custom_object_status(GROUP, VERSION, PLURAL, name, {"status": body})


def _in_cluster() -> bool:
    import os

    return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
