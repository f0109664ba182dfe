"""A container of the lab's kubelet: its lifecycle from config to exit, as a kubelet's pod worker
runs one (adoption after a node agent restart, config errors, start, readiness and liveness through the
prober, exit accounting, restarts with crash-loop backoff, log rotation, graceful stop)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from clustermesh.lab.netns import kill_cgroup
from clustermesh.lab.node import catalog, pod_status, runtime, spec
from clustermesh.lab.node.records import ContainerRecord, Obj, now
from clustermesh.lab.node.server import ContainerNotFound

if TYPE_CHECKING:
    from clustermesh.lab.node.pod_worker import PodWorker

log = logging.getLogger("clustermesh.lab.node")


class Container:
    """One container of a pod: its process, probes, restarts and status."""

    def __init__(self, worker: PodWorker, spec_: Obj, record: ContainerRecord, init: bool = False) -> None:
        self.worker = worker
        self.init = init  # an init container: runs to completion before the others start
        self.spec = spec_
        self.name: str = spec_["name"]
        self.record = record
        self.state = pod_status.ContainerState(name=self.name, image=spec_.get("image", ""),
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
        self.worker.agent.statuses.changed(self.worker)

    # -------------------------------------------------------------- start

    async def _program(self) -> tuple[list[str], catalog.Program] | None:
        agent = self.worker.agent
        # The API server may not have our status yet: the pod's own addresses come from us.
        ips = {"podIP": self.worker.record.ip, "podIPs": [{"ip": self.worker.record.ip}],
               "hostIP": agent.cfg.address}
        pod = {**self.worker.pod, "status": {**self.worker.pod.get("status", {}), **ips}}
        try:
            env = spec.container_env(pod, self.spec, agent.volumes.lookup, agent.services_of(self.worker.namespace),
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
        worker = self.worker
        return await runtime.spawn(self.dir, self.log_path, self.cgroup, {
            "netns": worker.record.netns,
            "hostname": worker.agent.cfg.name if worker.host_network else spec.pod_hostname(worker.pod)[0],
            "mounts": mounts, "etc": worker.etc_files(), "argv": argv, "env": self.env, "workdir": self.workdir})

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
            if adopt and self.record.pid and runtime.proc_start_time(self.record.pid) == self.record.start:
                self.pid, ours = self.record.pid, False
                saved = runtime.saved_env(self.dir)
                if saved is not None:
                    self.env, self.workdir = saved
                log.info("[%s] adopted container %s (pid %d)", self.worker.key, self.name, self.pid)
            else:
                await self.worker.agent.volumes.prefetch(self.worker.pod)  # a ConfigMap may have come or changed
                prepared = await self._program()
                if prepared is None:
                    self._changed()
                    log.warning("[%s] %s: %s", self.worker.key, self.name, self.state.waiting)
                    await asyncio.sleep(min(30.0, 5.0 * (1 + self.record.restarts)))
                    continue
                argv, program = prepared
                self.record.stop_signal = program.stop_signal
                try:
                    mounts = self.worker.agent.volumes.mounts_for(self.worker, self.spec)
                except spec.ConfigError as exc:
                    self.state.waiting = ("CreateContainerConfigError", str(exc))
                    self._changed()
                    await asyncio.sleep(5)
                    continue
                if self.stopping:
                    break
                self.pid = await self._spawn(argv, mounts)
                self.record.pid, self.record.start = self.pid, runtime.proc_start_time(self.pid) or ""
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
            waiter = asyncio.ensure_future(runtime.wait_exit(self.pid, ours, lambda: self.stopping))
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
        return runtime.enter_argv(self.pid, self.cgroup, self.worker.record.netns, self.dir, command)

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

    # -------------------------------------------------------------- probes (their verdicts: ProbeResults)

    def _start_probes(self) -> None:
        startup = spec.probe(self.spec.get("startupProbe"))
        if startup is not None:  # as a kubelet: the other probes wait until the startup probe succeeds
            self._probe("startupProbe", startup)
        else:
            self.started()

    def _probe(self, kind: str, p: spec.Probe) -> None:
        prober = self.worker.agent.prober
        self.probe_tasks.append(asyncio.create_task(prober.loop(self, kind, p, self), name=f"{self.name}-{kind}"))

    def _stop_probes(self) -> None:
        for t in self.probe_tasks:
            t.cancel()
        self.probe_tasks = []

    def started(self) -> None:
        for kind in ("readinessProbe", "livenessProbe"):
            p = spec.probe(self.spec.get(kind))
            if p is not None:
                self._probe(kind, p)

    def ready(self, ready: bool) -> None:
        if self.state.ready != ready:
            self.state.ready = ready
            self._changed()

    def failed(self) -> None:
        self.liveness_failed.set()

