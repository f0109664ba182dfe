"""The node agent's HTTPS server: what the kube-apiserver calls for ``kubectl logs`` and ``kubectl exec``.

The API server reaches a node at its InternalDNS address (127.0.0.1 in the lab) and the port in
``status.daemonEndpoints.kubeletEndpoint``, presenting its kubelet client certificate; we serve with a
certificate from the control plane's CA and require a client certificate from that CA.

Endpoints, as a Kubernetes 1.20 kubelet serves them (pkg/kubelet/server/server.go):

- ``GET /containerLogs/{namespace}/{pod}/{container}?follow&tailLines&limitBytes&previous``: the log as a
  plain streamed body. ``timestamps``, ``sinceSeconds`` and ``sinceTime`` are accepted and ignored (our
  log files carry no timestamps).
- ``GET|POST /exec/{namespace}/{pod}/{container}?command=..&input=1&output=1&error=1&tty=1``: a WebSocket
  speaking the Kubernetes channel protocol (``v5``/``v4``/``v1`` ``channel.k8s.io``, v4/v1 also base64).
  The 1.20 API server relays the upgrade byte for byte (``UpgradeAwareHandler.tryUpgrade``), so the
  client's subprotocol list reaches us unchanged; our choice goes back the same way.
- ``/healthz``.

SPDY (what kubectl < 1.30 speaks), attach and port-forward are refused with a 400 that says so.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import fcntl
import json
import logging
import os
import pty
import signal
import ssl
import struct
import termios
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from aiohttp import WSMsgType, web

log = logging.getLogger(__name__)

STDIN, STDOUT, STDERR, ERROR, RESIZE = range(5)
CLOSE = 255  # v5: a frame [255, channel] says the client closed that stream

POLL_INTERVAL = 0.2
# After the command exits, how long its output may still take to reach EOF: a background process
# that inherited stdout would otherwise hold the session open (a real kubelet hangs there).
DRAIN_TIMEOUT = 2.0
READ_SIZE = 64 * 1024

UNSUPPORTED = (
    "this lab node agent speaks the WebSocket channel protocol only (kubectl >= 1.30, or the python client); "
    "SPDY and port-forward are not supported"
)


class ContainerNotFound(LookupError):
    """No such pod or container on this node; the message says what is missing (the server answers 404)."""


class Containers(Protocol):
    def log_path(self, namespace: str, pod: str, container: str | None, previous: bool) -> Path:
        """The container's log file (``previous``: the last terminated instance's); ``container`` None
        means the pod's only container. Raises ContainerNotFound."""
        ...

    def exec_argv(self, namespace: str, pod: str, container: str | None, command: list[str]) -> list[str]:
        """The argv to spawn (in the host namespaces) that runs ``command`` inside the container."""
        ...


@dataclass(frozen=True)
class ChannelProtocol:
    name: str
    base64: bool = False
    status_json: bool = True  # v4+: the error channel carries a metav1.Status, not bare text
    close_signal: bool = False  # v5


PROTOCOLS = {
    p.name: p
    for p in (
        ChannelProtocol("v5.channel.k8s.io", close_signal=True),
        ChannelProtocol("v4.channel.k8s.io"),
        ChannelProtocol("v4.base64.channel.k8s.io", base64=True),
        ChannelProtocol("channel.k8s.io", status_json=False),
        ChannelProtocol("base64.channel.k8s.io", base64=True, status_json=False),
    )
}
# A client that names no subprotocol gets binary v1, as from the kubelet.
NO_PROTOCOL = ChannelProtocol("", status_json=False)


def negotiate(offered: list[str]) -> ChannelProtocol | None:
    """The first protocol the client offers that we speak; None if it offers only others."""
    names = [name.strip() for header in offered for name in header.split(",") if name.strip()]
    if not names:
        return NO_PROTOCOL
    return next((PROTOCOLS[name] for name in names if name in PROTOCOLS), None)


def _flag(value: str | None) -> bool:
    return (value or "").lower() in {"1", "t", "true"}


def _int_param(query: Mapping[str, str], name: str, minimum: int) -> int | None:
    raw = query.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name}: not an integer: {raw!r}\n") from None
    if value < minimum:
        raise web.HTTPBadRequest(text=f"{name}: must be at least {minimum}\n")
    return value


def tail_offset(f: BinaryIO, lines: int) -> int:
    """Where the last ``lines`` lines of ``f`` start; a final newline ends the last line, it does not
    start another, and an unterminated last line counts as a line."""
    size = f.seek(0, os.SEEK_END)
    if lines <= 0 or size == 0:
        return size
    f.seek(size - 1)
    end = size - 1 if f.read(1) == b"\n" else size
    remaining = lines
    pos = end
    while pos > 0:
        start = max(0, pos - READ_SIZE)
        f.seek(start)
        block = f.read(pos - start)
        idx = len(block)
        while (idx := block.rfind(b"\n", 0, idx)) >= 0:
            remaining -= 1
            if remaining == 0:
                return start + idx + 1
        pos = start
    return 0


def exit_status(command: list[str], code: int) -> dict[str, Any]:
    """The metav1.Status the kubelet reports on the error channel (remotecommand.ServeExec);
    kubectl turns it into "command terminated with exit code N" and exits with N."""
    if code == 0:
        return {"metadata": {}, "status": "Success"}
    return {
        "metadata": {},
        "status": "Failure",
        "message": f"command terminated with non-zero exit code: error executing command "
        f"[{' '.join(command)}], exit code {code}",
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]},
    }


def internal_error(message: str) -> dict[str, Any]:
    """apierrors.NewInternalError's shape: kubectl prints its message and exits 1."""
    return {
        "metadata": {},
        "status": "Failure",
        "message": f"Internal error occurred: {message}",
        "reason": "InternalError",
        "details": {"causes": [{"message": message}]},
        "code": 500,
    }


class _Output(asyncio.Protocol):
    """Feeds a read pipe or pty master into a StreamReader. A pty master fails with EIO once the
    terminal's last user has gone: that is its end of file, and output read before it must not be lost
    (StreamReader.read would raise a set exception ahead of buffered data)."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader

    def data_received(self, data: bytes) -> None:
        self.reader.feed_data(data)

    def eof_received(self) -> bool | None:
        self.reader.feed_eof()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.reader.feed_eof()


async def _read_fd(fd: int) -> tuple[asyncio.StreamReader, asyncio.ReadTransport]:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=READ_SIZE)
    transport, _ = await loop.connect_read_pipe(lambda: _Output(reader), os.fdopen(fd, "rb", buffering=0))
    reader.set_transport(transport)  # lets the reader pause the pipe when we cannot send fast enough
    return reader, transport


async def _write_fd(fd: int, data: bytes) -> None:
    loop = asyncio.get_running_loop()
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            ready = loop.create_future()
            loop.add_writer(fd, ready.set_result, None)
            try:
                await ready
            finally:
                loop.remove_writer(fd)


def _take_terminal() -> None:
    # Runs in the child after setsid: the pty on stdin becomes its controlling terminal (job control, ^C).
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


@dataclass(frozen=True)
class ExecOptions:
    command: list[str]
    stdin: bool
    stdout: bool
    stderr: bool
    tty: bool


class ExecSession:
    """One command run for one WebSocket: child process <-> channels."""

    def __init__(self, ws: web.WebSocketResponse, protocol: ChannelProtocol, opts: ExecOptions) -> None:
        self.ws = ws
        self.protocol = protocol
        self.opts = opts
        self.proc: asyncio.subprocess.Process | None = None
        self._send_lock = asyncio.Lock()
        self._client_gone = False
        self._stdin_fd: int | None = None  # pipe write end, or the pty master
        self._master: int | None = None
        self._outputs: list[tuple[asyncio.StreamReader, asyncio.ReadTransport, int | None]] = []

    async def spawn(self, argv: list[str]) -> None:
        opts = self.opts
        child_fds: list[int] = []  # our copies of the child's ends, closed once it has them
        try:
            preexec: Callable[[], None] | None = None
            if opts.tty:
                master, slave = pty.openpty()
                self._master = self._stdin_fd = master
                child_fds.append(slave)
                os.set_blocking(master, False)
                reader, transport = await _read_fd(os.dup(master))
                self._outputs.append((reader, transport, STDOUT if opts.stdout else None))
                stdio = [slave, slave, slave]
                preexec = _take_terminal
            else:
                stdio = [asyncio.subprocess.DEVNULL] * 3
                if opts.stdin:
                    r, w = os.pipe()
                    child_fds.append(r)
                    os.set_blocking(w, False)
                    self._stdin_fd = w
                    stdio[0] = r
                for channel, wanted in ((STDOUT, opts.stdout), (STDERR, opts.stderr)):
                    if wanted:
                        r, w = os.pipe()
                        child_fds.append(w)
                        stdio[channel] = w
                        reader, transport = await _read_fd(r)
                        self._outputs.append((reader, transport, channel))
            # Its own process group: a client that goes away takes the whole command tree with it.
            self.proc = await asyncio.create_subprocess_exec(
                *argv, stdin=stdio[0], stdout=stdio[1], stderr=stdio[2], start_new_session=True,
                preexec_fn=preexec,
            )
        finally:
            for fd in child_fds:
                os.close(fd)

    async def send(self, channel: int, data: bytes) -> None:
        if self._client_gone or self.ws.closed:
            return
        try:
            async with self._send_lock:
                if self.protocol.base64:
                    await self.ws.send_str(chr(ord("0") + channel) + base64.b64encode(data).decode())
                else:
                    await self.ws.send_bytes(bytes([channel]) + data)
        except (ConnectionError, RuntimeError):
            self._client_gone = True

    async def _pump(self, reader: asyncio.StreamReader, channel: int | None) -> None:
        while data := await reader.read(READ_SIZE):
            if channel is not None:
                await self.send(channel, data)

    def _decode(self, msg: Any) -> tuple[int, bytes] | None:
        if msg.type is WSMsgType.TEXT and self.protocol.base64:
            text = str(msg.data)
            try:
                return (ord(text[0]) - ord("0"), base64.b64decode(text[1:])) if text else None
            except ValueError:
                return None
        # Binary protocols take text frames too, as the kubelet does: the python client sends str stdin
        # as text, its first character being the channel.
        if msg.type is WSMsgType.TEXT:
            data = str(msg.data).encode()
        elif msg.type is WSMsgType.BINARY:
            data = bytes(msg.data)
        else:
            return None
        return (data[0], data[1:]) if data else None

    async def _from_client(self) -> None:
        async for msg in self.ws:
            frame = self._decode(msg)
            if frame is None:
                continue
            channel, payload = frame
            if channel == STDIN and payload:
                await self._write_stdin(payload)
            elif channel == RESIZE and payload:
                self._resize(payload)
            elif channel == CLOSE and self.protocol.close_signal and payload[:1] == bytes([STDIN]):
                self._close_stdin()

    async def _write_stdin(self, data: bytes) -> None:
        if self._stdin_fd is None or not self.opts.stdin:
            return
        try:
            await _write_fd(self._stdin_fd, data)
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.EBADF, errno.EIO):
                raise
            self._close_stdin()  # the command closed its stdin or exited: drop further input

    def _close_stdin(self) -> None:
        # A pty has no half-close: its input ends when the session does.
        if self._stdin_fd is not None and self._master is None:
            os.close(self._stdin_fd)
            self._stdin_fd = None

    def _resize(self, payload: bytes) -> None:
        if self._master is None:
            return
        try:
            size = json.loads(payload)
            width, height = int(size.get("Width", 0)), int(size.get("Height", 0))
        except (ValueError, TypeError, AttributeError):
            log.debug("ignoring a bad resize message: %r", payload[:100])
            return
        with contextlib.suppress(OSError):
            fcntl.ioctl(self._master, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    async def run(self) -> None:
        proc = self.proc
        assert proc is not None
        opts = self.opts
        # As the kubelet does: an empty frame on the first stream we write tells the client we are up.
        await self.send(STDOUT if opts.stdout else STDERR if opts.stderr else ERROR, b"")
        pumps = [asyncio.create_task(self._pump(reader, channel)) for reader, _, channel in self._outputs]
        exited = asyncio.create_task(proc.wait())
        client = asyncio.create_task(self._from_client())
        try:
            await asyncio.wait({exited, client}, return_when=asyncio.FIRST_COMPLETED)
            if not exited.done():
                if (exc := client.exception()) is not None:
                    log.warning("exec %s: reading the client failed, killing the command: %r", opts.command, exc)
                else:
                    log.debug("exec %s: the client went away, killing the command", opts.command)
                self.kill()
                return
            code = exited.result()
            if pumps:
                await asyncio.wait(pumps, timeout=DRAIN_TIMEOUT)
            if code < 0:
                code = 128 - code  # killed by signal -code, as a shell reports it
            status = exit_status(opts.command, code)
            if self.protocol.status_json:
                await self.send(ERROR, json.dumps(status, separators=(",", ":")).encode())
            elif code != 0:
                await self.send(ERROR, status["message"].encode())
            await self.ws.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(client, timeout=DRAIN_TIMEOUT)
        finally:
            self.kill()
            for task in (*pumps, exited, client):
                task.cancel()
            await asyncio.gather(*pumps, exited, client, return_exceptions=True)
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                await proc.wait()
            self.close()

    def close(self) -> None:
        for _, transport, _ in self._outputs:
            transport.close()
        self._outputs.clear()
        if self._master is not None:
            os.close(self._master)
        elif self._stdin_fd is not None:
            os.close(self._stdin_fd)
        self._master = self._stdin_fd = None


class NodeServer:
    """The lab kubelet's server for the API server: container logs and exec."""

    def __init__(
        self, containers: Containers, port: int, cert: Path, key: Path, client_ca: Path, host: str = "127.0.0.1",
    ) -> None:
        self.containers = containers
        self.port = port  # 0: any free port, known after start()
        self.host = host
        self._ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(client_ca))
        self._ssl.load_cert_chain(str(cert), str(key))
        self._ssl.verify_mode = ssl.CERT_REQUIRED
        self._runner: web.AppRunner | None = None
        self._handlers: set[asyncio.Task[Any]] = set()
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/containerLogs/{namespace}/{pod}/{container}", self._logs)
        app.router.add_get("/containerLogs/{namespace}/{pod}", self._logs)
        for path in ("/exec/{namespace}/{pod}/{container}", "/exec/{namespace}/{pod}/{uid}/{container}"):
            app.router.add_get(path, self._exec)
            app.router.add_post(path, self._exec)
        app.router.add_route("*", "/{kind:attach|portForward}/{rest:.*}", self._unsupported)
        self._app = app

    async def start(self) -> None:
        runner = web.AppRunner(self._app, access_log=None, handler_cancellation=True, shutdown_timeout=5.0)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, ssl_context=self._ssl)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        log.info("node server listening on https://%s:%d", self.host, self.port)

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is None:
            return
        # Open log streams and exec sessions end now (their commands are killed), not after a timeout.
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await runner.cleanup()

    @contextlib.contextmanager
    def _tracked(self) -> Iterator[None]:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            yield
        finally:
            self._handlers.discard(task)

    async def _healthz(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text="ok")

    async def _unsupported(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPBadRequest(text=UNSUPPORTED + "\n")

    async def _logs(self, request: web.Request) -> web.StreamResponse:
        with self._tracked():
            return await self._serve_logs(request)

    async def _serve_logs(self, request: web.Request) -> web.StreamResponse:
        info, query = request.match_info, request.query
        namespace, pod, container = info["namespace"], info["pod"], info.get("container")
        follow, previous = _flag(query.get("follow")), _flag(query.get("previous"))
        params = dict(query)
        if tail := params.pop("tail", None):  # the kubelet's old name for tailLines; "all" means no limit
            params["tailLines"] = "" if tail == "all" else tail
        tail_lines = _int_param(params, "tailLines", 0)
        limit = _int_param(params, "limitBytes", 1)
        try:
            path = self.containers.log_path(namespace, pod, container, previous)
        except ContainerNotFound as exc:
            raise web.HTTPNotFound(text=f"{exc}\n") from None
        try:
            f = path.open("rb")
        except FileNotFoundError:
            what = "the previous terminated container" if previous else "the container"
            if container:
                what += f" {container!r}"
            raise web.HTTPBadRequest(text=f"{what} of pod {namespace}/{pod} has no log\n") from None
        with f:
            f.seek(tail_offset(f, tail_lines) if tail_lines is not None else 0)
            resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            sent = 0
            while True:
                chunk = f.read(READ_SIZE if limit is None else min(READ_SIZE, limit - sent))
                if chunk:
                    await resp.write(chunk)
                    sent += len(chunk)
                    if limit is not None and sent >= limit:
                        break
                    continue
                if not follow or _replaced(path, f):
                    break
                transport = request.transport
                if transport is None or transport.is_closing():
                    break
                await asyncio.sleep(POLL_INTERVAL)
            with contextlib.suppress(ConnectionError):
                await resp.write_eof()
            return resp

    async def _exec(self, request: web.Request) -> web.StreamResponse:
        with self._tracked():
            return await self._serve_exec(request)

    async def _serve_exec(self, request: web.Request) -> web.StreamResponse:
        info, query = request.match_info, request.query
        namespace, pod, container = info["namespace"], info["pod"], info["container"]
        tty = _flag(query.get("tty"))
        opts = ExecOptions(
            command=query.getall("command", []),
            stdin=_flag(query.get("input")),
            stdout=_flag(query.get("output")),
            # The kubelet drops stderr under a tty: the terminal carries both.
            stderr=_flag(query.get("error")) and not tty,
            tty=tty,
        )
        if not opts.command:
            raise web.HTTPBadRequest(text="you must specify at least one command for the container\n")
        if not (opts.stdin or opts.stdout or opts.stderr):
            raise web.HTTPBadRequest(text="you must specify at least 1 of stdin, stdout, stderr\n")
        # The container is checked before the protocol, so that a client falling back from a failed
        # WebSocket to SPDY (kubectl does on any upgrade failure) gets the same 404 both times.
        try:
            argv = self.containers.exec_argv(namespace, pod, container, opts.command)
        except ContainerNotFound as exc:
            raise web.HTTPNotFound(text=f"{exc}\n") from None
        if not web.WebSocketResponse(protocols=tuple(PROTOCOLS)).can_prepare(request).ok:
            raise web.HTTPBadRequest(text=UNSUPPORTED + "\n")
        protocol = negotiate(request.headers.getall("Sec-WebSocket-Protocol", []))
        if protocol is None:
            raise web.HTTPBadRequest(
                text=f"none of the offered WebSocket subprotocols is supported; this server speaks "
                f"{', '.join(PROTOCOLS)}\n"
            )
        ws = web.WebSocketResponse(protocols=(protocol.name,) if protocol.name else (), max_msg_size=0)
        await ws.prepare(request)
        session = ExecSession(ws, protocol, opts)
        try:
            await session.spawn(argv)
        except OSError as exc:
            session.close()
            log.warning("exec in %s/%s/%s: cannot start %s: %s", namespace, pod, container, argv, exc)
            message = f"error executing command in container: {exc}"
            status = internal_error(message)
            await session.send(ERROR, json.dumps(status).encode() if protocol.status_json else message.encode())
            await ws.close()
            return ws
        log.debug("exec in %s/%s/%s (%s): %s", namespace, pod, container, protocol.name or "v1", argv)
        await session.run()
        return ws


def _replaced(path: Path, f: BinaryIO) -> bool:
    """The file we follow was removed, replaced (rotated) or truncated: its stream is over."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return True
    mine = os.fstat(f.fileno())
    return (now.st_ino, now.st_dev) != (mine.st_ino, mine.st_dev) or now.st_size < f.tell()
