"""The lab's kubelet: registers a Node, renews its Lease, and runs the Pods bound to it.

One process per lab node, in the host namespace, acting on its node's namespaces:

- the Node object (labels, podCIDR, addresses, capacity, conditions, daemon endpoint) and
  its Lease in ``kube-node-lease``, renewed every 10 s;
- per Pod: a network namespace with an IP from the podCIDR and a veth to the node, a cgroup
  under the node's cgroup (so the node's socket-LB applies), volumes, /etc/hosts and
  /etc/resolv.conf, and one process per container started through ``sandbox.py``;
- probes (httpGet/tcpSocket from a socket made inside the pod's namespace, exec through the
  sandbox), restarts with crash-loop backoff, graceful deletion, the status a kubelet reports;
- a forwarder whose listening socket lives in the node namespace (127.0.0.1:<API port>) and
  whose upstream connections go to the API server on the host's 127.0.0.1, for kube-proxy
  and hostNetwork pods;
- an HTTPS server on 127.0.0.1 for the API server (``kubectl logs`` / ``exec``), server.py.

A restarted node agent adopts the pods it finds running (state in ``<state-dir>/pods``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import json
import logging
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from clustermesh.lab.netns import (
    API_VIP,
    LabPod,
    NetnsError,
    delete_netns,
    ip,
    kill_cgroup,
    remove_cgroup,
    socket_in_netns,
)
from clustermesh.lab.node import catalog, spec
from clustermesh.lab.node.api import APIError, NodeAPI
from clustermesh.lab.node.server import ContainerNotFound, NodeServer

log = logging.getLogger("clustermesh.lab.node")
Obj = dict[str, Any]
SANDBOX = [sys.executable, "-m", "clustermesh.lab.node.sandbox"]
LEASE_SECONDS = 40
RENEW_SECONDS = 10


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def micro_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def proc_start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


async def _until_closed(fd: int) -> None:
    """Wait for the other end of a pipe to close (every writer gone)."""
    loop = asyncio.get_running_loop()
    closed = asyncio.Event()

    def readable() -> None:
        try:
            if not os.read(fd, 64):
                closed.set()
        except BlockingIOError:
            pass

    os.set_blocking(fd, False)
    loop.add_reader(fd, readable)
    try:
        await closed.wait()
    finally:
        loop.remove_reader(fd)


def _token_key(source: Obj) -> tuple[str, int]:
    return str(source.get("audience") or ""), int(source.get("expirationSeconds", 3600))


# Where the lab's images run from: this venv, the checkout (an editable install) and the Python
# it was made from. A container's volume mounted above one of them must not hide it.
HOST_PROGRAM_PATHS = sorted({str(Path(sys.executable).parent.parent), str(Path(__file__).resolve().parents[3]),
                             sys.base_prefix})


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


def _write_volume(target: Path, volume: Obj, files: dict[str, bytes]) -> None:
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


@dataclass
class NodeConfig:
    name: str
    kubeconfig: str
    netns: str  # the node's network namespace
    address: str  # InternalIP on the underlay
    pod_cidr: str
    cgroup: Path  # the node's cgroup; pods get children
    state_dir: Path
    port: int  # this agent's HTTPS port on 127.0.0.1
    tls_cert: Path
    tls_key: Path
    client_ca: Path
    api_port: int  # the API server's port on the host's 127.0.0.1, forwarded inside the node
    pod_prefix: str  # pod namespace names start with this (the lab removes them by prefix)
    context: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    drain_delay: float = 1.0  # seconds between "not ready" and the stop signal, see terminate()
    max_pods: int = 110


@dataclass
class ContainerRecord:
    """What survives a node agent restart for one container."""

    pid: int = 0
    start: str = ""  # /proc start time of pid, so a reused pid is not mistaken for ours
    restarts: int = 0
    started_at: str = ""
    last_terminated: Obj | None = None
    stop_signal: int = signal.SIGTERM
    finished: Obj | None = None  # its final terminated state, once restartPolicy says it stays down


@dataclass
class PodRecord:
    uid: str
    namespace: str
    name: str
    netns: str
    veth: str
    ip: str
    containers: dict[str, ContainerRecord] = field(default_factory=dict)
    start_time: str = ""

    @classmethod
    def load(cls, path: Path) -> PodRecord:
        data = json.loads(path.read_text())
        data["containers"] = {k: ContainerRecord(**v) for k, v in data.get("containers", {}).items()}
        return cls(**data)


class Container:
    """One container of a pod: its process, probes, restarts and status."""

    def __init__(self, worker: PodWorker, spec_: Obj, record: ContainerRecord, init: bool = False) -> None:
        self.worker = worker
        self.init = init  # an init container: runs to completion before the others start
        self.spec = spec_
        self.name: str = spec_["name"]
        self.record = record
        self.state = spec.ContainerState(name=self.name, image=spec_.get("image", ""),
                                         restart_count=record.restarts, last_terminated=record.last_terminated)
        self.pid = 0
        self.env: dict[str, str] = {}
        self.workdir = "/"
        self.stopping = False
        self.exited = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.probe_tasks: list[asyncio.Task[None]] = []
        self.liveness_failed = asyncio.Event()

    @property
    def dir(self) -> Path:
        return self.worker.dir / "containers" / self.name

    @property
    def cgroup(self) -> Path:
        return self.worker.cgroup / self.name

    @property
    def log_path(self) -> Path:
        return self.worker.dir / f"{self.name}.log"

    def _changed(self) -> None:
        self.worker.status_dirty.set()

    # -------------------------------------------------------------- start

    async def _program(self) -> tuple[list[str], catalog.Program] | None:
        agent = self.worker.agent
        # The API server may not have our status yet: the pod's own addresses come from us.
        ips = {"podIP": self.worker.record.ip, "podIPs": [{"ip": self.worker.record.ip}],
               "hostIP": agent.cfg.address}
        pod = {**self.worker.pod, "status": {**self.worker.pod.get("status", {}), **ips}}
        try:
            env = spec.container_env(pod, self.spec, agent.lookup_cached, agent.services_of(self.worker.namespace),
                                     node_capacity=agent.capacity)
        except spec.ConfigError as exc:
            self.state.waiting = ("CreateContainerConfigError", str(exc))
            return None
        command, args = spec.command_line(self.spec, env)
        scratch = self.dir / "scratch"
        scratch.mkdir(parents=True, exist_ok=True)
        try:
            program = catalog.resolve(self.spec.get("image", ""), command, args, scratch)
        except catalog.ImageNotInCatalog as exc:
            self.state.waiting = ("ErrImagePull", str(exc))
            return None
        except catalog.CommandNotFound as exc:
            self.state.waiting = ("CreateContainerError", str(exc))
            return None
        full_env = {**program.env, **env}
        self.env = full_env
        self.workdir = self.spec.get("workingDir") or program.workdir
        return program.argv, program

    async def _spawn(self, argv: list[str], mounts: list[Obj]) -> int:
        """Start the container's main process; returns once it runs the program inside the pod
        (only then may probes and exec enter its namespaces)."""
        self.cgroup.mkdir(parents=True, exist_ok=True)
        kill_cgroup(self.cgroup)  # a copy an earlier agent started but did not record must not serve twice
        ready_r, ready_w = os.pipe()
        os.set_inheritable(ready_w, True)
        worker = self.worker
        launch = {"ready_fd": ready_w,
            "cgroup": str(self.cgroup), "netns": worker.record.netns,
            "hostname": worker.agent.cfg.name if worker.host_network else spec.pod_hostname(worker.pod)[0],
            "mounts": mounts, "etc": self.worker.etc_files(), "argv": argv, "env": self.env, "workdir": self.workdir,
            "keep": HOST_PROGRAM_PATHS,
        }
        self.dir.mkdir(parents=True, exist_ok=True)
        spec_path = self.dir / "launch.json"
        spec_path.write_text(json.dumps(launch))
        (self.dir / "env.json").write_text(json.dumps({"env": self.env, "workdir": self.workdir}))
        log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        null_fd = os.open(os.devnull, os.O_RDONLY)
        try:
            pid = os.posix_spawn(
                SANDBOX[0], [*SANDBOX, "run", "--spec", str(spec_path)], os.environ,
                file_actions=[(os.POSIX_SPAWN_DUP2, null_fd, 0), (os.POSIX_SPAWN_DUP2, log_fd, 1),
                              (os.POSIX_SPAWN_DUP2, log_fd, 2)],
                setsid=True,
            )
        finally:
            os.close(log_fd)
            os.close(null_fd)
            os.close(ready_w)
        try:
            await asyncio.wait_for(_until_closed(ready_r), 20)
        finally:
            os.close(ready_r)
        return pid

    async def _wait(self, pid: int, ours: bool) -> int:
        """Wait for pid to exit; its exit code as Kubernetes reports it (128 + signal)."""
        loop = asyncio.get_running_loop()
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            pidfd = -1
        if pidfd >= 0:
            done = asyncio.Event()
            loop.add_reader(pidfd, done.set)
            try:
                await done.wait()
            finally:
                loop.remove_reader(pidfd)
                os.close(pidfd)
        if not ours:
            return 137 if self.stopping else 255
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:
            return 255
        code = os.waitstatus_to_exitcode(status)
        return 128 - code if code < 0 else code

    async def run(self, adopt: bool) -> None:
        """Run the container for the pod's life; an unexpected error is logged, shown as the
        container's waiting reason, and the container is started again (never silently lost)."""
        while True:
            try:
                await self._run(adopt)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("[%s] container %s failed in the node agent", self.worker.key, self.name)
                kill_cgroup(self.cgroup)  # a process we lost track of must not serve twice
                self.exited.set()
                self.state.running_since, self.state.ready, self.state.started = None, False, False
                self.state.waiting = ("RunContainerError", f"node agent: {exc}")
                self._stop_probes()
                self._changed()
                adopt = False
                if self.stopping:
                    return
                await asyncio.sleep(5)

    async def _run(self, adopt: bool) -> None:
        policy = self.worker.pod["spec"].get("restartPolicy", "Always")
        if self.init:  # a kubelet retries a failed init container unless the pod says Never
            policy = "Never" if policy == "Never" else "OnFailure"
        if self.record.finished is not None:  # done before a node agent restart: it stays done
            self.state.terminated, self.state.waiting = self.record.finished, None
            self._changed()
            return
        while not self.stopping:
            ours = True
            if adopt and self.record.pid and proc_start_time(self.record.pid) == self.record.start:
                self.pid, ours = self.record.pid, False
                env_file = self.dir / "env.json"
                if env_file.exists():
                    data = json.loads(env_file.read_text())
                    self.env, self.workdir = data["env"], data.get("workdir", "/")
                log.info("[%s] adopted container %s (pid %d)", self.worker.key, self.name, self.pid)
            else:
                await self.worker.agent.prefetch(self.worker.pod)  # a ConfigMap may have come or changed
                prepared = await self._program()
                if prepared is None:
                    self._changed()
                    log.warning("[%s] %s: %s", self.worker.key, self.name, self.state.waiting)
                    await asyncio.sleep(min(30.0, 5.0 * (1 + self.record.restarts)))
                    continue
                argv, program = prepared
                self.record.stop_signal = program.stop_signal
                try:
                    mounts = self.worker.mounts_for(self.spec)
                except spec.ConfigError as exc:
                    self.state.waiting = ("CreateContainerConfigError", str(exc))
                    self._changed()
                    await asyncio.sleep(5)
                    continue
                if self.stopping:
                    break
                self.pid = await self._spawn(argv, mounts)
                self.record.pid, self.record.start = self.pid, proc_start_time(self.pid) or ""
                self.record.started_at = now()
                log.info("[%s] started container %s (pid %d): %s", self.worker.key, self.name, self.pid,
                         " ".join(argv))
            adopt = False
            self.worker.save()
            self.state.container_id = f"lab://{self.pid}"
            self.state.running_since = self.record.started_at or now()
            self.state.waiting = None
            self.state.terminated = None
            self.state.started = True
            # An adopted container keeps the readiness it had: a node agent restart must not
            # pull the pod out of its Services until the first probe runs.
            self.state.ready = (spec.probe(self.spec.get("readinessProbe")) is None
                                or (not ours and self._was_ready()))
            self.liveness_failed.clear()
            self.exited.clear()
            self._start_probes()
            self._changed()
            started = time.monotonic()
            waiter = asyncio.ensure_future(self._wait(self.pid, ours))
            liveness = asyncio.ensure_future(self.liveness_failed.wait())
            await asyncio.wait({waiter, liveness}, return_when=asyncio.FIRST_COMPLETED)
            reason_override = None
            if liveness.done() and not waiter.done():
                log.info("[%s] %s failed its liveness probe; restarting", self.worker.key, self.name)
                reason_override = "Error"
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, self.record.stop_signal)
                await asyncio.wait({waiter}, timeout=self.worker.grace_period())
                if not waiter.done():
                    kill_cgroup(self.cgroup)
            code = await waiter
            liveness.cancel()
            kill_cgroup(self.cgroup)  # what the main process left behind dies with it
            self.exited.set()
            self._stop_probes()
            terminated = {"exitCode": code, "reason": reason_override or ("Completed" if code == 0 else "Error"),
                          "startedAt": self.state.running_since, "finishedAt": now(),
                          "containerID": self.state.container_id}
            self.state.running_since = None
            self.state.ready = False
            self.state.started = False
            self.state.terminated = terminated
            self.record.pid = 0
            if self.stopping:
                self._changed()
                break
            log.info("[%s] container %s exited with %d", self.worker.key, self.name, code)
            if not spec.should_restart(policy, code):
                self.record.finished = terminated
                self.worker.save()
                self._changed()
                break
            # A container that ran for 10 minutes starts its backoff afresh, as a kubelet's does.
            delay = spec.backoff(0 if time.monotonic() - started > 600 else self.record.restarts)
            self.record.last_terminated = terminated
            self.state.last_terminated = terminated
            if delay:
                self.state.terminated = None
                self.state.waiting = ("CrashLoopBackOff",
                                      f"back-off {delay:.0f}s restarting failed container={self.name} "
                                      f"pod={self.worker.name}_{self.worker.namespace}({self.worker.uid})")
                self._changed()
                await asyncio.sleep(delay)
            self.record.restarts += 1
            self.state.restart_count = self.record.restarts
            with contextlib.suppress(OSError):
                self.log_path.replace(self.worker.dir / f"{self.name}.previous.log")

    def enter_argv(self, command: list[str]) -> list[str]:
        """argv that runs ``command`` inside this container (kubectl exec, exec probes, hooks)."""
        if not self.pid or self.exited.is_set():
            raise ContainerNotFound(f'container "{self.name}" in pod "{self.worker.name}" is not running')
        return [*SANDBOX, "enter", "--pid", str(self.pid), "--cgroup", str(self.cgroup),
                "--netns", self.worker.record.netns, "--env-file", str(self.dir / "env.json"), "--", *command]

    def _was_ready(self) -> bool:
        return any(cs.get("name") == self.name and cs.get("ready")
                   for cs in self.worker.server_status.get("containerStatuses") or [])

    async def stop(self, grace: float) -> None:
        """Stop signal, then SIGKILL of the container's cgroup after ``grace`` seconds."""
        if not self.pid or self.exited.is_set():
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, self.record.stop_signal)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.exited.wait(), grace)
        if not self.exited.is_set():
            kill_cgroup(self.cgroup)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.exited.wait(), 5)

    # -------------------------------------------------------------- probes

    def _start_probes(self) -> None:
        startup = spec.probe(self.spec.get("startupProbe"))
        if startup is not None:  # as a kubelet: the other probes wait until the startup probe succeeds
            self.probe_tasks.append(asyncio.create_task(self._probe_loop("startupProbe", startup),
                                                        name=f"{self.name}-startupProbe"))
        else:
            self._start_running_probes()

    def _start_running_probes(self) -> None:
        for kind in ("readinessProbe", "livenessProbe"):
            p = spec.probe(self.spec.get(kind))
            if p is not None:
                self.probe_tasks.append(asyncio.create_task(self._probe_loop(kind, p), name=f"{self.name}-{kind}"))

    def _stop_probes(self) -> None:
        for t in self.probe_tasks:
            t.cancel()
        self.probe_tasks = []

    async def _probe_loop(self, kind: str, p: spec.Probe) -> None:
        await asyncio.sleep(p.initial_delay)
        successes = failures = 0
        while not self.stopping:  # a terminating container's readiness is the node agent's, not the probe's
            try:
                ok = await self.worker.agent.run_probe(self, p)
            except Exception:  # a probe that cannot even run has failed; the loop must go on
                log.exception("[%s] %s %s", self.worker.key, self.name, kind)
                ok = False
            if self.stopping:
                return
            if ok:
                successes, failures = successes + 1, 0
            else:
                successes, failures = 0, failures + 1
            if kind == "startupProbe":
                if ok:
                    self._start_running_probes()
                    return
                if failures >= p.failure_threshold:
                    self.liveness_failed.set()  # a failed startup probe restarts the container too
                    return
            elif kind == "readinessProbe":
                if ok and successes >= p.success_threshold and not self.state.ready:
                    self.state.ready = True
                    self._changed()
                elif not ok and failures >= p.failure_threshold and self.state.ready:
                    self.state.ready = False
                    self._changed()
            elif not ok and failures >= p.failure_threshold:
                self.liveness_failed.set()
                return
            await asyncio.sleep(p.period)


class PodWorker:
    """Everything one pod needs on this node, from sandbox to deletion."""

    def __init__(self, agent: NodeAgent, pod: Obj, record: PodRecord | None) -> None:
        self.agent = agent
        self.pod = pod
        meta = pod["metadata"]
        self.uid: str = meta["uid"]
        self.name: str = meta["name"]
        self.namespace: str = meta.get("namespace", "default")
        self.key = f"{self.namespace}/{self.name}"
        self.adopted = record is not None
        # hostNetwork: the node's own namespace and address, as a kubelet gives them.
        self.host_network = bool(pod["spec"].get("hostNetwork"))
        self.record = record or PodRecord(
            uid=self.uid, namespace=self.namespace, name=self.name,
            netns=agent.cfg.netns if self.host_network else f"{agent.cfg.pod_prefix}-{self.uid[:8]}",
            veth="" if self.host_network else f"cm{self.uid[:8]}", ip="",
        )
        self.init_containers = [
            Container(self, c, self.record.containers.setdefault(c["name"], ContainerRecord()), init=True)
            for c in pod["spec"].get("initContainers") or []]
        self.containers = [Container(self, c, self.record.containers.setdefault(c["name"], ContainerRecord()))
                           for c in pod["spec"].get("containers", [])]
        self.init_done = not self.init_containers
        self.status_dirty = asyncio.Event()
        self.deleting = asyncio.Event()
        self.gone = False
        self.server_status: Obj = pod.get("status", {})
        self.task: asyncio.Task[None] | None = None
        self.status_task: asyncio.Task[None] | None = None
        self.sandbox_ready = False

    @property
    def dir(self) -> Path:
        return self.agent.cfg.state_dir / "pods" / self.uid

    @property
    def cgroup(self) -> Path:
        return self.agent.cfg.cgroup / f"pod-{self.uid}"

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / "record.json.tmp"
        tmp.write_text(json.dumps(asdict(self.record)))
        tmp.replace(self.dir / "record.json")

    def grace_period(self) -> float:
        meta_grace = self.pod["metadata"].get("deletionGracePeriodSeconds")
        if meta_grace is not None:
            return float(meta_grace)
        return float(self.pod["spec"].get("terminationGracePeriodSeconds", 30))

    def update(self, pod: Obj) -> None:
        self.pod = pod
        self.server_status = pod.get("status", {})
        for c in self.containers:
            c.spec = next((s for s in pod["spec"]["containers"] if s["name"] == c.name), c.spec)
        for c in self.init_containers:
            c.spec = next((s for s in pod["spec"].get("initContainers") or [] if s["name"] == c.name), c.spec)
        if pod["metadata"].get("deletionTimestamp"):
            self.deleting.set()

    # -------------------------------------------------------------- sandbox

    def etc_files(self) -> dict[str, str]:
        etc = self.dir / "etc"
        return {name: str(etc / name) for name in ("hosts", "resolv.conf", "hostname")}

    def write_hosts(self) -> None:
        etc = self.dir / "etc"
        etc.mkdir(parents=True, exist_ok=True)
        text = spec.hosts_file(self.pod, self.record.ip, self.agent.services_snapshot())
        path = etc / "hosts"
        # In place: the containers see this inode through a bind mount.
        with path.open("a+") as f:
            f.seek(0)
            if f.read() != text:
                f.seek(0)
                f.write(text)  # over the old text, then cut: a reader never finds the file empty
                f.truncate()

    def _make_sandbox(self) -> None:
        cfg = self.agent.cfg
        self.save()
        if not self.host_network and not Path(f"/run/netns/{self.record.netns}").exists():
            try:
                LabPod(self.record.netns, cfg.netns, self.record.ip, self.record.veth).create()
            except (NetnsError, OSError, subprocess.SubprocessError):
                self._remove_network()  # half made: the next try starts from nothing
                raise
        self.cgroup.mkdir(parents=True, exist_ok=True)
        etc = self.dir / "etc"
        etc.mkdir(parents=True, exist_ok=True)
        self.write_hosts()
        (etc / "resolv.conf").write_text(spec.resolv_conf(self.namespace))
        (etc / "hostname").write_text(spec.pod_hostname(self.pod)[0] + "\n")
        self.record.start_time = self.record.start_time or now()
        self.save()

    def _volume_dir(self, name: str) -> Path:
        return self.dir / "volumes" / name

    async def _make_volumes(self) -> None:
        agent = self.agent
        await agent.prefetch(self.pod)
        tokens = await self._service_account_tokens()
        for vol in self.pod["spec"].get("volumes") or []:
            target = self._volume_dir(vol["name"])
            if "hostPath" in vol:
                hp = vol["hostPath"]
                if hp.get("type") == "DirectoryOrCreate":
                    Path(hp["path"]).mkdir(parents=True, exist_ok=True)
                continue
            files = spec.volume_files(vol, self.pod, agent.lookup_cached, capacity=agent.capacity,
                                      token=lambda src: tokens[_token_key(src)])
            target.mkdir(parents=True, exist_ok=True)
            if files is not None:
                _write_volume(target, vol, files)

    async def refresh_volumes(self) -> None:
        """ConfigMap, Secret, downwardAPI and projected volumes follow their sources while the
        pod runs, as a kubelet's do (rotated credentials reach a running container); a
        service-account token stays the one written at start."""
        agent = self.agent
        await agent.prefetch(self.pod)
        for vol in self.pod["spec"].get("volumes") or []:
            if not any(kind in vol for kind in ("configMap", "secret", "downwardAPI", "projected")):
                continue
            target = self._volume_dir(vol["name"])

            def token_on_disk(sat: Obj, target: Path = target) -> bytes:
                return (target / str(sat.get("path", "token"))).read_bytes()

            try:
                files = spec.volume_files(vol, self.pod, agent.lookup_cached, capacity=agent.capacity,
                                          token=token_on_disk)
            except (spec.ConfigError, OSError) as exc:  # e.g. the Secret was deleted: keep what is there
                log.debug("[%s] volume %s not refreshed: %s", self.key, vol["name"], exc)
                continue
            if files is not None and target.is_dir():
                _write_volume(target, vol, files)

    async def _service_account_tokens(self) -> dict[tuple[str, int], bytes]:
        """A bound token from the API server's TokenRequest for every projected
        ``serviceAccountToken`` source of the pod, by (audience, expiry)."""
        tokens: dict[tuple[str, int], bytes] = {}
        sa = self.pod["spec"].get("serviceAccountName") or "default"
        for vol in self.pod["spec"].get("volumes") or []:
            for src in (vol.get("projected") or {}).get("sources", []):
                if "serviceAccountToken" not in src or _token_key(src["serviceAccountToken"]) in tokens:
                    continue
                sat = src["serviceAccountToken"]
                request = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {
                    "audiences": [sat["audience"]] if sat.get("audience") else None,
                    "expirationSeconds": int(sat.get("expirationSeconds", 3600)),
                    "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": self.name, "uid": self.uid}}}
                answer = await self.agent.api.request(
                    "POST", f"/api/v1/namespaces/{self.namespace}/serviceaccounts/{sa}/token", request)
                tokens[_token_key(sat)] = str(answer["status"]["token"]).encode()
        return tokens

    def mounts_for(self, container: Obj) -> list[Obj]:
        mounts = []
        volumes = {v["name"]: v for v in self.pod["spec"].get("volumes") or []}
        for vm in container.get("volumeMounts") or []:
            vol = volumes.get(vm["name"])
            if vol is None:
                raise spec.ConfigError(f"volumeMount {vm['name']!r} names no volume of the pod")
            source = Path(vol["hostPath"]["path"]) if "hostPath" in vol else self._volume_dir(vm["name"])
            if vm.get("subPath"):
                source = source / vm["subPath"]
                if not source.exists():
                    source.mkdir(parents=True)
            target = Path(vm["mountPath"])
            if not target.exists() and not target.is_symlink():
                self.agent.make_mount_point(target, source.is_dir())
            mounts.append({"source": str(source), "target": str(target), "readOnly": bool(vm.get("readOnly"))})
        self.save()
        return mounts

    def _remove_network(self) -> None:
        if self.host_network or self.record.netns == self.agent.cfg.netns:
            return  # the node's namespace is not the pod's to remove (also for a hostNetwork orphan)
        delete_netns(self.record.netns)
        with contextlib.suppress(NetnsError):
            ip("link", "del", self.record.veth, netns=self.agent.cfg.netns)

    def _remove_sandbox(self) -> None:
        remove_cgroup(self.cgroup)
        self._remove_network()

    # -------------------------------------------------------------- lifecycle

    async def run(self) -> None:
        try:
            if await self._prepare():
                self.sandbox_ready = True
                self.status_dirty.set()
                if await self._run_init_containers():
                    for c in self.containers:
                        c.task = asyncio.create_task(c.run(self.adopted), name=f"{self.key}/{c.name}")
        except asyncio.CancelledError:
            raise
        except Exception:  # the pod stays deletable whatever went wrong
            log.exception("[%s] pod worker failed", self.key)
        await self.deleting.wait()
        await self.terminate()

    async def _run_init_containers(self) -> bool:
        """Each init container in order, to a successful exit; False when one failed for good
        (restartPolicy Never: the pod fails) or the pod is deleted first."""
        for c in self.init_containers:
            c.task = asyncio.create_task(c.run(self.adopted), name=f"{self.key}/{c.name}")
            deleted = asyncio.ensure_future(self.deleting.wait())
            await asyncio.wait({c.task, deleted}, return_when=asyncio.FIRST_COMPLETED)
            deleted.cancel()
            if self.deleting.is_set():
                return False
            finished = c.record.finished
            if finished is None or finished.get("exitCode") != 0:
                return False
            c.state.ready = True  # a completed init container is reported ready, as a kubelet does
        self.init_done = True
        self.status_dirty.set()
        return True

    async def _prepare(self) -> bool:
        """Sandbox and volumes, retried every 5 s (a ConfigMap may appear later); False when
        the pod is deleted first."""
        while not self.deleting.is_set():
            try:
                if not self.record.ip:  # on the loop: two pods starting together get two addresses
                    self.record.ip = self.agent.cfg.address if self.host_network else self.agent.allocate_ip()
                await asyncio.to_thread(self._make_sandbox)
                await self._make_volumes()
                return True
            except (NetnsError, OSError, spec.ConfigError, APIError, subprocess.SubprocessError) as exc:
                log.error("[%s] sandbox: %s", self.key, exc)
                reason = "CreateContainerConfigError" if isinstance(exc, spec.ConfigError) else "ContainerCreating"
                for c in self.containers:
                    c.state.waiting = (reason, str(exc))
                self.status_dirty.set()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.deleting.wait(), 5)
        return False

    async def terminate(self) -> None:
        """A kubelet's graceful deletion: not ready, preStop (or the drain delay), stop
        signal, SIGKILL after the grace period, sandbox removed, then the final DELETE."""
        grace = self.grace_period()
        deadline = time.monotonic() + grace
        everyone = [*self.init_containers, *self.containers]
        for c in everyone:
            c.stopping = True
            c.state.ready = False
        await self.push_status()
        if not self.gone and grace > 0:
            # Endpoints leave before the process stops: the EndpointSlice controller drops the
            # pod on its deletionTimestamp, and the socket-LB follows within milliseconds; this
            # pause (a preStop sleep a kubelet does not make, most production pods add one) lets
            # that happen before the server closes its listener.
            hooks = [c for c in self.containers if (c.spec.get("lifecycle") or {}).get("preStop")]
            if hooks:
                await asyncio.gather(*(self.agent.run_hook(c, c.spec["lifecycle"]["preStop"], deadline)
                                       for c in hooks))
            else:
                await asyncio.sleep(min(self.agent.cfg.drain_delay, grace))
        remaining = max(0.0, deadline - time.monotonic())
        for c, result in zip(everyone, await asyncio.gather(*(c.stop(remaining) for c in everyone),
                                                             return_exceptions=True), strict=True):
            if isinstance(result, BaseException):
                log.error("[%s] stopping %s: %s; killing its cgroup", self.key, c.name, result)
            kill_cgroup(c.cgroup)
            if c.task is not None:
                c.task.cancel()
        try:
            await asyncio.to_thread(self._remove_sandbox)
        except Exception:
            log.exception("[%s] removing the sandbox (lab down removes what is left)", self.key)
        self.agent.finished.add(self.uid)  # events still on their way must not make a new worker
        self.agent.release(self)
        if not self.gone:
            await self.agent.final_delete(self.namespace, self.name, self.uid)
        shutil.rmtree(self.dir, ignore_errors=True)
        log.info("[%s] deleted", self.key)

    def status(self) -> Obj:
        state = spec.PodState(containers=[c.state for c in self.containers],
                              init_containers=[c.state for c in self.init_containers], init_done=self.init_done,
                              pod_ip=self.record.ip,
                              host_ip=self.agent.cfg.address, start_time=self.record.start_time)
        return spec.pod_status(self.pod, state, self.server_status, now())

    async def push_status(self) -> None:
        if self.gone:
            return
        status = self.status()
        path = f"/api/v1/namespaces/{self.namespace}/pods/{self.name}/status"
        try:
            updated = await self.agent.api.patch(path, {"metadata": {"uid": self.uid}, "status": status})
            if updated:
                self.server_status = updated.get("status", {})
        except APIError as exc:
            if exc.status == 404:
                self.gone = True
            else:
                log.warning("[%s] status: %s; retrying", self.key, exc)
                await asyncio.sleep(1)
                self.status_dirty.set()

    def needs_status(self) -> bool:
        """True when the server's view differs from ours (e.g. the node controller marked
        the pod not ready while our Lease was late)."""
        ours, theirs = self.status(), self.server_status

        def sig(s: Obj) -> Any:
            return (s.get("phase"), s.get("podIP"),
                    sorted((c["type"], c["status"]) for c in s.get("conditions") or [] if c["type"] != "PodScheduled"),
                    [(c.get("name"), c.get("ready"), c.get("restartCount"), sorted(c.get("state", {})))
                     for c in s.get("containerStatuses") or []])

        return bool(sig(ours) != sig(theirs))


class NodeAgent:
    def __init__(self, cfg: NodeConfig) -> None:
        self.cfg = cfg
        self.api = NodeAPI.from_kubeconfig(cfg.kubeconfig, cfg.context)
        self.workers: dict[str, PodWorker] = {}
        self.finished: set[str] = set()  # pods this agent has stopped and removed
        self.services: dict[str, Obj] = {}
        self.cache: dict[tuple[str, str, str], dict[str, bytes] | None] = {}
        self.capacity = {"cpu": str(os.cpu_count() or 2), "memory": f"{_mem_kib()}Ki",
                         "pods": str(cfg.max_pods), "ephemeral-storage": "10Gi"}
        self.server = NodeServer(self, cfg.port, cfg.tls_cert, cfg.tls_key, cfg.client_ca)
        self._tasks: list[asyncio.Task[Any]] = []
        self._hosts_dirty = asyncio.Event()
        self._forwarders: list[asyncio.AbstractServer] = []

    # -------------------------------------------------------------- Containers (server.py)

    def _find(self, namespace: str, pod: str, container: str | None) -> Container:
        worker = next((w for w in self.workers.values() if w.namespace == namespace and w.name == pod), None)
        if worker is None:
            raise ContainerNotFound(f"pod {namespace}/{pod} is not running on node {self.cfg.name}")
        if container is None:
            if len(worker.containers) != 1:
                names = ", ".join(c.name for c in worker.containers)
                raise ContainerNotFound(f"pod {namespace}/{pod} has several containers: choose one of {names}")
            return worker.containers[0]
        for c in [*worker.containers, *worker.init_containers]:
            if c.name == container:
                return c
        raise ContainerNotFound(f"container {container} is not valid for pod {pod}")

    def log_path(self, namespace: str, pod: str, container: str | None, previous: bool) -> Path:
        c = self._find(namespace, pod, container)
        path = c.worker.dir / f"{c.name}.previous.log" if previous else c.log_path
        if not path.exists():
            what = "previous terminated container" if previous else "container"
            raise ContainerNotFound(f'{what} "{c.name}" in pod "{pod}" has no logs yet')
        return path

    def exec_argv(self, namespace: str, pod: str, container: str | None, command: list[str]) -> list[str]:
        return self._find(namespace, pod, container).enter_argv(command)

    # -------------------------------------------------------------- host mount points

    @property
    def made_paths_file(self) -> Path:
        return self.cfg.state_dir / "made-paths.json"

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

    # -------------------------------------------------------------- lookups

    async def final_delete(self, namespace: str, name: str, uid: str) -> None:
        """The kubelet's last word on a pod: DELETE with grace 0 for exactly this uid. Without it
        the pod stays Terminating, so it is retried until the API server answers (404 or 409:
        already gone or replaced)."""
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0, "preconditions": {"uid": uid}}
        for attempt in range(120):
            try:
                await self.api.request("DELETE", f"/api/v1/namespaces/{namespace}/pods/{name}", body)
                return
            except APIError as exc:
                if exc.status in (404, 409):
                    return
                if attempt == 0:
                    log.warning("[%s/%s] final delete: %s; retrying", namespace, name, exc)
            await asyncio.sleep(1)
        log.error("[%s/%s] final delete failed for 2 minutes; the pod stays Terminating", namespace, name)

    def lookup_cached(self, kind: str, namespace: str, name: str) -> dict[str, bytes] | None:
        return self.cache.get((kind, namespace, name))

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
        self.cache[(kind, namespace, name)] = data

    def services_snapshot(self) -> list[Obj]:
        """The Services now, for another thread: the services loop owns ``services``; ``list()`` of a
        dict's values copies it without letting another Python thread in between."""
        return list(self.services.values())

    def services_of(self, namespace: str) -> list[Obj]:
        return [s for s in self.services_snapshot()
                if s["metadata"].get("namespace") == namespace
                or (s["metadata"]["name"] == "kubernetes" and s["metadata"].get("namespace") == "default")]

    # -------------------------------------------------------------- IPs

    def allocate_ip(self) -> str:
        net = ipaddress.ip_network(self.cfg.pod_cidr)
        used = {w.record.ip for w in self.workers.values() if not w.host_network}
        for host in list(net.hosts())[1:]:
            if str(host) not in used:
                return str(host)
        raise NetnsError(f"no free address left in {self.cfg.pod_cidr}")

    def release(self, worker: PodWorker) -> None:
        if self.workers.get(worker.uid) is worker:
            del self.workers[worker.uid]

    # -------------------------------------------------------------- probes and hooks

    async def run_probe(self, c: Container, p: spec.Probe) -> bool:
        try:
            if p.kind == "exec":
                return await self._exec(c, p.action.get("command", []), p.timeout) == 0
            port = spec.probe_port(c.spec, p.action.get("port", 80))
            host = p.action.get("host") or c.worker.record.ip
            if p.kind == "tcpSocket":
                await self._connect(c.worker.record.netns, host, port, p.timeout)
                return True
            return await self._http_get(c.worker.record.netns, host, port, p.action, p.timeout)
        except (TimeoutError, OSError, spec.ConfigError, ValueError) as exc:
            log.debug("[%s] %s probe failed: %s", c.worker.key, c.name, exc)
            return False

    async def _connect(self, netns: str, host: str, port: int, timeout: float) -> socket.socket:
        sock = socket_in_netns(netns)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (host, port)), timeout)
        except BaseException:
            sock.close()
            raise
        return sock

    async def _http_get(self, netns: str, host: str, port: int, action: Obj, timeout: float) -> bool:
        if action.get("scheme", "HTTP").upper() != "HTTP":
            raise ValueError("HTTPS probes are not supported in the lab")
        sock = await self._connect(netns, host, port, timeout)
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            headers = {"Host": f"{host}:{port}", "User-Agent": "kube-probe/1.20", "Accept": "*/*",
                       "Connection": "close"}
            headers.update({h["name"]: h["value"] for h in action.get("httpHeaders") or []})
            request = f"GET {action.get('path', '/') or '/'} HTTP/1.1\r\n" + "".join(
                f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
            writer.write(request.encode())
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), timeout)
            parts = line.split()
            return len(parts) > 1 and parts[1].isdigit() and 200 <= int(parts[1]) < 400
        finally:
            writer.close()

    async def _exec(self, c: Container, command: list[str], timeout: float) -> int:
        try:
            argv = c.enter_argv(command)
        except ContainerNotFound:
            return -1
        proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.DEVNULL,
                                                    stderr=asyncio.subprocess.DEVNULL, start_new_session=True)
        try:
            return await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            return -1

    async def run_hook(self, c: Container, hook: Obj, deadline: float) -> None:
        timeout = max(0.1, deadline - time.monotonic())
        try:
            if "exec" in hook:
                await self._exec(c, hook["exec"].get("command", []), timeout)
            elif "httpGet" in hook:
                port = spec.probe_port(c.spec, hook["httpGet"].get("port", 80))
                await self._http_get(c.worker.record.netns, hook["httpGet"].get("host") or c.worker.record.ip,
                                     port, hook["httpGet"], timeout)
            elif "sleep" in hook:
                await asyncio.sleep(min(timeout, float(hook["sleep"].get("seconds", 0))))
        except (TimeoutError, OSError, spec.ConfigError, ValueError, LookupError) as exc:
            log.warning("[%s] %s preStop hook: %s", c.worker.key, c.name, exc)

    # -------------------------------------------------------------- node

    def node_object(self) -> Obj:
        labels = {"kubernetes.io/hostname": self.cfg.name, "kubernetes.io/os": "linux",
                  "kubernetes.io/arch": _arch(),
                  "beta.kubernetes.io/os": "linux", **self.cfg.labels}
        return {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": self.cfg.name, "labels": labels},
                "spec": {"podCIDR": self.cfg.pod_cidr, "podCIDRs": [self.cfg.pod_cidr]}}

    def node_status(self, ready: bool = True) -> Obj:
        t = now()

        def cond(kind: str, status: str, reason: str, message: str) -> Obj:
            return {"type": kind, "status": status, "reason": reason, "message": message,
                    "lastHeartbeatTime": t, "lastTransitionTime": self._started}

        return {
            "addresses": [{"type": "InternalIP", "address": self.cfg.address},
                          {"type": "Hostname", "address": self.cfg.name},
                          # The API server reaches this agent here (--kubelet-preferred-address-types).
                          {"type": "InternalDNS", "address": "127.0.0.1"}],
            "capacity": self.capacity, "allocatable": self.capacity,
            "conditions": [
                cond("MemoryPressure", "False", "KubeletHasSufficientMemory",
                     "kubelet has sufficient memory available"),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
                cond("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
                cond("Ready", "True" if ready else "False", "KubeletReady",
                     "clustermesh lab node agent is posting ready status"),
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.cfg.port}},
            "nodeInfo": {"machineID": _machine_id(), "systemUUID": self.cfg.name, "bootID": _boot_id(),
                         "kernelVersion": platform.release(), "osImage": "clustermesh lab (Debian host)",
                         "containerRuntimeVersion": "clustermesh-lab://0.1", "kubeletVersion": "v1.20.2",
                         "kubeProxyVersion": "v1.20.2", "operatingSystem": "linux",
                         "architecture": _arch()},
        }

    async def register(self) -> None:
        try:
            await self.api.request("POST", "/api/v1/nodes", self.node_object())
            log.info("registered node %s", self.cfg.name)
        except APIError as exc:
            if exc.status != 409:
                raise
            await self.api.patch(f"/api/v1/nodes/{self.cfg.name}",
                                 {"metadata": {"labels": self.node_object()["metadata"]["labels"]}})
        await self.api.patch(f"/api/v1/nodes/{self.cfg.name}/status", {"status": self.node_status()})

    async def _lease_loop(self) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.cfg.name}"
        last_status = 0.0
        while True:
            try:
                body = {"spec": {"holderIdentity": self.cfg.name, "leaseDurationSeconds": LEASE_SECONDS,
                                 "renewTime": micro_now()}}
                try:
                    await self.api.patch(path, body, "merge")
                except APIError as exc:
                    if exc.status != 404:
                        raise
                    node = await self.api.get(f"/api/v1/nodes/{self.cfg.name}")
                    await self.api.request("POST", "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", {
                        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                        "metadata": {"name": self.cfg.name, "ownerReferences": [{
                            "apiVersion": "v1", "kind": "Node", "name": self.cfg.name,
                            "uid": node["metadata"]["uid"]}]},
                        **body})
                if time.monotonic() - last_status > 30:
                    await self.api.patch(f"/api/v1/nodes/{self.cfg.name}/status", {"status": self.node_status()})
                    last_status = time.monotonic()
            except (APIError, OSError) as exc:
                log.warning("lease: %s", exc)
                last_status = 0.0
            await asyncio.sleep(RENEW_SECONDS)

    # -------------------------------------------------------------- pods

    async def _pods_loop(self) -> None:
        path = "/api/v1/pods"
        query = f"fieldSelector=spec.nodeName%3D{self.cfg.name}"
        async for kind, obj in self.api.watch(path, query):
            try:
                if kind == "SYNC":
                    seen = {pod["metadata"]["uid"] for pod in obj.get("items", [])}
                    for uid in [uid for uid in self.workers if uid not in seen]:
                        self._forget(uid)
                    # Before any new pod starts: an orphan's address and cgroup must be free again.
                    await asyncio.to_thread(self._remove_orphans, seen)
                    for pod in obj.get("items", []):
                        await self._pod_event(pod)
                elif kind in ("ADDED", "MODIFIED"):
                    await self._pod_event(obj)
                elif kind == "DELETED":
                    self._forget(obj["metadata"]["uid"])
            except Exception:  # one pod's trouble must not stop the node
                log.exception("pod event %s %s", kind, obj.get("metadata", {}).get("name", ""))

    def _forget(self, uid: str) -> None:
        """The pod object is gone (force-deleted): stop its containers now, no final DELETE."""
        w = self.workers.get(uid)
        if w is not None:
            w.gone = True
            w.deleting.set()

    async def _pod_event(self, pod: Obj) -> None:
        uid = pod["metadata"]["uid"]
        if uid in self.finished:
            return
        w = self.workers.get(uid)
        if w is not None:
            w.update(pod)
            return
        phase = pod.get("status", {}).get("phase")
        record_path = self.cfg.state_dir / "pods" / uid / "record.json"
        record = PodRecord.load(record_path) if record_path.exists() else None
        if phase in ("Succeeded", "Failed") and record is None:
            if pod["metadata"].get("deletionTimestamp"):
                self.finished.add(uid)
                await self.final_delete(pod["metadata"]["namespace"], pod["metadata"]["name"], uid)
            return
        await self.prefetch(pod)
        w = PodWorker(self, pod, record)
        self.workers[uid] = w
        w.update(pod)
        w.task = asyncio.create_task(w.run(), name=f"pod {w.key}")
        w.status_task = asyncio.create_task(self._status_writer(w), name=f"status {w.key}")

    def _remove_orphans(self, live: set[str]) -> None:
        """Sandboxes left by an earlier run whose pod no longer exists: remove them."""
        pods_dir = self.cfg.state_dir / "pods"
        if not pods_dir.exists():
            return
        for d in pods_dir.iterdir():
            if d.name in live or d.name in self.workers or not (d / "record.json").exists():
                continue
            try:
                record = PodRecord.load(d / "record.json")
            except (OSError, ValueError, TypeError) as exc:
                log.error("unreadable pod record %s: %s; removing it", d, exc)
                shutil.rmtree(d, ignore_errors=True)
                continue
            fake = {"metadata": {"uid": record.uid, "name": record.name, "namespace": record.namespace},
                    "spec": {"containers": []}}
            w = PodWorker(self, fake, record)
            w.gone = True
            log.info("[%s] removing the sandbox of a pod that is gone", w.key)
            w._remove_sandbox()
            shutil.rmtree(d, ignore_errors=True)

    async def _status_writer(self, w: PodWorker) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(w.status_dirty.wait(), 10)
            if w.gone or (w.task is not None and w.task.done()):
                return
            if w.status_dirty.is_set() or w.needs_status():
                w.status_dirty.clear()
                await w.push_status()

    # -------------------------------------------------------------- services (hosts files)

    async def _services_loop(self) -> None:
        async for kind, obj in self.api.watch("/api/v1/services"):
            if kind == "SYNC":
                self.services = {f"{s['metadata']['namespace']}/{s['metadata']['name']}": s for s in obj["items"]}
            elif kind == "DELETED":
                self.services.pop(f"{obj['metadata']['namespace']}/{obj['metadata']['name']}", None)
            else:
                self.services[f"{obj['metadata']['namespace']}/{obj['metadata']['name']}"] = obj
            self._hosts_dirty.set()

    async def _volumes_loop(self, period: float = 10.0) -> None:
        while True:
            await asyncio.sleep(period)
            for w in list(self.workers.values()):
                if w.sandbox_ready and not w.deleting.is_set():
                    try:
                        await w.refresh_volumes()
                    except (APIError, OSError) as exc:
                        log.warning("[%s] refreshing volumes: %s", w.key, exc)

    async def _hosts_loop(self) -> None:
        while True:
            await self._hosts_dirty.wait()
            await asyncio.sleep(0.1)
            self._hosts_dirty.clear()
            for w in list(self.workers.values()):
                if w.sandbox_ready:
                    with contextlib.suppress(OSError):
                        w.write_hosts()

    # -------------------------------------------------------------- API forwarder in the node namespace

    async def _start_forwarder(self) -> None:
        listeners = []
        for address in ("127.0.0.1", API_VIP):  # kube-proxy's kubeconfig; pods via the kubernetes Service
            listener = socket_in_netns(self.cfg.netns)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((address, self.cfg.api_port))
            listener.listen(64)
            listener.setblocking(False)
            listeners.append(listener)

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
                if writer.can_write_eof():
                    writer.write_eof()  # half-close: the answer still flows the other way
            except (OSError, asyncio.IncompleteReadError):
                pass

        async def handle(r1: asyncio.StreamReader, w1: asyncio.StreamWriter) -> None:
            try:
                r2, w2 = await asyncio.open_connection("127.0.0.1", self.cfg.api_port)
            except OSError:
                w1.close()
                return
            try:
                await asyncio.gather(pipe(r1, w2), pipe(r2, w1))
            finally:
                for w in (w1, w2):
                    with contextlib.suppress(OSError):
                        w.close()

        self._forwarders = [await asyncio.start_server(handle, sock=listener) for listener in listeners]

    # -------------------------------------------------------------- main

    async def run(self) -> None:
        self._started = now()
        self.cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self.cfg.cgroup.mkdir(parents=True, exist_ok=True)
        await self._start_forwarder()
        await self.server.start()
        while True:
            try:
                await self.register()
                break
            except (APIError, OSError) as exc:
                log.warning("registering node %s: %s; retrying", self.cfg.name, exc)
                await asyncio.sleep(1)
        for name, coro in (("lease", self._lease_loop()), ("services", self._services_loop()),
                           ("hosts", self._hosts_loop()), ("pods", self._pods_loop()),
                           ("volumes", self._volumes_loop())):
            self._tasks.append(asyncio.create_task(coro, name=name))
        log.info("node %s ready: pods %s, agent https://127.0.0.1:%d, API forwarded in %s",
                 self.cfg.name, self.cfg.pod_cidr, self.cfg.port, self.cfg.netns)
        done, _ = await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            log.error("task %s ended: %s", t.get_name(), t.exception())
        raise SystemExit(1)  # the lab restarts us

    async def close(self) -> None:
        """Stop serving; pods keep running (a restarted agent adopts them)."""
        for t in self._tasks:
            t.cancel()
        for w in self.workers.values():
            if w.task:
                w.task.cancel()
        await self.server.stop()
        for forwarder in self._forwarders:
            forwarder.close()
        await self.api.close()


def _arch() -> str:
    """GOARCH names, as a kubelet reports them."""
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


def _mem_kib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1])
    return 4 * 1024 * 1024


def _machine_id() -> str:
    with contextlib.suppress(OSError):
        return Path("/etc/machine-id").read_text().strip()
    return "lab"


def _boot_id() -> str:
    with contextlib.suppress(OSError):
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return "lab"


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="clustermesh lab node-agent", description=__doc__.split("\n")[0])
    p.add_argument("--kubeconfig", required=True)
    p.add_argument("--context")
    p.add_argument("--node", required=True)
    p.add_argument("--netns", required=True)
    p.add_argument("--address", required=True)
    p.add_argument("--pod-cidr", required=True)
    p.add_argument("--cgroup", required=True)
    p.add_argument("--state-dir", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--tls-cert", required=True)
    p.add_argument("--tls-key", required=True)
    p.add_argument("--client-ca", required=True)
    p.add_argument("--api-port", type=int, required=True)
    p.add_argument("--pod-prefix", required=True)
    p.add_argument("--drain-delay", type=float, default=1.0)
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    cfg = NodeConfig(name=a.node, kubeconfig=a.kubeconfig, context=a.context, netns=a.netns, address=a.address,
                     pod_cidr=a.pod_cidr, cgroup=Path(a.cgroup), state_dir=Path(a.state_dir), port=a.port,
                     tls_cert=Path(a.tls_cert), tls_key=Path(a.tls_key), client_ca=Path(a.client_ca),
                     api_port=a.api_port, pod_prefix=a.pod_prefix, drain_delay=a.drain_delay)
    agent = NodeAgent(cfg)

    async def amain() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        runner = asyncio.create_task(agent.run())
        await asyncio.wait({runner, asyncio.ensure_future(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
        runner.cancel()
        await agent.close()

    asyncio.run(amain())
    return 0


if __name__ == "__main__":
    sys.exit(main())
