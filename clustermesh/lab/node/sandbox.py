"""Put a process into a lab pod, then exec the container's program.

    python -m clustermesh.lab.node.sandbox run --spec SPEC.json
    python -m clustermesh.lab.node.sandbox enter --pid PID --cgroup DIR --netns NAME [--env-file ENV.json] -- CMD...

``run`` starts a container's main process: it joins the container's cgroup (a child of
the node's cgroup, so the node's socket-LB applies to it), the pod's network namespace,
a new UTS namespace named after the pod, and a new private mount namespace where the
pod's volumes, /etc/hosts and /etc/resolv.conf are bind-mounted. The rest of the file
system is the host's, /tmp included: programs, the venv and the lab's own files may live
there (a checkout under /tmp), and a container must see them.
``enter`` runs a command inside a running container (``kubectl exec``, exec probes):
the same cgroup and the namespaces of the container's main process.

Only the standard library: this runs once per container start, exec and probe, so it
must start fast, and it runs single-threaded (setns into a mount namespace needs that).
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
from pathlib import Path
from typing import Any

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 1
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18

_libc = ctypes.CDLL(None, use_errno=True)


class SandboxError(RuntimeError):
    pass


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise SandboxError(f"{what}: {os.strerror(errno)}")


def setns(path: str, nstype: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(_libc.setns(fd, nstype), f"setns {path}")
    finally:
        os.close(fd)


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(
        _libc.mount(
            source.encode() if source else None, target.encode(), fstype.encode() if fstype else None,
            ctypes.c_ulong(flags), data.encode() if data else None,
        ),
        f"mount {source} on {target}",
    )


def join_cgroup(cgroup: str) -> None:
    Path(cgroup, "cgroup.procs").write_text(str(os.getpid()))


def _exec(argv: list[str], env: dict[str, str], workdir: str) -> None:
    try:
        os.chdir(workdir or "/")
    except OSError as exc:
        raise SandboxError(f"working directory {workdir!r}: {exc.strerror}") from exc
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as exc:
        raise SandboxError(f"exec {argv[0]!r}: {exc.strerror}") from exc


def run(spec: dict[str, Any]) -> None:
    join_cgroup(spec["cgroup"])
    setns(f"/run/netns/{spec['netns']}", CLONE_NEWNET)
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWUTS), "unshare")
    # Nothing mounted from here on may reach the host's mount table.
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    hostname = spec.get("hostname", "")[:63].encode()
    if hostname:
        _check(_libc.sethostname(hostname, len(hostname)), "sethostname")
    # "etc": the pod's own /etc/hosts, /etc/resolv.conf, /etc/hostname (name -> file).
    binds = [*spec.get("mounts", []), *({"source": src, "target": f"/etc/{name}"}
                                        for name, src in spec.get("etc", {}).items())]
    # Held open first: a bind over a path that is also a later source must not hide that source.
    held = [os.open(m["source"], os.O_PATH | os.O_CLOEXEC) for m in binds]
    # Host paths the image's programs run from (the venv, the checkout) stay visible even under a
    # volume mounted above them (an emptyDir at /tmp over a checkout in /tmp): put back on top.
    targets = [m["target"].rstrip("/") or "/" for m in binds]
    shadowed = [k for k in spec.get("keep", [])
                if any(k == t or k.startswith(t.rstrip("/") + "/") for t in targets) and os.path.exists(k)]
    kept = [os.open(k, os.O_PATH | os.O_CLOEXEC) for k in shadowed]
    for m, fd in zip(binds, held, strict=True):
        mount(f"/proc/self/fd/{fd}", m["target"], None, MS_BIND | MS_REC)
        if m.get("readOnly"):
            mount(None, m["target"], None, MS_BIND | MS_REMOUNT | MS_RDONLY)
        os.close(fd)
    for path, fd in zip(shadowed, kept, strict=True):
        os.makedirs(path, exist_ok=True)
        # Not recursive: that would copy the volume mounted on this very path back on top.
        mount(f"/proc/self/fd/{fd}", path, None, MS_BIND)
        os.close(fd)
    ready_fd = spec.get("ready_fd")
    if ready_fd is not None:
        # Closed by the exec itself: the node agent learns that this pid now lives in the pod's
        # namespaces (before that, an exec probe entering /proc/PID/ns would land in the host's).
        os.set_inheritable(int(ready_fd), False)
    _exec(spec["argv"], spec["env"], spec.get("workdir", "/"))


def enter(pid: int, cgroup: str, netns: str, env: dict[str, str] | None, argv: list[str], workdir: str) -> None:
    join_cgroup(cgroup)
    # Open all three first: once in the container's mount namespace, /proc/PID may look different.
    # The network namespace by its name, never through the pid: whatever the pid is, an exec's
    # traffic leaves from the pod's namespace.
    fds = {ns: os.open(f"/proc/{pid}/ns/{ns}", os.O_RDONLY | os.O_CLOEXEC) for ns in ("uts", "mnt")}
    fds["net"] = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
    for ns, nstype in (("net", CLONE_NEWNET), ("uts", CLONE_NEWUTS), ("mnt", CLONE_NEWNS)):
        _check(_libc.setns(fds[ns], nstype), f"setns {ns} of pid {pid}")
        os.close(fds[ns])
    _exec(argv, env if env is not None else dict(os.environ), workdir)


def main(argv: list[str]) -> int:
    try:
        if argv[:1] == ["run"] and len(argv) == 3 and argv[1] == "--spec":
            run(json.loads(Path(argv[2]).read_text()))
        elif argv[:1] == ["enter"] and "--" in argv:
            split = argv.index("--")
            opts = dict(zip(argv[1:split:2], argv[2:split:2], strict=False))
            command = argv[split + 1:]
            if not command or not {"--pid", "--cgroup", "--netns"} <= set(opts):
                raise SandboxError("enter needs --pid, --cgroup, --netns and a command after --")
            env, workdir = None, "/"
            if "--env-file" in opts:
                data = json.loads(Path(opts["--env-file"]).read_text())
                env, workdir = data["env"], data.get("workdir", "/")
            enter(int(opts["--pid"]), opts["--cgroup"], opts["--netns"], env, command, workdir)
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except (SandboxError, OSError, KeyError, ValueError) as exc:
        # The container's log (or exec's stderr) shows why it did not start.
        print(f"sandbox: {exc}", file=sys.stderr, flush=True)
        return 127 if "exec" in str(exc) else 128
    return 0  # not reached: exec replaced us


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
