"""The node agent's HTTPS server behind a real kube-apiserver 1.20: kubectl logs / exec and the python client.

The containers are faked: a pod's log is a file the test writes, and "exec in the container" runs the
command on the host. What is under test is the path API server -> node server and the protocols.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import select
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from clustermesh.lab.node.server import ContainerNotFound, NodeServer
from tests.prereq import require_binary

pytestmark = pytest.mark.integration

NODE = "node-server-test"
POD = "node-server-test"
CONTAINER = "main"
LOG = b"one\ntwo\nthree\n"


class FakeContainers:
    """One pod with one container; its log is a file, exec runs on the host."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _check(self, namespace: str, pod: str, container: str | None) -> str:
        if (namespace, pod) != ("default", POD):
            raise ContainerNotFound(f"pod {namespace}/{pod} is not on node {NODE}")
        if container not in (None, CONTAINER):
            raise ContainerNotFound(f"pod {namespace}/{pod} has no container {container!r}; it has {CONTAINER!r}")
        return CONTAINER

    def log_path(self, namespace: str, pod: str, container: str | None, previous: bool) -> Path:
        name = self._check(namespace, pod, container)
        return self.directory / (f"{name}.previous.log" if previous else f"{name}.log")

    def exec_argv(self, namespace: str, pod: str, container: str | None, command: list[str]) -> list[str]:
        self._check(namespace, pod, container)
        return command


class ServerThread:
    """The asyncio server on its own loop in a thread, so tests can call blocking kubectl."""

    def __init__(self, server: NodeServer) -> None:
        self.server = server
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="node-server", daemon=True)

    def start(self) -> None:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)

    def stop(self) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(15)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


def run_kubectl(kubeconfig: str, *args: str, stdin: str | None = None, env: dict[str, str] | None = None,
                timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["kubectl", "--kubeconfig", kubeconfig, *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def ok(kubeconfig: str, *args: str, stdin: str | None = None) -> str:
    res = run_kubectl(kubeconfig, *args, stdin=stdin)
    assert res.returncode == 0, f"kubectl {' '.join(args)}: {res.stderr}"
    return res.stdout


@pytest.fixture(scope="module")
def logs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("node-server-logs")


@pytest.fixture(scope="module")
def node(control_plane: Any, logs_dir: Path) -> Iterator[str]:
    """A Node whose agent is our server, and a pod bound to it; yields the kubeconfig."""
    require_binary("kubectl")
    kubeconfig = str(control_plane.kubeconfig)
    serving = control_plane.pki.issue("node-server-test", f"system:node:{NODE}", ips=("127.0.0.1",))
    runner = ServerThread(NodeServer(FakeContainers(logs_dir), 0, serving.cert, serving.key,
                                     control_plane.pki.cert_path))
    runner.start()
    try:
        ok(kubeconfig, "apply", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "Node",
                                                             "metadata": {"name": NODE}}))
        status = {"status": {
            "addresses": [{"type": "InternalDNS", "address": "127.0.0.1"}, {"type": "Hostname", "address": NODE}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": runner.server.port}},
        }}
        ok(kubeconfig, "patch", "node", NODE, "--subresource=status", "--type=merge", "-p", json.dumps(status))
        # The 1.20 ServiceAccount admission refuses pods until ServiceAccount "default" exists, which the
        # controller-manager makes some 10 s after start. Making it ourselves is the same object, sooner;
        # without a mounted token the pod needs no token secret either.
        run_kubectl(kubeconfig, "-n", "default", "create", "serviceaccount", "default")
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": POD, "namespace": "default"},
               "spec": {"nodeName": NODE, "automountServiceAccountToken": False,
                        "containers": [{"name": CONTAINER, "image": "lab/none"}]}}
        deadline = time.monotonic() + 30
        while (res := run_kubectl(kubeconfig, "apply", "-f", "-", stdin=json.dumps(pod))).returncode != 0:
            assert time.monotonic() < deadline, f"cannot create the pod: {res.stderr}"
            time.sleep(0.3)
        yield kubeconfig
    finally:
        run_kubectl(kubeconfig, "-n", "default", "delete", "pod", POD, "--force", "--grace-period=0",
                    "--wait=false", "--ignore-not-found")
        run_kubectl(kubeconfig, "delete", "node", NODE, "--wait=false", "--ignore-not-found")
        runner.stop()


@pytest.fixture
def log_file(logs_dir: Path) -> Path:
    path = logs_dir / f"{CONTAINER}.log"
    path.write_bytes(LOG)
    return path


def read_until(proc: subprocess.Popen[bytes], needle: bytes, timeout: float = 10) -> bytes:
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"no {needle!r} after {timeout}s; got {seen!r}"
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 4096)
            assert chunk, f"stream ended before {needle!r}; got {seen!r}"
            seen += chunk
    return seen


def test_logs(node: str, log_file: Path) -> None:
    assert ok(node, "logs", POD) == LOG.decode()


def test_logs_tail_and_limit(node: str, log_file: Path) -> None:
    assert ok(node, "logs", POD, "--tail=2") == "two\nthree\n"
    assert ok(node, "logs", POD, "--tail=0") == ""
    assert ok(node, "logs", POD, "--limit-bytes=6") == "one\ntw"


def test_logs_previous_missing(node: str, log_file: Path) -> None:
    res = run_kubectl(node, "logs", POD, "--previous")
    assert res.returncode != 0
    assert "previous terminated container 'main' of pod default/node-server-test has no log" in res.stderr


def test_logs_follow(node: str, log_file: Path) -> None:
    proc = subprocess.Popen(["kubectl", "--kubeconfig", node, "logs", "-f", POD], stdout=subprocess.PIPE)
    try:
        assert read_until(proc, b"three\n") == LOG
        with log_file.open("ab") as f:
            f.write(b"four\n")
        assert read_until(proc, b"four\n") == b"four\n"
    finally:
        proc.kill()
        proc.wait(5)
        assert proc.stdout is not None
        proc.stdout.close()


def test_exec_streams_and_exit_code(node: str) -> None:
    res = run_kubectl(node, "exec", POD, "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert res.stdout == "out\n"
    assert res.stderr.startswith("err\n")
    assert "command terminated with exit code 3" in res.stderr
    assert res.returncode == 3


def test_exec_stdin_closes(node: str) -> None:
    # kubectl speaks v5: when its stdin ends it sends the CLOSE signal, and cat sees end of file.
    res = run_kubectl(node, "exec", "-i", POD, "--", "cat", stdin="hello\nworld\n", timeout=15)
    assert (res.returncode, res.stdout) == (0, "hello\nworld\n"), res.stderr


def test_exec_unknown_container(node: str) -> None:
    res = run_kubectl(node, "exec", POD, "-c", "other", "--", "true")
    assert res.returncode != 0  # the API server refuses a container the pod does not have


def test_spdy_is_refused_clearly(node: str) -> None:
    res = run_kubectl(node, "exec", POD, "--", "true", env={"KUBECTL_REMOTE_COMMAND_WEBSOCKETS": "false"})
    assert res.returncode != 0
    assert "speaks the WebSocket channel protocol only" in res.stderr


def core_api(kubeconfig: str) -> Any:
    from kubernetes import client, config

    return client.CoreV1Api(config.new_client_from_config(config_file=kubeconfig))


def finish(ws: Any) -> None:
    """Wait for the server to end the session (it closes the socket after the exit status)."""
    ws.run_forever(timeout=10)
    if ws.is_open():
        ws.close()
        pytest.fail("the session was still open 10 s later")


def test_python_client_v4(node: str) -> None:
    from kubernetes.stream import stream

    ws = stream(core_api(node).connect_get_namespaced_pod_exec, POD, "default",
                command=["sh", "-c", "echo out; echo err >&2; exit 4"], stdout=True, stderr=True, stdin=False,
                tty=False, _preload_content=False, _headers={"sec-websocket-protocol": "v4.channel.k8s.io"})
    finish(ws)
    assert ws.subprotocol == "v4.channel.k8s.io"
    assert (ws.read_stdout(timeout=0), ws.read_stderr(timeout=0), ws.returncode) == ("out\n", "err\n", 4)


def test_python_client_tty_resize(node: str) -> None:
    from kubernetes.stream import stream

    ws = stream(core_api(node).connect_get_namespaced_pod_exec, POD, "default",
                command=["sh", "-c", "read go; stty size; tty"], stdout=True, stderr=True, stdin=True,
                tty=True, _preload_content=False)
    ws.write_channel(4, json.dumps({"Width": 100, "Height": 30}))
    ws.write_stdin("go\n")
    finish(ws)
    out = ws.read_stdout(timeout=0)
    assert "30 100\r\n" in out, out
    assert "/dev/pts/" in out, out
    assert ws.returncode == 0


def sleepers(marker: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[:2] == [b"sleep", marker.encode()]:
            found.append(int(pid))
    return found


def test_client_gone_kills_command(node: str) -> None:
    from kubernetes.stream import stream

    marker = f"{300 + os.getpid() % 1000}.5"
    ws = stream(core_api(node).connect_get_namespaced_pod_exec, POD, "default",
                command=["sh", "-c", f"echo started; exec sleep {marker}"], stdout=True, stderr=True,
                stdin=False, tty=False, _preload_content=False)
    assert ws.readline_stdout(timeout=10) == "started"
    assert sleepers(marker)
    ws.close()
    deadline = time.monotonic() + 5
    while sleepers(marker):
        assert time.monotonic() < deadline, "the command outlived its client"
        time.sleep(0.1)


def test_direct_v1_base64_refusals_and_stop(tmp_path: Path) -> None:
    """Without the API server: the older subprotocols, what is refused, and stop() ending live sessions."""
    import ssl

    import aiohttp

    from clustermesh.lab.pki import CertificateAuthority

    ca = CertificateAuthority(tmp_path / "pki")
    serving = ca.issue("node", "node", server=True, client=False)
    client = ca.issue("apiserver", "apiserver", server=False)
    ctx = ssl.create_default_context(cafile=str(ca.cert_path))
    ctx.load_cert_chain(str(client.cert), str(client.key))
    query = "command=sh&command=-c&command=echo+hi%3B+exit+2&output=1&error=1"
    marker = f"{1300 + os.getpid() % 1000}.5"

    async def scenario() -> None:
        server = NodeServer(FakeContainers(tmp_path), 0, serving.cert, serving.key, ca.cert_path)
        await server.start()
        base = f"https://127.0.0.1:{server.port}"
        try:
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{base}/healthz", ssl=ctx) as resp:
                    assert (resp.status, await resp.text()) == (200, "ok")
                async with http.post(f"{base}/portForward/default/{POD}", ssl=ctx) as resp:
                    assert resp.status == 400 and "port-forward are not supported" in await resp.text()
                async with http.get(f"{base}/containerLogs/default/other/{CONTAINER}", ssl=ctx) as resp:
                    assert resp.status == 404 and "pod default/other is not on node" in await resp.text()
                url = f"{base}/exec/default/{POD}/{CONTAINER}?{query}"
                async with http.ws_connect(url, ssl=ctx, protocols=["channel.k8s.io"]) as ws:
                    frames = [m.data async for m in ws]
                assert frames[:2] == [b"\x01", b"\x01hi\n"]  # the kubelet's "streams are up", then stdout
                assert frames[2].startswith(b"\x03command terminated with non-zero exit code")  # v1: bare text
                async with http.ws_connect(url, ssl=ctx, protocols=["v4.base64.channel.k8s.io"]) as ws:
                    frames = [m.data async for m in ws]
                assert frames[:2] == ["1", "1" + base64.b64encode(b"hi\n").decode()]
                status = json.loads(base64.b64decode(frames[2][1:]))
                assert status["details"]["causes"] == [{"reason": "ExitCode", "message": "2"}]
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    await http.ws_connect(url, ssl=ctx, protocols=["v9.channel.k8s.io"])
                assert refused.value.status == 400
                live = await http.ws_connect(f"{base}/exec/default/{POD}/{CONTAINER}?command=sleep&command={marker}"
                                             f"&output=1", ssl=ctx, protocols=["v5.channel.k8s.io"])
                assert (await live.receive()).data == b"\x01"
                assert sleepers(marker)
                await asyncio.wait_for(server.stop(), 5)
                await live.close()
            async with aiohttp.ClientSession() as http:
                await server.start()
                with pytest.raises(aiohttp.ClientError):  # no client certificate: no service
                    await http.get(f"https://127.0.0.1:{server.port}/healthz",
                                   ssl=ssl.create_default_context(cafile=str(ca.cert_path)))
        finally:
            await server.stop()

    asyncio.run(scenario())
    deadline = time.monotonic() + 5
    while sleepers(marker):
        assert time.monotonic() < deadline, "stop() left the command running"
        time.sleep(0.1)
