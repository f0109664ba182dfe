"""The volume manager of the lab's kubelet: the ConfigMaps and Secrets pods name (fetched and cached),
each pod's volumes written the way a kubelet's AtomicWriter writes them and kept following their
sources, the bound service-account tokens, the bind mounts of a container, and the mount points the
node agent had to make on the host."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from clustermesh.lab.node import spec
from clustermesh.lab.node.api import APIError, NodeAPI
from clustermesh.lab.node.records import Obj

if TYPE_CHECKING:
    from clustermesh.lab.node.pod_worker import PodWorker

log = logging.getLogger("clustermesh.lab.node")


def token_key(source: Obj) -> tuple[str, int]:
    return str(source.get("audience") or ""), int(source.get("expirationSeconds", 3600))

def write_projected(target: Path, files: dict[str, bytes], mode: int = 0o644) -> bool:
    """Make ``target`` hold ``files`` the way a kubelet's AtomicWriter does: each version in its
    own hidden folder, one rename of the ``..data`` link switching every file at once, and each
    top-level name a link through ``..data``. A reader never sees a new certificate beside an old
    key (etcd's grpc-proxy, started between two file writes, once died of such a pair). Returns
    whether anything changed."""
    data = target / "..data"
    if data.is_dir() and _holds(data, files):
        return False
    version = target / f"..{time.time_ns()}"
    for rel, content in files.items():
        path = version / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        path.chmod(mode)
    version.mkdir(parents=True, exist_ok=True)  # a volume with no files still gets its version
    link = target / "..data_tmp"
    link.unlink(missing_ok=True)
    link.symlink_to(version.name)
    link.replace(data)
    tops = {rel.split("/", 1)[0] for rel in files}
    for top in tops:
        entry = target / top
        if entry.is_symlink():
            continue
        if entry.is_dir():
            shutil.rmtree(entry)
        elif entry.exists():
            entry.unlink()
        entry.symlink_to(f"..data/{top}")
    for entry in target.iterdir():
        if entry.name.startswith(".."):
            if entry.name not in ("..data", version.name) and entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
        elif entry.name not in tops and not entry.name.startswith("."):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    return True


def _holds(folder: Path, files: dict[str, bytes]) -> bool:
    try:
        present = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
        return present == set(files) and all((folder / rel).read_bytes() == v for rel, v in files.items())
    except OSError:
        return False


def write_volume(target: Path, volume: Obj, files: dict[str, bytes]) -> None:
    source = volume.get("configMap") or volume.get("secret") or volume.get("projected") or {}
    mode = int(source.get("defaultMode", 0o644)) & 0o777
    write_projected(target, files, mode)


def remove_made_path(path: Path) -> None:
    """Remove a mount point the agent made on the host: empty files and folders only, so
    nothing anyone else put there since is lost."""
    if path.is_file() and not path.is_symlink():
        if path.stat().st_size == 0:
            path.unlink()
        return
    if not path.is_dir():
        return
    for root, dirs, files in os.walk(path, topdown=False):
        for f in files:
            fp = Path(root, f)
            with contextlib.suppress(OSError):
                if fp.stat().st_size == 0:
                    fp.unlink()
        for d in dirs:
            with contextlib.suppress(OSError):
                Path(root, d).rmdir()
    with contextlib.suppress(OSError):
        path.rmdir()


class VolumeManager:
    """The node's volumes: the ConfigMap and Secret cache (``sources``, filled by ``prefetch``) and, per
    pod, its volumes made at start and refreshed while it runs."""

    def __init__(self, api: NodeAPI, capacity: dict[str, str], made_paths_file: Path) -> None:
        self.api = api
        self.capacity = capacity
        self.made_paths_file = made_paths_file
        self.sources: dict[tuple[str, str, str], dict[str, bytes] | None] = {}

    # -------------------------------------------------------------- ConfigMaps and Secrets

    def lookup(self, kind: str, namespace: str, name: str) -> dict[str, bytes] | None:
        return self.sources.get((kind, namespace, name))

    async def prefetch(self, pod: Obj) -> None:
        """Fetch (again) every ConfigMap and Secret the pod's volumes and env name."""
        ns = pod["metadata"].get("namespace", "default")
        for kind, name in sorted(spec.references(pod)):
            await self.fetch(kind, ns, name)

    async def fetch(self, kind: str, namespace: str, name: str) -> None:
        plural = {"ConfigMap": "configmaps", "Secret": "secrets"}[kind]
        obj = await self.api.get_or_none(f"/api/v1/namespaces/{namespace}/{plural}/{name}")
        data = None
        if obj is not None:
            data = spec.decode_configmap(obj) if kind == "ConfigMap" else spec.decode_secret(obj)
        self.sources[(kind, namespace, name)] = data

    # -------------------------------------------------------------- a pod's volumes

    @staticmethod
    def volume_dir(worker: PodWorker, name: str) -> Path:
        return worker.dir / "volumes" / name

    async def make(self, worker: PodWorker) -> None:
        """Every volume of the pod, before its first container starts."""
        await self.prefetch(worker.pod)
        tokens = await self._service_account_tokens(worker)
        for vol in worker.pod["spec"].get("volumes") or []:
            target = self.volume_dir(worker, vol["name"])
            if "hostPath" in vol:
                hp = vol["hostPath"]
                if hp.get("type") == "DirectoryOrCreate":
                    Path(hp["path"]).mkdir(parents=True, exist_ok=True)
                continue
            files = spec.volume_files(vol, worker.pod, self.lookup, capacity=self.capacity,
                                      token=lambda src: tokens[token_key(src)])
            target.mkdir(parents=True, exist_ok=True)
            if files is not None:
                write_volume(target, vol, files)

    async def refresh(self, worker: PodWorker) -> None:
        """ConfigMap, Secret, downwardAPI and projected volumes follow their sources while the
        pod runs, as a kubelet's do (rotated credentials reach a running container); a
        service-account token stays the one written at start."""
        await self.prefetch(worker.pod)
        for vol in worker.pod["spec"].get("volumes") or []:
            if not any(kind in vol for kind in ("configMap", "secret", "downwardAPI", "projected")):
                continue
            target = self.volume_dir(worker, vol["name"])

            def token_on_disk(sat: Obj, target: Path = target) -> bytes:
                return (target / str(sat.get("path", "token"))).read_bytes()

            try:
                files = spec.volume_files(vol, worker.pod, self.lookup, capacity=self.capacity, token=token_on_disk)
            except (spec.ConfigError, OSError) as exc:  # e.g. the Secret was deleted: keep what is there
                log.debug("[%s] volume %s not refreshed: %s", worker.key, vol["name"], exc)
                continue
            if files is not None and target.is_dir():
                write_volume(target, vol, files)

    async def refresh_loop(self, workers: Callable[[], Iterable[PodWorker]], period: float = 10.0) -> None:
        while True:
            await asyncio.sleep(period)
            for w in list(workers()):
                if w.sandbox_ready and not w.deleting.is_set():
                    try:
                        await self.refresh(w)
                    except (APIError, OSError) as exc:
                        log.warning("[%s] refreshing volumes: %s", w.key, exc)

    async def _service_account_tokens(self, worker: PodWorker) -> dict[tuple[str, int], bytes]:
        """A bound token from the API server's TokenRequest for every projected
        ``serviceAccountToken`` source of the pod, by (audience, expiry)."""
        tokens: dict[tuple[str, int], bytes] = {}
        sa = worker.pod["spec"].get("serviceAccountName") or "default"
        for vol in worker.pod["spec"].get("volumes") or []:
            for src in (vol.get("projected") or {}).get("sources", []):
                if "serviceAccountToken" not in src or token_key(src["serviceAccountToken"]) in tokens:
                    continue
                sat = src["serviceAccountToken"]
                request = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {
                    "audiences": [sat["audience"]] if sat.get("audience") else None,
                    "expirationSeconds": int(sat.get("expirationSeconds", 3600)),
                    "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": worker.name, "uid": worker.uid}}}
                answer = await self.api.request(
                    "POST", f"/api/v1/namespaces/{worker.namespace}/serviceaccounts/{sa}/token", request)
                tokens[token_key(sat)] = str(answer["status"]["token"]).encode()
        return tokens

    # -------------------------------------------------------------- a container's mounts

    def mounts_for(self, worker: PodWorker, container: Obj) -> list[Obj]:
        mounts = []
        volumes = {v["name"]: v for v in worker.pod["spec"].get("volumes") or []}
        for vm in container.get("volumeMounts") or []:
            vol = volumes.get(vm["name"])
            if vol is None:
                raise spec.ConfigError(f"volumeMount {vm['name']!r} names no volume of the pod")
            source = Path(vol["hostPath"]["path"]) if "hostPath" in vol else self.volume_dir(worker, vm["name"])
            if vm.get("subPath"):
                source = source / vm["subPath"]
                if not source.exists():
                    source.mkdir(parents=True)
            target = Path(vm["mountPath"])
            if not target.exists() and not target.is_symlink():
                self.make_mount_point(target, source.is_dir())
            mounts.append({"source": str(source), "target": str(target), "readOnly": bool(vm.get("readOnly"))})
        worker.save()
        return mounts

    def make_mount_point(self, target: Path, directory: bool) -> None:
        """A mountPath the host does not have (e.g. /var/run/secrets/...): the bind mount in the
        pod's private mount namespace needs it. Made once for every pod that wants it, recorded
        here, and removed by the lab's teardown (never with one pod: others may use it)."""
        top = target
        while not top.parent.exists():
            top = top.parent
        if directory:
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch(exist_ok=True)
        made = json.loads(self.made_paths_file.read_text()) if self.made_paths_file.exists() else []
        if str(top) not in made:
            made.append(str(top))
            self.made_paths_file.write_text(json.dumps(made))
