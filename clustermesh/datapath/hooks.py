"""Which programs sit on a node's cgroup, and how they get there or go away.

Cgroup attachments made with BPF_PROG_ATTACH outlive the process that made
them, and that is the point: traffic keeps being balanced while the agent
restarts. So a starting agent first looks at what is attached. Our programs
are recognised by name on the cgroup itself (not on its ancestors):

- same bytecode (program tag) using the same maps: keep it, attach nothing;
- different bytecode or maps (an upgrade, or maps re-created by hand): swap it
  atomically with BPF_F_REPLACE, so there is no instant without a program;
- nothing attached: attach with BPF_F_ALLOW_MULTI, so programs of the
  cluster's CNI on the same cgroup keep running beside ours.

Each attached program is also pinned in the pin directory, for bpftool users
and for ``clustermesh datapath dump``. None of this imports bcc.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from clustermesh.datapath import bpfsys
from clustermesh.datapath.errors import DatapathError
from clustermesh.datapath.layout import BACKEND4_MAP, BACKEND6_MAP, REV4_MAP, REV6_MAP, SVC4_MAP, SVC6_MAP

log = logging.getLogger(__name__)

PIN_ROOT = Path("/sys/fs/bpf/clustermesh")

# enum bpf_prog_type and enum bpf_attach_type values of <linux/bpf.h>.
PROG_CGROUP_SOCK = 9
PROG_CGROUP_SOCK_ADDR = 18
CGROUP_INET4_CONNECT = 10
CGROUP_INET6_CONNECT = 11
CGROUP_UDP4_SENDMSG = 14
CGROUP_UDP6_SENDMSG = 15
CGROUP_UDP4_RECVMSG = 19
CGROUP_UDP6_RECVMSG = 20
CGROUP_INET4_GETPEERNAME = 29
CGROUP_INET6_GETPEERNAME = 30
CGROUP_INET_SOCK_RELEASE = 34


@dataclass(frozen=True)
class Hook:
    """One program of bpf/sock_lb.c. ``name`` is its C function, its kernel
    program name (at most 15 characters) and the file name of its pin."""

    name: str
    attach_type: int
    prog_type: int = PROG_CGROUP_SOCK_ADDR


HOOKS: tuple[Hook, ...] = (
    Hook("cm_connect4", CGROUP_INET4_CONNECT),
    Hook("cm_sendmsg4", CGROUP_UDP4_SENDMSG),
    Hook("cm_recvmsg4", CGROUP_UDP4_RECVMSG),
    Hook("cm_getpeername4", CGROUP_INET4_GETPEERNAME),
    Hook("cm_release4", CGROUP_INET_SOCK_RELEASE, PROG_CGROUP_SOCK),  # both families
    Hook("cm_connect6", CGROUP_INET6_CONNECT),
    Hook("cm_sendmsg6", CGROUP_UDP6_SENDMSG),
    Hook("cm_recvmsg6", CGROUP_UDP6_RECVMSG),
    Hook("cm_getpeername6", CGROUP_INET6_GETPEERNAME),
)
MAP_PINS: tuple[str, ...] = (SVC4_MAP, BACKEND4_MAP, REV4_MAP, SVC6_MAP, BACKEND6_MAP, REV6_MAP)


@dataclass(frozen=True)
class Attachment:
    """The program that serves ``hook`` after :func:`ensure_attached`."""

    hook: str
    prog_id: int
    action: str  # "kept", "replaced" or "attached"


@contextlib.contextmanager
def fd(opened: int) -> Iterator[int]:
    try:
        yield opened
    finally:
        os.close(opened)


def open_cgroup(cgroup_path: str | os.PathLike[str]) -> int:
    """An fd on a cgroup v2 directory, with a useful error when it is not one."""
    path = Path(cgroup_path)
    if not path.is_dir():
        raise DatapathError(f"cgroup {path} does not exist; create it under the cgroup v2 mount first")
    if not bpfsys.is_fs(path, bpfsys.CGROUP2_SUPER_MAGIC):
        raise DatapathError(
            f"{path} is not on a cgroup v2 filesystem; socket-LB programs attach to cgroup v2 only "
            "(see the cgroup2 line of /proc/mounts, e.g. /sys/fs/cgroup/unified)"
        )
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY)


def ours(cgroup_fd: int, hook: Hook) -> list[bpfsys.ProgInfo]:
    """Our programs attached directly to the cgroup for ``hook``, oldest first."""
    try:
        _, ids = bpfsys.prog_query(cgroup_fd, hook.attach_type)
    except OSError as exc:
        raise DatapathError(f"cannot query programs of the cgroup: {exc.strerror}; are you root?") from exc
    found = []
    for prog_id in ids:
        try:
            with fd(bpfsys.prog_fd_by_id(prog_id)) as prog_fd:
                info = bpfsys.prog_info(prog_fd)
        except OSError:
            continue  # detached meanwhile
        if info.name == hook.name:
            found.append(info)
    return found


def _pin(prog_fd: int, path: Path) -> None:
    """Point the pin at ``path`` to ``prog_fd``, replacing what was there."""
    if path.exists():
        try:
            with fd(bpfsys.obj_get(path)) as old:
                if bpfsys.prog_info(old).id == bpfsys.prog_info(prog_fd).id:
                    return
        except OSError:
            pass
    tmp = path.with_name(path.name + "_new")  # bpffs refuses dots in names
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    bpfsys.obj_pin(prog_fd, tmp)
    os.replace(tmp, path)


def ensure_attached(cgroup_fd: int, hook: Hook, prog_fd: int, pin_dir: Path) -> Attachment:
    """Make ``hook`` on the cgroup run a program equivalent to ``prog_fd``.

    ``prog_fd`` is a freshly loaded program; it is attached only when nothing
    equivalent is attached already (see the module doc).
    """
    new = bpfsys.prog_info(prog_fd)
    current = ours(cgroup_fd, hook)
    try:
        if current and current[0].tag == new.tag and current[0].map_ids == new.map_ids:
            attached = current[0]
            action = "kept"
        elif current:
            with fd(bpfsys.prog_fd_by_id(current[0].id)) as old_fd:
                bpfsys.prog_attach(
                    cgroup_fd,
                    prog_fd,
                    hook.attach_type,
                    bpfsys.BPF_F_ALLOW_MULTI | bpfsys.BPF_F_REPLACE,
                    replace_fd=old_fd,
                )
            attached = new
            action = "replaced"
        else:
            bpfsys.prog_attach(cgroup_fd, prog_fd, hook.attach_type, bpfsys.BPF_F_ALLOW_MULTI)
            attached = new
            action = "attached"
    except OSError as exc:
        hint = ""
        if exc.errno == errno.EPERM:
            hint = (
                ": another program is attached to this cgroup or an ancestor without BPF_F_ALLOW_MULTI "
                "(bpftool cgroup tree shows it), or we are not root"
            )
        raise DatapathError(f"attaching {hook.name} failed: {exc.strerror}{hint}") from exc
    # Leftovers of an earlier crash between attach and pin: one copy is enough.
    for extra in current[1:]:
        _detach_id(cgroup_fd, hook, extra.id)
    with fd(bpfsys.prog_fd_by_id(attached.id)) as attached_fd:
        _pin(attached_fd, pin_dir / hook.name)
    log.info("hook %s: %s program id %d", hook.name, action, attached.id)
    return Attachment(hook.name, attached.id, action)


def _detach_id(cgroup_fd: int, hook: Hook, prog_id: int) -> None:
    try:
        with fd(bpfsys.prog_fd_by_id(prog_id)) as prog_fd:
            bpfsys.prog_detach(cgroup_fd, prog_fd, hook.attach_type)
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ENOTSUP):
            raise DatapathError(f"detaching {hook.name} (id {prog_id}) failed: {exc.strerror}") from exc


def attached_ids(cgroup_path: str | os.PathLike[str]) -> dict[str, list[int]]:
    """Hook name -> ids of our programs attached to the cgroup."""
    with fd(open_cgroup(cgroup_path)) as cgroup_fd:
        return {hook.name: [p.id for p in ours(cgroup_fd, hook)] for hook in HOOKS}


def detach(cgroup_path: str | os.PathLike[str], pin_dir: str | os.PathLike[str]) -> list[str]:
    """Detach our programs from the cgroup and drop their pins; maps stay.

    From here on, connections to global services go wherever the kernel's
    routing and the cluster's kube-proxy send them. Returns the hooks detached.
    """
    detached = []
    if Path(cgroup_path).is_dir():
        with fd(open_cgroup(cgroup_path)) as cgroup_fd:
            for hook in HOOKS:
                for info in ours(cgroup_fd, hook):
                    _detach_id(cgroup_fd, hook, info.id)
                    detached.append(hook.name)
    for hook in HOOKS:
        with contextlib.suppress(FileNotFoundError):
            (Path(pin_dir) / hook.name).unlink()
    return detached


def remove_pins(pin_dir: str | os.PathLike[str]) -> None:
    """Unpin our maps and programs and remove the directory if it is left empty.

    A map stays alive while an attached program uses it; call :func:`detach`
    first to really free them.
    """
    root = Path(pin_dir)
    for name in (*MAP_PINS, *(h.name for h in HOOKS)):
        with contextlib.suppress(FileNotFoundError):
            (root / name).unlink()
    with contextlib.suppress(FileNotFoundError, OSError):
        root.rmdir()


def destroy(cgroup_path: str | os.PathLike[str], pin_dir: str | os.PathLike[str]) -> list[str]:
    """Detach our programs from ``cgroup_path`` and remove all pins in ``pin_dir``.

    The node is left with no clustermesh datapath; global services fall back
    to whatever else handles their ClusterIPs. Returns the hooks detached.
    """
    detached = detach(cgroup_path, pin_dir)
    remove_pins(pin_dir)
    return detached


def pin_dir_for(node: str, root: Path = PIN_ROOT) -> Path:
    """The per-node pin directory: /sys/fs/bpf/clustermesh/<node>.

    Dots of DNS-style node names become underscores: bpffs refuses dots.
    """
    name = node.replace(".", "_")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise DatapathError(f"node name {node!r} cannot be a bpffs directory name")
    return root / name
