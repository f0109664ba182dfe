"""Real servers on loopback: etcd, etcd grpc-proxy, and a Kubernetes control plane.

Used by the test fixtures and by ``clustermesh lab``. Every server listens on
127.0.0.1 only, on a free port, with its files in one folder, and is stopped
with its process group. Nothing here connects anywhere but 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import random
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from clustermesh.lab.pki import CertificateAuthority, CertPair, service_account_keys

log = logging.getLogger(__name__)

KUBE_VERSION = "1.20.2"
CACHE = Path(os.environ.get("CLUSTERMESH_CACHE", Path.home() / ".cache" / "clustermesh"))


class ServerError(RuntimeError):
    """A server did not start or stopped unexpectedly; the message names its log."""


def find_binary(name: str) -> str:
    """$KUBEBUILDER_ASSETS, then PATH, then the setup script's build cache."""
    candidates = []
    if assets := os.environ.get("KUBEBUILDER_ASSETS"):
        candidates.append(Path(assets) / name)
    if found := shutil.which(name):
        candidates.append(Path(found))
    candidates.append(CACHE / f"kube-{KUBE_VERSION}" / "bin" / name)
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    raise ServerError(f"{name} not found in $KUBEBUILDER_ASSETS, PATH or {CACHE}; run scripts/setup.sh")


# Parallel test workers (pytest-xdist) each pick ports from a block of their own, below the kernel's
# ephemeral range: two workers could otherwise both be handed a port between the check and the server's
# bind, and a client of one would silently talk to the other's server.
_WORKER_PORTS = 1000
_WORKER_BASE = 20000


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the server binds it next)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not (worker.startswith("gw") and worker[2:].isdigit()):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])
    block = _WORKER_BASE + (int(worker[2:]) % 12) * _WORKER_PORTS
    for _ in range(200):
        port = block + random.randrange(_WORKER_PORTS)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise ServerError(f"no free port in {block}-{block + _WORKER_PORTS - 1} for test worker {worker}")


def _wait(what: str, check: Callable[[], bool], timeout: float, proc: Process | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.running:
            raise ServerError(f"{what} exited with {proc.returncode}; see {proc.log_path}:\n{proc.tail()}")
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.2)
    raise ServerError(f"{what} not ready after {timeout:.0f}s" + (f"; see {proc.log_path}" if proc else ""))


class Process:
    """One server process in its own process group, logging to a file."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, cgroup: Path | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.cgroup = cgroup  # joined before exec: the lab stops everything it started through it
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start it unless it runs: a second copy would lose its port to the first and hide it
        from stop(), which would then leave the first running."""
        if self.running:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        procs = self.cgroup / "cgroup.procs" if self.cgroup else None

        def join_cgroup() -> None:
            if procs is not None:
                procs.write_text(str(os.getpid()))

        with self.log_path.open("ab") as out:
            self._proc = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, preexec_fn=join_cgroup if procs else None,
            )
        log.debug("started %s pid %d: %s", self.name, self._proc.pid, " ".join(self.argv))

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc else None

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                log.error("%s (pid %d) did not die after SIGKILL", self.name, proc.pid)

    def kill(self) -> None:
        self.stop(timeout=5, sig=signal.SIGKILL)


def _http_ok(url: str, token: str | None = None, ca: Path | None = None, client: CertPair | None = None) -> bool:
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    ctx = ssl.create_default_context(cafile=str(ca)) if ca else None
    if ctx is not None and client is not None:
        ctx.load_cert_chain(str(client.cert), str(client.key))
    try:
        with urllib.request.urlopen(req, timeout=2, context=ctx) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


class EtcdServer:
    """A single-member etcd on 127.0.0.1; ``stop()`` keeps the data for ``start()`` again.

    With ``pki``, it serves TLS and requires client certificates; the client
    certificate's CN is the etcd user once :meth:`enable_auth` has run. ``admin``
    (CN ``root``) is the certificate of the store's writer, the operator.
    """

    def __init__(
        self,
        directory: Path,
        name: str = "etcd",
        client_port: int | None = None,
        pki: CertificateAuthority | None = None,
        cgroup: Path | None = None,
    ) -> None:
        self.directory = directory
        self.name = name
        self.pki = pki
        self.client_port = client_port or free_port()
        self.peer_port = free_port()
        scheme = "https" if pki else "http"
        self.url = f"{scheme}://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        argv = [
            find_etcd(),
            f"--name={name}",
            f"--data-dir={directory / 'data'}",
            f"--listen-client-urls={self.url}",
            f"--advertise-client-urls={self.url}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster={name}={peer}",
            "--initial-cluster-state=new",
            "--enable-v2=false",
            "--snapshot-count=10000",
        ]
        self.admin: CertPair | None = None
        if pki is not None:
            serving = pki.issue(f"etcd-{name}", f"etcd-{name}", client=False)
            self.admin = pki.issue(f"etcd-{name}-root", "root", server=False)
            argv += [
                f"--cert-file={serving.cert}",
                f"--key-file={serving.key}",
                f"--trusted-ca-file={pki.cert_path}",
                "--client-cert-auth",
            ]
        self.process = Process(name, argv, directory / f"{name}.log", cgroup)

    def start(self, timeout: float = 30.0) -> EtcdServer:
        self.process.start()
        ca = self.pki.cert_path if self.pki else None
        _wait(
            f"etcd {self.name} at {self.url}",
            lambda: _http_ok(f"{self.url}/health", ca=ca, client=self.admin),
            timeout,
            self.process,
        )
        return self

    def stop(self) -> None:
        self.process.stop()

    def kill(self) -> None:
        self.process.kill()

    def client_cert(self, user: str) -> CertPair:
        """A client certificate for etcd user ``user`` (its CN)."""
        if self.pki is None:
            raise ServerError(f"etcd {self.name} runs without TLS: no client certificates")
        return self.pki.issue(f"etcd-{self.name}-user-{user}", user, server=False)

    def etcdctl(self, *args: str) -> str:
        if self.pki is None or self.admin is None:
            raise ServerError("etcdctl here is for the TLS store only")
        etcdctl = shutil.which("etcdctl")
        if etcdctl is None:
            raise ServerError("etcdctl not found; run scripts/setup.sh (Debian package etcd-client)")
        res = subprocess.run(
            [etcdctl, f"--endpoints={self.url}", f"--cacert={self.pki.cert_path}",
             f"--cert={self.admin.cert}", f"--key={self.admin.key}", *args],
            capture_output=True, text=True, timeout=30, env={**os.environ, "ETCDCTL_API": "3"},
        )
        if res.returncode != 0:
            raise ServerError(f"etcdctl {' '.join(args)}: {res.stderr.strip()}")
        return res.stdout

    def enable_auth(self, read_only: dict[str, tuple[str, list[str]]]) -> None:
        """Turn on etcd auth: ``root`` (the admin certificate's CN) may do anything;
        each user of ``read_only`` (name -> (password, prefixes)) may only read keys
        under its prefixes. Remote clusters are such users: through the grpc-proxy
        they authenticate with a password (the proxy forwards their token)."""
        self.etcdctl("user", "add", "root", "--no-password")
        self.etcdctl("user", "grant-role", "root", "root")
        for user, (password, prefixes) in read_only.items():
            role = f"{user}-read"
            self.etcdctl("role", "add", role)
            for prefix in prefixes:
                self.etcdctl("role", "grant-permission", role, "read", prefix, "--prefix=true")
            self.etcdctl("user", "add", f"{user}:{password}")
            self.etcdctl("user", "grant-role", user, role)
        self.etcdctl("auth", "enable")


def find_etcd() -> str:
    path = shutil.which("etcd")
    if path is None:
        raise ServerError("etcd not found on PATH; run scripts/setup.sh (Debian package etcd-server)")
    return path


class EtcdGrpcProxy:
    """``etcd grpc-proxy start --namespace``: what a remote cluster is allowed to see.

    A client of the proxy reads ``<namespace><key>`` of the backing etcd as
    ``<key>``, and cannot reach anything outside the namespace. With ``pki``
    the proxy serves TLS and talks to etcd with ``backend_cert``, which must have
    no common name (etcd 3.4's proxy refuses one); remote clusters authenticate
    as their own etcd user through it, so etcd applies that user's permissions.
    """

    def __init__(
        self,
        directory: Path,
        backend: str,
        namespace: str,
        name: str = "grpc-proxy",
        pki: CertificateAuthority | None = None,
        backend_cert: CertPair | None = None,
        cgroup: Path | None = None,
        crl: Path | None = None,
    ) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        self.url = f"{'https' if pki else 'http'}://127.0.0.1:{self.port}"
        self.namespace = namespace
        argv = [
            find_etcd(),
            "grpc-proxy",
            "start",
            f"--endpoints={backend.split('://', 1)[-1]}",
            f"--listen-addr=127.0.0.1:{self.port}",
            f"--metrics-addr=http://127.0.0.1:{self.metrics_port}",
            f"--namespace={namespace}",
            f"--data-dir={directory / name}",
        ]
        if pki is not None:
            if backend_cert is None:
                raise ServerError("a TLS grpc-proxy needs the certificate it uses towards etcd")
            serving = pki.issue(f"{name}-serving", name, client=False)
            argv += [
                f"--cacert={pki.cert_path}",
                f"--cert={backend_cert.cert}",
                f"--key={backend_cert.key}",
                f"--trusted-ca-file={pki.cert_path}",
                f"--cert-file={serving.cert}",
                f"--key-file={serving.key}",
            ]
            if crl is not None:
                # Read again at every handshake: a revoked reader is refused without a restart.
                argv.append(f"--client-crl-file={crl}")
        self.process = Process(name, argv, directory / f"{name}.log", cgroup)

    def start(self, timeout: float = 30.0) -> EtcdGrpcProxy:
        self.process.start()
        _wait(
            f"etcd grpc-proxy at {self.url}",
            lambda: _http_ok(f"http://127.0.0.1:{self.metrics_port}/health"),
            timeout,
            self.process,
        )
        return self

    def stop(self) -> None:
        self.process.stop()


class ControlPlane:
    """etcd + kube-apiserver (+ controller-manager, scheduler) of one local cluster.

    Auth: a static admin token (group system:masters) in a kubeconfig that
    ``kubectl --kubeconfig`` and the Python clients use as is.
    """

    def __init__(
        self,
        directory: Path,
        name: str = "cluster",
        service_cidr: str = "10.96.0.0/16",
        pod_cidr: str = "10.244.0.0/16",
        controller_manager: bool = True,
        scheduler: bool = False,
        cgroup: Path | None = None,
        advertise_address: str = "127.0.0.1",
    ) -> None:
        """``advertise_address`` is the `kubernetes` Service's endpoint (the lab's nodes forward it
        to 127.0.0.1); the API server itself listens on 127.0.0.1 only."""
        self.directory = directory
        self.advertise_address = advertise_address
        self.name = name
        self.service_cidr = service_cidr
        self.pod_cidr = pod_cidr
        directory.mkdir(parents=True, exist_ok=True)
        self.pki = CertificateAuthority(directory / "pki")
        # In-cluster clients reach it as the `kubernetes` Service (its ClusterIP) or its endpoint.
        first_service_ip = str(next(ipaddress.ip_network(service_cidr).hosts()))
        self.serving = self.pki.issue(
            "apiserver", "kube-apiserver", ips=tuple(dict.fromkeys(("127.0.0.1", first_service_ip, advertise_address))),
            dns=("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                 "kubernetes.default.svc.cluster.local"),
        )
        self.sa = service_account_keys(directory / "pki")
        # The API server's identity towards node agents (logs, exec); they trust this CA.
        self.kubelet_client = self.pki.issue(
            "apiserver-kubelet-client", "kube-apiserver-kubelet-client", organizations=("system:masters",),
            server=False,
        )
        self.token = secrets.token_hex(16)
        (directory / "tokens.csv").write_text(f'{self.token},admin,admin,"system:masters"\n')
        self.etcd = EtcdServer(directory / "etcd", name=f"{name}-k8s-etcd", cgroup=cgroup)
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.kubeconfig = directory / "kubeconfig"
        self._want_kcm = controller_manager
        self._want_scheduler = scheduler
        self.apiserver = Process(
            "kube-apiserver",
            [
                find_binary("kube-apiserver"),
                f"--etcd-servers={self.etcd.url}",
                "--bind-address=127.0.0.1",
                f"--advertise-address={advertise_address}",
                f"--secure-port={self.port}",
                "--insecure-port=0",
                f"--tls-cert-file={self.serving.cert}",
                f"--tls-private-key-file={self.serving.key}",
                f"--client-ca-file={self.pki.cert_path}",
                f"--token-auth-file={directory / 'tokens.csv'}",
                "--authorization-mode=Node,RBAC",
                f"--service-cluster-ip-range={service_cidr}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={self.sa.cert}",
                f"--service-account-signing-key-file={self.sa.key}",
                "--endpoint-reconciler-type=none",
                "--allow-privileged=true",
                # Node agents listen on 127.0.0.1 (an InternalDNS address of their Node), never on a lab address.
                "--kubelet-preferred-address-types=InternalDNS",
                f"--kubelet-certificate-authority={self.pki.cert_path}",
                f"--kubelet-client-certificate={self.kubelet_client.cert}",
                f"--kubelet-client-key={self.kubelet_client.key}",
                "--profiling=false",
                f"--cert-dir={directory / 'apiserver-certs'}",
            ],
            directory / "kube-apiserver.log", cgroup,
        )
        self.controller_manager = Process(
            "kube-controller-manager",
            [
                find_binary("kube-controller-manager"),
                f"--kubeconfig={self.kubeconfig}",
                "--leader-elect=false",
                "--port=0",
                "--secure-port=0",
                f"--service-account-private-key-file={self.sa.key}",
                f"--root-ca-file={self.pki.cert_path}",
                "--use-service-account-credentials=false",
                "--controllers=*,-csrsigning,-csrapproving,-csrcleaner",
                "--allocate-node-cidrs=true",
                f"--cluster-cidr={pod_cidr}",
                "--node-cidr-mask-size=24",
                f"--service-cluster-ip-range={service_cidr}",
                "--concurrent-endpoint-syncs=10",
                "--concurrent-service-endpoint-syncs=10",
                "--endpointslice-updates-batch-period=0s",
                "--profiling=false",
            ],
            directory / "kube-controller-manager.log", cgroup,
        )
        self.scheduler = Process(
            "kube-scheduler",
            [
                find_binary("kube-scheduler"),
                f"--kubeconfig={self.kubeconfig}",
                "--leader-elect=false",
                "--port=0",
                "--secure-port=0",
            ],
            directory / "kube-scheduler.log", cgroup,
        )

    def write_kubeconfig(self, path: Path, context: str | None = None) -> Path:
        context = context or self.name
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": context,
                    "cluster": {"server": self.url, "certificate-authority": str(self.pki.cert_path)},
                }
            ],
            "users": [{"name": f"{context}-admin", "user": {"token": self.token}}],
            "contexts": [{"name": context, "context": {"cluster": context, "user": f"{context}-admin"}}],
            "current-context": context,
        }
        path.write_text(json.dumps(config, indent=2))
        path.chmod(0o600)
        return path

    def ready(self) -> bool:
        return _http_ok(f"{self.url}/readyz", self.token, self.pki.cert_path)

    def start(self, timeout: float = 90.0) -> ControlPlane:
        self.write_kubeconfig(self.kubeconfig)
        self.etcd.start()
        self.apiserver.start()
        _wait(f"kube-apiserver at {self.url}", self.ready, timeout, self.apiserver)
        if self._want_kcm:
            self.controller_manager.start()
        if self._want_scheduler:
            self.scheduler.start()
        return self

    def processes(self) -> Iterator[Process]:
        """The processes this control plane runs, the ones depending on others first."""
        if self._want_scheduler:
            yield self.scheduler
        if self._want_kcm:
            yield self.controller_manager
        yield from (self.apiserver, self.etcd.process)

    def stop(self) -> None:
        for proc in self.processes():
            proc.stop()
