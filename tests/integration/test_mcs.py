"""MCS-API (KEP-1645) against a real kube-apiserver (with its controller-manager), etcd and grpc-proxy:
this cluster's operator and a remote cluster ("far", its store behind a proxy, written as its
operator writes it). Follows the mcs-api conformance suite's required cases: the import appears
where the namespace exists and goes with the last export, its ClusterSetIP is the derived Service's
ClusterIP here, ports are the union, a conflict goes to the oldest export and the other export says
so, session affinity is copied, headless imports have no IP, an unexported Service gets nothing."""

from __future__ import annotations

import json
import subprocess
import uuid
from typing import Any

import pytest

from clustermesh import schema
from clustermesh.cluster import mcs
from clustermesh.kvstore import KVClient
from clustermesh.schema import McsPort, ServiceExportRecord
from tests.integration.test_cache import patch_clusters
from tests.integration.test_operator import (  # noqa: F401
    _assert_eq,
    _assert_true,
    api,
    cluster,
    crds,
    endpoint_slice,
    operators,
    service,
)
from tests.kubeapi import KubeAPI, KubeAPIError
from tests.waiting import eventually

pytestmark = pytest.mark.integration

FAR, FAR_ID = "far", 42


def far_store(kv: KVClient, exports: list[ServiceExportRecord]) -> None:
    """far's store as its operator leaves it: cluster-config with the capability, synced markers."""
    kv.put("far/" + schema.cluster_config_key(FAR), schema.ClusterConfig(FAR_ID, service_exports_enabled=True).encode())
    for record in exports:
        kv.put("far/" + record.key, record.encode())
    for prefix in (schema.SERVICES_PREFIX, schema.NODES_PREFIX, schema.SERVICE_EXPORTS_PREFIX):
        kv.put("far/" + schema.synced_key(FAR, prefix), schema.rfc3339_now())


def get(kube: KubeAPI, kind: str, ns: str, name: str) -> Any:
    try:
        return kube.get(kind, ns, name)
    except KubeAPIError as exc:
        if exc.status == 404:
            return None
        raise


def conditions(export: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in (export.get("status") or {}).get("conditions") or []}


@pytest.fixture
def namespaces(api: KubeAPI):  # noqa: F811
    made: list[str] = []

    def make() -> str:
        name = f"t-{uuid.uuid4().hex[:8]}"
        api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
        made.append(name)
        return name

    yield make
    for name in made:
        api.delete("Namespace", None, name)


def test_exports_and_imports_follow_the_set(
    api: KubeAPI, kv: KVClient, etcd_server, etcd_proxy_factory, cluster: str, operators, kubeconfig: str,  # noqa: F811
    namespaces, crds: None,  # noqa: F811
) -> None:
    ns, other_ns = namespaces(), namespaces()
    # far exported ns/web earlier than we will, with a port of its own and one that conflicts with ours;
    # and a Service in a namespace this cluster does not have.
    far_web = ServiceExportRecord(FAR, ns, "web", "2020-01-01T00:00:00Z",
                                  ports=(McsPort(80, "TCP", "http"), McsPort(9090, "TCP", "metrics"))).validate()
    far_gone = ServiceExportRecord(FAR, "no-such-namespace", "web", "2020-01-01T00:00:00Z",
                                   ports=(McsPort(80, "TCP", "http"),)).validate()
    far_affinity = ServiceExportRecord(FAR, other_ns, "sticky", "2020-01-01T00:00:00Z",
                                       ports=(McsPort(443, "TCP", "https"),), session_affinity="ClientIP",
                                       session_affinity_timeout=120).validate()
    far_store(kv, [far_web, far_gone, far_affinity])
    proxy = etcd_proxy_factory(etcd_server.url, namespace="far/")

    api.create(service(ns, "web", ports=[{"name": "http", "port": 8080, "targetPort": 8080, "protocol": "TCP"}]))
    api.create(endpoint_slice(ns, "web-a", "web", [("10.244.1.10", True)]))
    api.create(service(ns, "private"))  # never exported: nothing of it appears
    operators()
    mesh = f"mesh-{cluster}"
    eventually(lambda: _assert_true(subprocess.run(["kubectl", "--kubeconfig", kubeconfig, "get", "clustermesh",
                                                    mesh], capture_output=True).returncode == 0), timeout=30)
    patch_clusters(kubeconfig, mesh, [{"name": FAR, "id": FAR_ID, "endpoints": [proxy.url]}])

    # 1. far alone exports: the import appears here (where the namespace exists), no EndpointSlice of ours.
    derived = mcs.derived_name(ns, "web")

    def imported_from_far() -> dict[str, Any]:
        imp = get(api, "ServiceImport", ns, "web")
        assert imp is not None
        svc = get(api, "Service", ns, derived)
        assert svc is not None and "selector" not in svc["spec"]
        assert svc["metadata"]["annotations"][mcs.GLOBAL_ANNOTATION] == "true"
        assert svc["metadata"]["annotations"][mcs.SHARED_ANNOTATION] == "false"
        assert imp["spec"]["ips"] == [svc["spec"]["clusterIP"]]
        assert imp["spec"]["type"] == "ClusterSetIP"
        assert imp.get("status", {}).get("clusters") == [{"cluster": FAR}], imp
        assert imp["metadata"]["annotations"][mcs.DERIVED_SERVICE_ANNOTATION] == derived
        assert [p["name"] for p in imp["spec"]["ports"]] == ["http", "metrics"]
        return imp

    eventually(imported_from_far, timeout=60)
    sticky = eventually(lambda: _assert_not_none(get(api, "ServiceImport", other_ns, "sticky")), timeout=30)
    assert sticky["spec"]["sessionAffinity"] == "ClientIP"
    assert sticky["spec"]["sessionAffinityConfig"] == {"clientIP": {"timeoutSeconds": 120}}
    sticky_name = mcs.derived_name(other_ns, "sticky")
    sticky_svc = eventually(lambda: _assert_not_none(get(api, "Service", other_ns, sticky_name)), timeout=30)
    assert sticky_svc["spec"]["sessionAffinity"] == "ClientIP"
    assert get(api, "ServiceImport", ns, "private") is None
    assert get(api, "Service", ns, mcs.derived_name(ns, "private")) is None

    # 2. We export too, later and with port http defined differently: far's definition wins,
    # our ServiceExport says so, and the import lists both clusters.
    api.create({"apiVersion": mcs.API_VERSION, "kind": "ServiceExport", "metadata": {"name": "web", "namespace": ns}})

    def ours_in_store() -> dict[str, Any]:
        raw = kv.get(schema.service_export_key(cluster, ns, "web"))
        assert raw is not None
        return json.loads(raw)

    record = eventually(ours_in_store, timeout=30)
    assert record["ports"] == [{"name": "http", "port": 8080, "protocol": "TCP"}] and record["type"] == "ClusterSetIP"
    config = json.loads(kv.get(schema.cluster_config_key(cluster)) or "{}")
    assert config["capabilities"]["serviceExportsEnabled"] is True
    assert kv.get(schema.synced_key(cluster, schema.SERVICE_EXPORTS_PREFIX)) is not None

    def both_export() -> None:
        imp = get(api, "ServiceImport", ns, "web")
        assert imp.get("status", {}).get("clusters") == sorted([{"cluster": cluster}, {"cluster": FAR}],
                                                               key=lambda c: c["cluster"])
        assert {p["name"]: p["port"] for p in imp["spec"]["ports"]} == {"http": 80, "metrics": 9090}
        export = get(api, "ServiceExport", ns, "web")
        conds = conditions(export)
        assert {"Valid", "Ready", "Conflict"} <= set(conds), conds
        assert conds["Valid"]["status"] == "True" and conds["Ready"]["status"] == "True"
        assert conds["Conflict"]["status"] == "True" and conds["Conflict"]["reason"] == "PortConflict"
        assert f"cluster {FAR}" in conds["Conflict"]["message"]
        svc = get(api, "Service", ns, derived)
        assert svc["metadata"]["annotations"][mcs.SHARED_ANNOTATION] == "true"

    eventually(both_export, timeout=30)

    # Our endpoints are the derived Service's too, in slices labelled as KEP-1645 says.
    def copied(addresses: set[str]) -> None:
        found = api.request("GET", f"/apis/discovery.k8s.io/{api.slice_version()}/namespaces/{ns}/endpointslices"
                            f"?labelSelector=kubernetes.io/service-name={derived}")["items"]
        got = {a for s in found for e in s["endpoints"] for a in e["addresses"]}
        assert got == addresses
        for s in found:
            assert s["metadata"]["labels"][mcs.LABEL_SOURCE_CLUSTER] == cluster
            assert s["metadata"]["labels"][mcs.LABEL_SERVICE_NAME] == "web"

    eventually(lambda: copied({"10.244.1.10"}), timeout=30)
    api.patch("EndpointSlice", ns, "web-a", {"endpoints": [
        {"addresses": ["10.244.1.11"], "conditions": {"ready": True}}]})
    eventually(lambda: copied({"10.244.1.11"}), timeout=30)

    # 3. An export of a Service that does not exist is not valid, and offers nothing.
    api.create({"apiVersion": mcs.API_VERSION, "kind": "ServiceExport",
                "metadata": {"name": "missing", "namespace": ns}})
    eventually(lambda: _assert_eq(conditions(get(api, "ServiceExport", ns, "missing")).get("Valid", {}).get("reason"),
                                  "NoService"), timeout=30)
    assert kv.get(schema.service_export_key(cluster, ns, "missing")) is None
    assert get(api, "ServiceImport", ns, "missing") is None

    # 4. We stop exporting: our record and our slices go, the import stays for far.
    api.delete("ServiceExport", ns, "web")
    eventually(lambda: _assert_true(kv.get(schema.service_export_key(cluster, ns, "web")) is None), timeout=30)
    eventually(imported_from_far, timeout=30)
    eventually(lambda: copied(set()), timeout=30)

    # 5. far stops too: the last export gone, the import and the derived Service go.
    kv.delete("far/" + far_web.key)
    eventually(lambda: _assert_true(get(api, "ServiceImport", ns, "web") is None
                                    and get(api, "Service", ns, derived) is None), timeout=30)
    assert get(api, "ServiceImport", other_ns, "sticky") is not None  # the rest stays


def test_a_headless_export_imports_without_an_ip(
    api: KubeAPI, kv: KVClient, cluster: str, operators, namespaces, crds: None,  # noqa: F811
) -> None:
    ns = namespaces()
    headless = service(ns, "db", ports=[{"name": "pg", "port": 5432, "protocol": "TCP"}])
    headless["spec"]["clusterIP"] = "None"
    api.create(headless)
    api.create({"apiVersion": mcs.API_VERSION, "kind": "ServiceExport", "metadata": {"name": "db", "namespace": ns}})
    operators()

    def imported() -> None:
        imp = get(api, "ServiceImport", ns, "db")
        assert imp is not None and imp["spec"]["type"] == "Headless"
        assert imp["spec"].get("ips", []) == []
        svc = get(api, "Service", ns, mcs.derived_name(ns, "db"))
        assert svc is not None and svc["spec"]["clusterIP"] == "None"

    eventually(imported, timeout=60)


def _assert_not_none(value: Any) -> Any:
    assert value is not None
    return value
