"""``clustermesh status``: the mesh as this cluster sees it, checked live.

Reads the ClusterMesh object (identity, the operator's conditions), then looks
at every remote store once, the way an agent judges it but without reading
record values: the cluster-config, the synced markers, and key counts (etcd's
count_only). That keeps it quick against remotes with 10,000 services, and
never prints a remote's record problems (the agent and operator log those).

stdout holds only the table or the JSON document (shape in ``status_view``);
logs go to stderr. Exit code 0 only when every remote is ready; with
``--wait``, after polling until they are or ``--timeout`` runs out.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from clustermesh import schema
from clustermesh.agent.status_view import (
    CertificateFinding,
    RemoteFinding,
    agent_views,
    cached_finding,
    not_ready,
    render_text,
    status_document,
)
from clustermesh.kube import KubeClient, KubeError, Network, unroutable_networks
from clustermesh.kvstore import Endpoint, KVStoreError
from clustermesh.store.readiness import not_ready_reason
from clustermesh.store.remote_config import RemoteConfig, mesh_problems, remote_config_from_spec

log = logging.getLogger(__name__)

AGENT_SELECTOR = "app.kubernetes.io/name=clustermesh-agent"  # deploy/base/agent.yaml
PROBE_TIMEOUT = 5.0  # seconds per etcd request: a dead remote must not hold up the others for long
POLL_INTERVAL = 1.0
MAX_PARALLEL_PROBES = 16


def probe_remote(config: RemoteConfig, timeout: float = PROBE_TIMEOUT,
                 max_cluster_id: int = schema.MAX_CLUSTER_ID,
                 unroutable: Sequence[tuple[Network, str]] = ()) -> RemoteFinding:
    """One look at a remote store: what an agent needs to call it ready, and key counts.

    Three small reads and two counts; no record value is fetched."""
    name = config.name
    try:
        hosts = [Endpoint.parse(e, config.ca_cert).host for e in config.endpoints]
        for host in hosts:
            marked = _unroutable(host, unroutable)
            if marked is not None:
                # The kubeconfig says this address is not reachable from here (a lab's underlay): a
                # connection would leave the machine by its default route.
                return RemoteFinding(name, config.id, config.endpoint, error=(
                    f"{host} is not to be dialled from here ({marked}); see kubectl get clustermesh "
                    "(the operator's view)"))
        with config.client(timeout) as client:
            config_value = client.get(schema.cluster_config_key(name))
            marker_prefix = f"{schema.SYNCED_PREFIX}/{name}/"
            synced = [key.removeprefix(marker_prefix) for key in client.list_prefix(marker_prefix).items]
            services = client.count_prefix(schema.services_cluster_prefix(name))
            nodes = client.count_prefix(schema.nodes_cluster_prefix(name))
    except KVStoreError as exc:
        return RemoteFinding(name, config.id, config.endpoint, error=str(exc))
    reason = not_ready_reason(name, config.id, config_value, synced, max_cluster_id)
    return RemoteFinding(name, config.id, config.endpoint, not_ready=reason, services=services, nodes=nodes)


def collect(kube: KubeClient, mesh: Mapping[str, Any], secrets_dir: Path, secrets_namespace: str,
            store_namespace: str = "clustermesh-system",
            unroutable: Sequence[tuple[Network, str]] = ()) -> dict[str, Any]:
    """The status document for ``mesh``: every ``spec.clusters`` entry looked at once (in parallel)."""
    spec: Mapping[str, Any] = mesh.get("spec") or {}
    local = spec.get("localCluster") or {}
    cached = bool((spec.get("cache") or {}).get("enabled"))
    findings: list[RemoteFinding] = []
    configs: list[RemoteConfig] = []
    for entry in spec.get("clusters") or []:
        try:
            configs.append(remote_config_from_spec(kube, entry, secrets_dir, secrets_namespace))
        except (KubeError, KeyError, ValueError, IndexError, OSError) as exc:
            if cached:  # agents do not use it; only its certificates' expiry goes unchecked
                log.info("%s's access Secret: %s", entry.get("name"), exc)
            else:
                findings.append(RemoteFinding(str(entry.get("name")), _int(entry.get("id")), None,
                                              error=f"cannot read its connection settings: {exc}"))
    max_id = int(spec.get("maxConnectedClusters") or schema.MAX_CLUSTER_ID)
    agents = None
    if cached:
        # The agents read every remote from this cluster's store pods: their view, through the API
        # (it works wherever kubectl does), is the one that counts; nothing is dialled from here.
        entries = [RemoteConfig(str(e.get("name")), _int(e.get("id")) or 0, ("-",)) for e in spec.get("clusters") or []]
        refused = mesh_problems(str(local.get("name")), int(local.get("id") or 0), entries, max_id)
        reported = {str(r.get("name")): r for r in (mesh.get("status") or {}).get("remotes") or []}
        for rc in entries:
            findings.append(RemoteFinding(rc.name, rc.id, "cache", error=f"refused: {refused[rc.name]}")
                            if rc.name in refused else cached_finding(rc.name, rc.id, reported.get(rc.name)))
        try:
            agents = agent_views(kube.list_pods(store_namespace, AGENT_SELECTOR))
        except KubeError as exc:
            log.info("agents not checked: %s", exc)
        return status_document(mesh, findings, certificates(kube, configs, store_namespace), agents=agents)
    refused = mesh_problems(str(local.get("name")), int(local.get("id") or 0), configs, max_id)
    usable = []
    for rc in configs:
        if rc.name in refused:
            findings.append(RemoteFinding(rc.name, rc.id, rc.endpoint, error=f"refused: {refused[rc.name]}"))
        else:
            usable.append(rc)
    if usable:
        with ThreadPoolExecutor(min(MAX_PARALLEL_PROBES, len(usable)), thread_name_prefix="status-probe") as pool:
            findings += pool.map(lambda rc: probe_remote(rc, max_cluster_id=max_id, unroutable=unroutable),
                                 usable)
    return status_document(mesh, findings, certificates(kube, configs, store_namespace))


def certificates(kube: KubeClient, configs: list[RemoteConfig], store_namespace: str) -> list[CertificateFinding]:
    """Every certificate the mesh depends on that this user can read: each remote's CA and client
    certificate (as connect copied them), and this cluster's store certificates and readers'."""
    from clustermesh import certs, pki

    found: list[CertificateFinding] = []

    def add(name: str, pem: bytes) -> None:
        try:
            found.extend(CertificateFinding(e.name, e.not_after) for e in pki.expiries(name, pem))
        except ValueError:
            log.warning("%s is not a PEM certificate; not checked for expiry", name)

    for rc in configs:
        for label, path in (("ca.crt", rc.ca_cert), ("tls.crt", rc.cert_file)):
            if path:
                add(f"remote {rc.name} {label}", Path(path).read_bytes())
    try:
        tls = kube.read_secret(store_namespace, certs.TLS_SECRET)
        users = kube.read_secret(store_namespace, certs.USERS_SECRET)
        readers = sorted(users.data) if users else []
        access = {r: kube.read_secret(store_namespace, certs.access_secret_name(r)) for r in readers}
    except KubeError as exc:  # a user without Secret access in the store's namespace
        log.info("store certificates not checked: %s", exc)
        return found
    if tls is not None:
        for key in sorted(tls.data):
            if key.endswith(".crt"):
                add(f"store {key}", tls.data[key])
    for reader, secret in access.items():
        if secret is not None and "tls.crt" in secret.data:
            add(f"reader {reader} tls.crt", secret.data["tls.crt"])
    return found


def _unroutable(host: str, networks: Sequence[tuple[Network, str]]) -> str | None:
    """The reason the kubeconfig gives for not dialling ``host``, or None."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    return next(((reason or f"the kubeconfig marks {net} unroutable") for net, reason in networks
                 if address.version == net.version and address in net), None)


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def run_status(args: argparse.Namespace) -> int:
    try:
        kube = KubeClient(args.kubeconfig, args.context)
    except KubeError as exc:
        print(f"clustermesh status: {exc}", file=sys.stderr)
        return 1
    deadline = time.monotonic() + args.timeout
    unroutable = unroutable_networks(args.kubeconfig, args.context)
    reported: list[str] = []
    with tempfile.TemporaryDirectory(prefix="clustermesh-status-") as tmp:
        while True:
            # Read the ClusterMesh again on every round: a --wait may be waiting for a connect.
            try:
                mesh = kube.get_mesh(args.clustermesh)
            except KubeError as exc:
                print(f"clustermesh status: {exc}", file=sys.stderr)
                return 1
            if mesh is None:
                print(f"clustermesh status: no ClusterMesh {args.clustermesh!r}; apply one first", file=sys.stderr)
                return 1
            doc = collect(kube, mesh, Path(tmp), args.secrets_namespace, unroutable=unroutable)
            if doc["ready"] or not args.wait or time.monotonic() >= deadline:
                break
            if not_ready(doc) != reported:  # progress on stderr, once per change
                reported = not_ready(doc)
                log.info("waiting for %s", "; ".join(reported))
            time.sleep(min(POLL_INTERVAL, max(0.0, deadline - time.monotonic())))
    if args.output == "json":
        print(json.dumps(doc, indent=2))
    else:
        print(render_text(doc))
    if doc["ready"]:
        return 0
    waiting = "; ".join(not_ready(doc))
    if args.wait:
        print(f"clustermesh status: not ready after {args.timeout:g}s: {waiting}", file=sys.stderr)
    else:
        print(f"clustermesh status: not ready: {waiting} (--wait polls until ready)", file=sys.stderr)
    return 1
