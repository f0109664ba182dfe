"""A minimal Kubernetes REST client for tests and benchmarks: create, patch and delete objects on a
local kube-apiserver over one kept-alive connection (kubectl costs ~0.2 s a call, too slow for bursts of
thousands). Not product code: the product and the lab use clustermesh.kube."""

from __future__ import annotations

import http.client
import json
import ssl
from typing import Any
from urllib.parse import urlparse


class KubeAPIError(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"{status}: {body[:500]}")
        self.status = status


class KubeAPI:
    def __init__(self, url: str, token: str, ca_file: str) -> None:
        parsed = urlparse(url)
        self.host, self.port = parsed.hostname or "127.0.0.1", parsed.port or 443
        self.token = token
        self.ctx = ssl.create_default_context(cafile=ca_file)
        self._conn: http.client.HTTPSConnection | None = None
        self._slice_version: str | None = None

    @classmethod
    def for_control_plane(cls, cp: Any) -> KubeAPI:
        return cls(cp.url, cp.token, str(cp.pki.cert_path))

    def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> Any:
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        if payload is not None:
            headers["Content-Type"] = content_type
        for attempt in range(2):
            if self._conn is None:
                self._conn = http.client.HTTPSConnection(self.host, self.port, context=self.ctx, timeout=30)
            try:
                self._conn.request(method, path, payload, headers)
                resp = self._conn.getresponse()
                data = resp.read().decode()
                break
            except (http.client.HTTPException, OSError):
                self._conn.close()
                self._conn = None
                if attempt:
                    raise
        if resp.status >= 300:
            raise KubeAPIError(resp.status, data)
        return json.loads(data) if data else None

    # ------------------------------------------------------------ paths

    def slice_version(self) -> str:
        if self._slice_version is None:
            group = self.request("GET", "/apis/discovery.k8s.io")
            self._slice_version = group["preferredVersion"]["version"]
        return self._slice_version

    def path(self, kind: str, namespace: str | None = None, name: str | None = None) -> str:
        bases = {
            "Namespace": "/api/v1/namespaces",
            "Node": "/api/v1/nodes",
            "Service": f"/api/v1/namespaces/{namespace}/services",
            "EndpointSlice": f"/apis/discovery.k8s.io/{self.slice_version()}/namespaces/{namespace}/endpointslices",
            "ServiceExport": f"/apis/multicluster.x-k8s.io/v1alpha1/namespaces/{namespace}/serviceexports",
            "ServiceImport": f"/apis/multicluster.x-k8s.io/v1alpha1/namespaces/{namespace}/serviceimports",
        }
        base = bases[kind]
        return f"{base}/{name}" if name else base

    # ------------------------------------------------------------ verbs

    def create(self, obj: dict[str, Any]) -> Any:
        if obj["kind"] == "EndpointSlice":
            obj = {**obj, "apiVersion": f"discovery.k8s.io/{self.slice_version()}"}
        meta = obj["metadata"]
        return self.request("POST", self.path(obj["kind"], meta.get("namespace")), obj)

    def patch(self, kind: str, namespace: str | None, name: str, patch: dict[str, Any]) -> Any:
        return self.request(
            "PATCH", self.path(kind, namespace, name), patch, "application/merge-patch+json"
        )

    def delete(self, kind: str, namespace: str | None, name: str) -> None:
        try:
            self.request("DELETE", self.path(kind, namespace, name))
        except KubeAPIError as exc:
            if exc.status != 404:
                raise

    def get(self, kind: str, namespace: str | None, name: str) -> Any:
        return self.request("GET", self.path(kind, namespace, name))
