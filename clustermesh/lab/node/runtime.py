"""The container runtime of the lab's kubelet: a container is a process started through ``sandbox.py``
(its pod's network namespace, a private mount namespace with the pod's files bound in, a cgroup of its
own). Start one, wait for its exit, tell an adopted one by its /proc start time, enter one."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from clustermesh.lab.netns import kill_cgroup
from clustermesh.lab.node.records import Obj

SANDBOX = [sys.executable, "-m", "clustermesh.lab.node.sandbox"]

# Where the lab's images run from: this venv, the checkout (an editable install) and the Python
# it was made from. A container's volume mounted above one of them must not hide it.
HOST_PROGRAM_PATHS = sorted({str(Path(sys.executable).parent.parent), str(Path(__file__).resolve().parents[3]),
                             sys.base_prefix})


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


async def spawn(directory: Path, log_path: Path, cgroup: Path, launch: Obj) -> int:
    """Start a container's main process as ``launch`` says (sandbox.py's spec, without its ready
    pipe); returns its pid once it runs the program inside the pod (only then may probes and exec
    enter its namespaces). ``directory`` keeps the spec and the environment for ``enter_argv``."""
    cgroup.mkdir(parents=True, exist_ok=True)
    kill_cgroup(cgroup)  # a copy an earlier agent started but did not record must not serve twice
    ready_r, ready_w = os.pipe()
    os.set_inheritable(ready_w, True)
    directory.mkdir(parents=True, exist_ok=True)
    spec_path = directory / "launch.json"
    spec_path.write_text(json.dumps({"ready_fd": ready_w, "cgroup": str(cgroup), **launch,
                                     "keep": HOST_PROGRAM_PATHS}))
    (directory / "env.json").write_text(json.dumps({"env": launch["env"], "workdir": launch["workdir"]}))
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
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


def saved_env(directory: Path) -> tuple[dict[str, str], str] | None:
    """The environment and working folder ``spawn`` saved for a container (an adopted one's)."""
    env_file = directory / "env.json"
    if not env_file.exists():
        return None
    data = json.loads(env_file.read_text())
    return data["env"], data.get("workdir", "/")


async def wait_exit(pid: int, ours: bool, stopping: Callable[[], bool]) -> int:
    """Wait for ``pid`` to exit; its exit code as Kubernetes reports it (128 + signal). A process we
    adopted (not our child) leaves no status: 137 when we stopped it, 255 otherwise."""
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
        return 137 if stopping() else 255
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        return 255
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def enter_argv(pid: int, cgroup: Path, netns: str, directory: Path, command: list[str]) -> list[str]:
    """argv that runs ``command`` inside a running container (kubectl exec, exec probes, hooks)."""
    return [*SANDBOX, "enter", "--pid", str(pid), "--cgroup", str(cgroup), "--netns", netns,
            "--env-file", str(directory / "env.json"), "--", *command]
