"""The lab's images: a container image names a local program instead of a filesystem to pull.

The lab has no container runtime and pulls nothing. Each image it knows maps to a program on this
machine that behaves as the image does for the things Kubernetes manifests rely on: its ENTRYPOINT and
CMD (so ``command``/``args`` combine with them by Kubernetes' rules), its STOPSIGNAL, its WORKDIR, the
port it serves. Commands a Pod gives (``sh -c ...``, ``curl ...``) run the host's binaries of that name.

``CATALOG`` below is the only list; README "Lab images" shows it (``catalog_table()``). An image outside it
makes ``resolve`` raise ``ImageNotInCatalog``, which the node agent reports as a kubelet reports a failed
pull (waiting reason ErrImagePull); a command with no binary on the host raises ``CommandNotFound``
(CreateContainerError).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

# Docker's default PATH for images that do not set their own.
IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The venv this process runs from: the project's console script and Python live there.
VENV_BIN = str(Path(sys.executable).parent)
JSON_MOCK_MODULE = "clustermesh.lab.node.images.json_mock"


@dataclass(frozen=True)
class Image:
    """What the lab knows of one image: the parts of its config Kubernetes combines with a Pod's spec."""

    runs: str  # for README "Lab images"
    aliases: tuple[str, ...] = ()  # other normalised names of the same image
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=lambda: {"PATH": IMAGE_PATH})
    stop_signal: int = signal.SIGTERM
    workdir: str = "/"
    # "nginx": an nginx command gets a generated config; "curl": the curlimages entrypoint's rule (an
    # argument list that does not start with a command is curl's); "busybox": applets via a host busybox.
    flavour: str = ""
    # The name's last path component is enough, whatever the registry or organisation (our own image).
    any_registry: bool = False
    port: int = 80


CATALOG: dict[str, Image] = {
    "nginx": Image(
        runs="Debian's /usr/sbin/nginx with a generated config: port 80, root /usr/share/nginx/html, "
             "logs to stdout/stderr (STOPSIGNAL SIGQUIT: graceful)",
        cmd=("nginx", "-g", "daemon off;"), stop_signal=signal.SIGQUIT, flavour="nginx"),
    "nginxinc/nginx-unprivileged": Image(
        runs="the same nginx on port 8080", cmd=("nginx", "-g", "daemon off;"),
        stop_signal=signal.SIGQUIT, flavour="nginx", port=8080),
    "cilium/json-mock": Image(
        runs="clustermesh.lab.node.images.json_mock: a JSON HTTP server on port 80 (GET /, /db, /public, "
             "/private; 404 otherwise; one log line per request)",
        aliases=("quay.io/cilium/json-mock",),
        entrypoint=(sys.executable, "-m", JSON_MOCK_MODULE)),
    "curlimages/curl": Image(
        runs="the host's curl (arguments starting with '-' or not naming a command go to curl)",
        cmd=("curl",), flavour="curl"),
    "busybox": Image(runs="the host's sh (CMD sh); applets are host binaries, else the host's busybox", cmd=("sh",),
                     flavour="busybox"),
    "alpine": Image(runs="the host's /bin/sh (CMD /bin/sh) and host binaries", cmd=("/bin/sh",)),
    "nicolaka/netshoot": Image(runs="the host's zsh, else bash (CMD zsh) and host binaries", cmd=("zsh",),
                               workdir="/root"),
    "debian": Image(runs="the host's bash (CMD bash) and host binaries", cmd=("bash",)),
    "ubuntu": Image(runs="the host's bash (CMD bash) and host binaries", cmd=("bash",)),
    "registry.k8s.io/pause": Image(runs="the host's `sleep infinity`", aliases=("k8s.gcr.io/pause",),
                                   entrypoint=("sleep", "infinity")),
    "clustermesh": Image(
        runs="this project's installed `clustermesh` console script (any registry and tag, e.g. clustermesh:dev)",
        entrypoint=("clustermesh",), env={"PATH": f"{VENV_BIN}:{IMAGE_PATH}"}, any_registry=True),
    "quay.io/coreos/etcd": Image(
        runs="Debian's etcd (CMD etcd)", cmd=("etcd",),
        aliases=("gcr.io/etcd-development/etcd", "registry.k8s.io/etcd", "k8s.gcr.io/etcd")),
}

# Shells some images have and a Debian host may not: the nearest one the host has stands in.
SHELL_STANDINS: dict[str, tuple[str, ...]] = {"zsh": ("bash", "sh"), "ash": ("sh",)}


class ImageNotInCatalog(LookupError):
    def __init__(self, image: str) -> None:
        self.image = image
        super().__init__(image)

    def __str__(self) -> str:
        return f'image "{self.image}" is not in the lab\'s catalog ({", ".join(CATALOG)}); see README "Lab images"'


class CommandNotFound(LookupError):
    """The container's command names no binary on this machine (the kubelet's CreateContainerError)."""


@dataclass(frozen=True)
class Program:
    argv: list[str]  # absolute path first; the image's ENTRYPOINT/CMD and the Pod's command/args combined
    env: dict[str, str]  # the image's defaults; the Pod's env overrides them
    stop_signal: int
    workdir: str


def normalise(image: str) -> str:
    """The catalog's key for an image reference: no default registry, no ``library/``, tag or digest."""
    name = image.strip().lower().split("@", 1)[0]
    last_slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > last_slash:  # a colon before the last slash is a registry's port, not a tag
        name = name[:colon]
    for prefix in ("docker.io/", "index.docker.io/", "registry-1.docker.io/"):
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    return name.removeprefix("library/")


def lookup(image: str) -> Image:
    """The catalog entry for an image reference, or ``ImageNotInCatalog``."""
    name = normalise(image)
    for key, entry in CATALOG.items():
        if name == key or name in entry.aliases:
            return entry
    last = name.rsplit("/", 1)[-1]
    for key, entry in CATALOG.items():
        if entry.any_registry and last == key:
            return entry
    raise ImageNotInCatalog(image)


def catalog_table() -> list[tuple[str, str]]:
    """(image, what runs) for README "Lab images"; the image column lists aliases too."""
    rows = []
    for key, entry in CATALOG.items():
        names = ", ".join(f"`{n}`" for n in (key, *entry.aliases))
        if entry.any_registry:
            names += " (any registry)"
        rows.append((names, entry.runs))
    return rows


def kubernetes_argv(entry: Image, command: Sequence[str] | None, args: Sequence[str] | None) -> list[str]:
    """Kubernetes' rule: command replaces ENTRYPOINT (and drops CMD); args replace CMD. Empty means unset."""
    if command:
        return [*command, *(args or ())]
    if args:
        return [*entry.entrypoint, *args]
    return [*entry.entrypoint, *entry.cmd]


def resolve(image: str, command: list[str] | None, args: list[str] | None, scratch: Path) -> Program:
    """The program that runs a container of ``image``; ``scratch`` is the container's own writable folder."""
    entry = lookup(image)
    argv = kubernetes_argv(entry, command, args)
    if not argv:
        raise CommandNotFound(f'no command specified: image "{image}" has no ENTRYPOINT or CMD and the Pod '
                              "gives no command")
    path = entry.env.get("PATH", IMAGE_PATH)
    if not command and entry.flavour == "curl" and (argv[0].startswith("-") or _find(argv[0], path, "/") is None):
        argv = ["curl", *argv]
    if entry.flavour == "nginx" and Path(argv[0]).name == "nginx-debug":  # Debian ships one binary
        argv = ["nginx", *argv[1:]]
    binary = _find(argv[0], path, entry.workdir)
    if binary is None and entry.flavour == "busybox" and "/" not in argv[0] and not argv[0].startswith("-"):
        host_busybox = shutil.which("busybox", path=path)
        if host_busybox is not None:
            argv, binary = ["busybox", *argv], host_busybox
    if binary is None:
        hint = " (scripts/setup.sh installs nginx-light)" if Path(argv[0]).name == "nginx" else ""
        raise CommandNotFound(f'exec: "{argv[0]}": executable file not found in $PATH{hint}; the lab runs image '
                              f'"{image}" with this machine\'s binaries, see README "Lab images"')
    argv = [binary, *argv[1:]]
    if entry.flavour == "nginx" and Path(binary).name == "nginx":
        argv = _nginx_argv(argv, scratch, entry.port)
    return Program(argv=argv, env=dict(entry.env), stop_signal=entry.stop_signal, workdir=entry.workdir)


def _find(name: str, path: str, workdir: str) -> str | None:
    """The binary ``name`` stands for on this machine: an existing path, else the same name on ``path``."""
    if "/" in name:
        candidate = Path(name) if name.startswith("/") else Path(workdir) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
        if not name.startswith("/"):
            return None
        # /usr/local/bin/etcd, /bin/ash and friends: where the image keeps it is not where Debian does.
        name = candidate.name
    for candidate_name in (name, *SHELL_STANDINS.get(name, ())):
        found = shutil.which(candidate_name, path=path)
        if found is not None:
            return found
    return None


# --- nginx -------------------------------------------------------------------------------------------------

def _option_value(argv: Sequence[str], flag: str) -> list[str]:
    """Every value of an nginx single-letter option, given as ``-g VALUE`` or ``-gVALUE``."""
    values = []
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            values.append(argv[i + 1])
        elif arg.startswith(flag) and len(arg) > len(flag):
            values.append(arg[len(flag):])
    return values


def _nginx_argv(argv: list[str], scratch: Path, port: int) -> list[str]:
    """The Pod's nginx command with the generated config (unless it gives ``-c``) and errors on stderr."""
    binary, rest = argv[0], argv[1:]
    extra: list[str] = []
    if not _option_value(rest, "-c"):
        overridden = {d.split()[0] for g in _option_value(rest, "-g") for d in g.split(";") if d.split()}
        version, configure = nginx_build(binary)
        conf = write_nginx_conf(scratch, port=port, skip=overridden,
                                uwsgi="--without-http_uwsgi_module" not in configure,
                                scgi="--without-http_scgi_module" not in configure)
        extra += ["-c", str(conf)]
        # Before it reads its config nginx logs to a compiled-in file; -e (1.19.5+) sends that to stderr too.
        if version >= (1, 19, 5) and not _option_value(rest, "-e"):
            extra += ["-e", "stderr"]
    return [binary, *extra, *rest]


@functools.cache
def nginx_build(binary: str) -> tuple[tuple[int, ...], str]:
    """(version, configure arguments) of an nginx binary, from ``nginx -V``."""
    try:
        out = subprocess.run([binary, "-V"], capture_output=True, text=True, timeout=10).stderr
    except (OSError, subprocess.SubprocessError):
        return (0,), ""
    match = re.search(r"nginx/(\d+(?:\.\d+)*)", out)
    version = tuple(int(p) for p in match.group(1).split(".")) if match else (0,)
    return version, out


NGINX_TEMP_DIRS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def write_nginx_conf(scratch: Path, *, port: int = 80, skip: set[str] | frozenset[str] = frozenset(),
                     uwsgi: bool = True, scgi: bool = True) -> Path:
    """Write ``scratch/nginx.conf``: the official image's defaults with every writable path in ``scratch``.

    ``skip`` names main-context directives the command line sets with ``-g`` (nginx refuses duplicates).
    The master runs as root and its workers as nobody: the temp folders are world-writable and
    ``scratch`` world-traversable so that workers can buffer request bodies there.
    """
    scratch.mkdir(parents=True, exist_ok=True)
    os.chmod(scratch, scratch.stat().st_mode | 0o111)
    temp = scratch / "nginx-temp"
    temp.mkdir(exist_ok=True)
    os.chmod(temp, 0o777)
    for name in NGINX_TEMP_DIRS:
        (temp / name).mkdir(exist_ok=True)
        os.chmod(temp / name, 0o777)
    main = {
        "daemon": "daemon off;",  # the kubelet supervises the master: it must stay in the foreground
        "worker_processes": "worker_processes 1;",
        "pid": f"pid {scratch / 'nginx.pid'};",
        "error_log": "error_log stderr notice;",
    }
    modules = {"client_body": True, "proxy": True, "fastcgi": True, "uwsgi": uwsgi, "scgi": scgi}
    temp_paths = "\n".join(f"    {name}_temp_path {temp / name};" for name, present in modules.items() if present)
    html = "/usr/share/nginx/html"
    text = f"""# Written by the clustermesh lab's node agent: the official nginx image's defaults, with the pid
# file and temp folders in this container's scratch folder and the logs on stdout/stderr.
{chr(10).join(line for name, line in main.items() if name not in skip)}

events {{
    worker_connections 1024;
}}

http {{
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    log_format main '$remote_addr - $remote_user [$time_local] "$request" '
                    '$status $body_bytes_sent "$http_referer" '
                    '"$http_user_agent" "$http_x_forwarded_for"';
    access_log /dev/stdout main;
    sendfile on;
    keepalive_timeout 65;
{temp_paths}

    server {{
        listen {port};
        server_name localhost;
        location / {{
            root {html};
            index index.html index.htm;
        }}
        error_page 500 502 503 504 /50x.html;
        location = /50x.html {{
            root {html};
        }}
    }}
}}
"""
    conf = scratch / "nginx.conf"
    conf.write_text(text)
    os.chmod(conf, 0o644)
    return conf
