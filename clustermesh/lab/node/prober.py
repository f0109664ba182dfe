"""The prober of the lab's kubelet: startup, readiness and liveness probes (httpGet and tcpSocket from a
socket made inside the pod's network namespace, exec inside the container) and preStop hooks. A probe
loop counts successes and failures against the probe's thresholds and hands its verdicts to the
container through ``ProbeResults``; it changes no container state itself."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from typing import TYPE_CHECKING, Protocol

from clustermesh.lab.netns import socket_in_netns
from clustermesh.lab.node import spec
from clustermesh.lab.node.records import Obj
from clustermesh.lab.node.server import ContainerNotFound

if TYPE_CHECKING:
    from clustermesh.lab.node.container import Container

log = logging.getLogger("clustermesh.lab.node")


class ProbeResults(Protocol):
    """What a probe loop tells its container."""

    @property
    def stopping(self) -> bool: ...

    def started(self) -> None:
        """The startup probe succeeded: readiness and liveness probes may begin."""

    def ready(self, ready: bool) -> None:
        """The readiness probe passed its success threshold (True) or its failure threshold (False)."""

    def failed(self) -> None:
        """The liveness (or startup) probe passed its failure threshold: restart the container."""


class Prober:
    async def run(self, c: Container, p: spec.Probe) -> bool:
        """One probe of container ``c``: whether it succeeded."""
        try:
            if p.kind == "exec":
                return await self.exec(c, p.action.get("command", []), p.timeout) == 0
            port = spec.probe_port(c.spec, p.action.get("port", 80))
            host = p.action.get("host") or c.worker.record.ip
            if p.kind == "tcpSocket":
                (await self._connect(c.worker.record.netns, host, port, p.timeout)).close()
                return True
            return await self._http_get(c.worker.record.netns, host, port, p.action, p.timeout)
        except (TimeoutError, OSError, spec.ConfigError, ValueError) as exc:
            log.debug("[%s] %s probe failed: %s", c.worker.key, c.name, exc)
            return False

    async def loop(self, c: Container, kind: str, p: spec.Probe, results: ProbeResults) -> None:
        """Probe every period until the verdict that ends this probe (startup: success or failure;
        liveness: failure) or the container stops."""
        await asyncio.sleep(p.initial_delay)
        successes = failures = 0
        while not results.stopping:  # a terminating container's readiness is the node agent's, not the probe's
            try:
                ok = await self.run(c, p)
            except Exception:  # a probe that cannot even run has failed; the loop must go on
                log.exception("[%s] %s %s", c.worker.key, c.name, kind)
                ok = False
            if results.stopping:
                return
            if ok:
                successes, failures = successes + 1, 0
            else:
                successes, failures = 0, failures + 1
            if kind == "startupProbe":
                if ok:
                    results.started()
                    return
                if failures >= p.failure_threshold:
                    results.failed()  # a failed startup probe restarts the container too
                    return
            elif kind == "readinessProbe":
                if ok and successes >= p.success_threshold:
                    results.ready(True)
                elif not ok and failures >= p.failure_threshold:
                    results.ready(False)
            elif not ok and failures >= p.failure_threshold:
                results.failed()
                return
            await asyncio.sleep(p.period)

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

    async def exec(self, c: Container, command: list[str], timeout: float) -> int:
        """Run ``command`` in container ``c``; its exit code, -1 when it could not run or timed out."""
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
        """A lifecycle hook (preStop) of container ``c``, cut at ``deadline`` (time.monotonic())."""
        timeout = max(0.1, deadline - time.monotonic())
        try:
            if "exec" in hook:
                await self.exec(c, hook["exec"].get("command", []), timeout)
            elif "httpGet" in hook:
                port = spec.probe_port(c.spec, hook["httpGet"].get("port", 80))
                await self._http_get(c.worker.record.netns, hook["httpGet"].get("host") or c.worker.record.ip,
                                     port, hook["httpGet"], timeout)
            elif "sleep" in hook:
                await asyncio.sleep(min(timeout, float(hook["sleep"].get("seconds", 0))))
        except (TimeoutError, OSError, spec.ConfigError, ValueError, LookupError) as exc:
            log.warning("[%s] %s preStop hook: %s", c.worker.key, c.name, exc)
