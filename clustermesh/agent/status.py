"""``clustermesh status``: the mesh as this cluster sees it, checked live.

Reads the ClusterMesh object (identity, the operator's conditions), then
connects to every remote the way an agent would and reports whether it is
reachable and ready. Exit code 0 only when every remote is ready.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from clustermesh.agent.remote import RemoteCluster, mesh_problems, remote_config_from_spec
from clustermesh.kube import KubeClient, KubeError
from clustermesh.kvstore import KVStoreError


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def run_status(args: argparse.Namespace) -> int:
    try:
        kube = KubeClient(args.kubeconfig, args.context)
        mesh = kube.get_mesh(args.clustermesh)
    except KubeError as exc:
        print(f"clustermesh status: {exc}", file=sys.stderr)
        return 1
    if mesh is None:
        print(f"clustermesh status: no ClusterMesh {args.clustermesh!r}; apply one first", file=sys.stderr)
        return 1
    spec: dict[str, Any] = mesh.get("spec") or {}
    status: dict[str, Any] = mesh.get("status") or {}
    local = spec.get("localCluster") or {}
    conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    print(f"cluster {local.get('name')} (id {local.get('id')}): "
          f"store reachable={conditions.get('StoreReachable', 'Unknown')}, "
          f"synced={conditions.get('Synced', 'Unknown')}, "
          f"exported {status.get('exportedServices', 0)} services and {status.get('exportedNodes', 0)} nodes")
    clusters = spec.get("clusters") or []
    if not clusters:
        print("no remote clusters in the ClusterMesh")
        return 0
    with tempfile.TemporaryDirectory(prefix="clustermesh-status-") as tmp:
        configs = []
        rows = [["REMOTE", "ID", "ENDPOINT", "CONNECTED", "READY", "SERVICES", "NODES", "PROBLEM"]]
        for c in clusters:
            try:
                configs.append(remote_config_from_spec(kube, c, Path(tmp), args.secrets_namespace))
            except KubeError as exc:
                rows.append([str(c.get("name")), str(c.get("id")), "-", "no", "no", "-", "-", str(exc)])
        refused = mesh_problems(str(local.get("name")), int(local.get("id") or 0), configs)
        remotes = []
        for rc in configs:
            if rc.name in refused:
                continue
            try:
                remotes.append(RemoteCluster(rc).start())
            except KVStoreError as exc:
                refused[rc.name] = str(exc)
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline and not all(r.ready for r in remotes):
            time.sleep(0.1)
        for rc in configs:
            if rc.name in refused:
                rows.append([rc.name, str(rc.id), rc.endpoint, "-", "no", "-", "-", refused[rc.name]])
        for r in remotes:
            st = r.status()
            rows.append([r.name, str(r.config.id), r.config.endpoint, "yes" if st["connected"] else "no",
                         "yes" if st["ready"] else "no", str(st["services"]), str(st["nodes"]),
                         str(st.get("lastFailure", "") or ("" if st["ready"] else "no synced marker yet"))])
            r.stop()
    print(_table(rows))
    ok = not refused and len(remotes) == len(clusters) and all(r.ready for r in remotes)
    return 0 if ok else 1
