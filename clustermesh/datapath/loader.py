"""The only module that imports bcc: compile bpf/sock_lb.c, load, attach, pin.

Typical agent use::

    lb = SocketLB("/sys/fs/cgroup/unified/node-1", pin_dir_for("node-1"), local_cluster_id=1)
    lb.load()                      # reuses pinned maps and the live attachment
    lb.program(services)         # on every change: writes only what changed
    lb.close()                     # on shutdown: programs and maps stay in place

bcc is only needed by :meth:`SocketLB.load`; reading and writing the maps,
detaching and destroying go through :mod:`clustermesh.datapath.bpfsys`. With
``compile_in_child=True`` (the agent's way) even that happens in a short-lived
child process (``python -m clustermesh.datapath.loader``): bcc's library and a
clang compile leave over 100 MB resident in the process that used them, and the
programs' cgroup attachments and pins outlive the child anyway.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clustermesh import metrics
from clustermesh.datapath import bpfsys, hooks
from clustermesh.datapath.errors import CapacityError, DatapathError
from clustermesh.datapath.incremental import IncrementalPlanner, drift, full_sync
from clustermesh.datapath.layout import (
    BACKEND4_MAP,
    BACKEND4_MAX,
    BACKEND6_CODEC,
    BACKEND6_MAP,
    BACKEND_CODEC,
    REV4_MAP,
    REV4_MAX,
    REV6_MAP,
    SERVICE6_CODEC,
    SERVICE_CODEC,
    SVC4_MAP,
    SVC4_MAX,
    SVC6_MAP,
    Backend4,
    Backend6,
    Rev4Key,
    Rev4Val,
    Rev6Key,
    Rev6Val,
    Svc4Key,
    Svc6Key,
    SvcVal,
)
from clustermesh.datapath.model import BackendEntry, Frontend, MapState, ServiceEntry, ServiceSpec, SlotKey
from clustermesh.datapath.plan import Capacity, Maps, Op, dry_run
from clustermesh.heap import release_freed_heap


def _import_bcc() -> Any:
    """bcc, imported on first use only (importing it maps LLVM: ~60 MB resident)."""
    try:
        import bcc
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise DatapathError(
            f"bcc is not importable ({exc}); install python3-bpfcc and make it visible "
            "to this Python (scripts/setup.sh does both)"
        ) from exc
    return bcc


log = logging.getLogger(__name__)

SOURCE = "sock_lb.c"
# bpffs refuses dots in names, and the path becomes a C string literal.
_SAFE_PATH = re.compile(r"^/[A-Za-z0-9_/-]+$")


def default_bpf_dir() -> Path:
    """bpf/ of the source tree, or $CLUSTERMESH_BPF_DIR."""
    env = os.environ.get("CLUSTERMESH_BPF_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "bpf"


@dataclass(frozen=True)
class MapLimits:
    """Sizes of the maps a first load creates; pinned maps keep their size.

    The reference is Cilium's ``bpf-lb-map-max``: 65,536 entries for each of
    its load-balancing maps (service, backend, reverse NAT). Our service map
    has Cilium's shape (a master plus one entry per backend slot), and our
    defaults are larger because the Kubernetes envelope (10,000 Services) with
    ten backends each is 110,000 service entries. Preallocated hash maps cost
    their full size in kernel memory whatever they hold (memlock measured on
    kernel 6.18: 25 MB for cm_svc4, 11.5 MB for cm_backend4, 11.5 MB for
    cm_rev4 at these defaults, about 96, 88 and 88 bytes an entry). The IPv6 twins
    (cm_svc6, cm_backend6, cm_rev6) are made with the same entry counts, with
    larger entries, and are checked on their own. A desired state that
    does not fit is refused whole (:class:`CapacityError`): the maps keep the
    previous state.
    """

    services: int = SVC4_MAX
    """Entries in cm_svc4 (262,144): one per service frontend plus one per backend slot."""
    backends: int = BACKEND4_MAX
    """Entries in cm_backend4 (131,072): distinct (ip, port, cluster) backends."""
    rev_nat: int = REV4_MAX
    """LRU entries in cm_rev4 (131,072): one per open connected socket we rewrote,
    plus (unconnected UDP socket, backend) pairs. Per-CPU LRU: each CPU gets an
    equal share, so size it for the busiest CPU's sockets times the CPU count."""


@dataclass(frozen=True)
class ReconcileSettings:
    """How :meth:`SocketLB.program` checks its memory against the maps.

    After a first full reconcile (which reads the maps: a restarted agent
    starts from what is pinned), a change writes only what it changes, planned
    from what the agent remembers writing. Something else may touch the maps
    (an operator with bpftool, a bug), so now and then a reconcile reads them
    back whole and repairs what differs.
    """

    verify_interval: float = 60.0
    """Seconds after which the next reconcile reads the maps back whole (0: every time)."""
    verify_every: int = 1000
    """Incremental reconciles after which the next one reads the maps back whole."""


# map name -> (type, key struct, value struct)
_EXPECTED_MAPS: dict[str, tuple[int, type[Any], type[Any]]] = {
    SVC4_MAP: (bpfsys.BPF_MAP_TYPE_HASH, Svc4Key, SvcVal),
    BACKEND4_MAP: (bpfsys.BPF_MAP_TYPE_HASH, ctypes.c_uint32, Backend4),
    REV4_MAP: (bpfsys.BPF_MAP_TYPE_LRU_HASH, Rev4Key, Rev4Val),
    SVC6_MAP: (bpfsys.BPF_MAP_TYPE_HASH, Svc6Key, SvcVal),
    BACKEND6_MAP: (bpfsys.BPF_MAP_TYPE_HASH, ctypes.c_uint32, Backend6),
    REV6_MAP: (bpfsys.BPF_MAP_TYPE_LRU_HASH, Rev6Key, Rev6Val),
}
# map name -> flags we create it with (checked, not enforced: a map pinned by an
# older agent keeps working with its own flags)
_EXPECTED_FLAGS = {REV4_MAP: bpfsys.BPF_F_NO_COMMON_LRU, REV6_MAP: bpfsys.BPF_F_NO_COMMON_LRU}


def _possible_cpus() -> int:
    """CPUs the kernel may ever bring up (per-CPU map structures are sized by it)."""
    try:
        text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    except OSError:
        return os.cpu_count() or 1
    count = 0
    for part in text.split(","):
        first, _, last = part.partition("-")
        count += int(last or first) - int(first) + 1
    return count


def _per_cpu_rounded(entries: int) -> int:
    """The max_entries the kernel gives a BPF_F_NO_COMMON_LRU map asked for ``entries``."""
    cpus = _possible_cpus()
    up = -(-entries // cpus) * cpus
    return up if up <= 0xFFFFFFFF else entries // cpus * cpus


def check_pinned_maps(pin_dir: Path, limits: MapLimits) -> None:
    """Refuse pinned maps whose type or layout differs from what we compile.

    bcc's BPF_TABLE_PINNED reuses whatever is pinned at the path without
    looking at it, and a program reading a map of another layout would
    balance to garbage.
    """
    # Each IPv6 map has the size of its IPv4 twin.
    sizes: dict[str, int] = {SVC4_MAP: limits.services, BACKEND4_MAP: limits.backends, REV4_MAP: limits.rev_nat}
    sizes |= {SVC6_MAP: limits.services, BACKEND6_MAP: limits.backends, REV6_MAP: limits.rev_nat}
    for name, (map_type, key_t, value_t) in _EXPECTED_MAPS.items():
        path = pin_dir / name
        if not path.exists():
            continue
        try:
            with hooks.fd(bpfsys.obj_get(path)) as map_fd:
                info = bpfsys.map_info(map_fd)
        except OSError as exc:
            raise DatapathError(f"{path} exists but is not a BPF map ({exc.strerror}); remove it") from exc
        want = (map_type, ctypes.sizeof(key_t), ctypes.sizeof(value_t))
        have = (info.type, info.key_size, info.value_size)
        if have != want:
            raise DatapathError(
                f"pinned map {path} has type/key/value {have}, expected {want}: it was made by another "
                "clustermesh version. Run `clustermesh datapath destroy` for this node, then load again "
                "(global services fall back to kube-proxy until then)."
            )
        wanted_flags = _EXPECTED_FLAGS.get(name, 0)
        if info.flags != wanted_flags:
            log.warning(
                "pinned map %s has flags %#x (this agent makes it with %#x); it works as it is, and "
                "`clustermesh datapath destroy` then a new load makes it anew",
                path,
                info.flags,
                wanted_flags,
            )
        wanted_size = sizes[name]
        if name in (REV4_MAP, REV6_MAP):
            # A per-CPU LRU is rounded to a multiple of the possible CPUs.
            wanted_size = _per_cpu_rounded(wanted_size)
        if info.max_entries != wanted_size:
            # Resizing means a new map, and so a moment without services:
            # keep the pinned one and say so.
            log.warning(
                "pinned map %s keeps its %d entries (asked for %d); destroy the datapath to resize it",
                path,
                info.max_entries,
                wanted_size,
            )


class SocketLB:
    """Socket-level load balancing on one cgroup, with maps pinned in ``pin_dir``.

    Not thread-safe: one agent task owns it.
    """

    def __init__(
        self,
        cgroup_path: str | os.PathLike[str],
        pin_dir: str | os.PathLike[str],
        local_cluster_id: int,
        *,
        limits: MapLimits | None = None,
        bpf_dir: str | os.PathLike[str] | None = None,
        setting_names: tuple[str, str] = ("MapLimits.services", "MapLimits.backends"),
        reconcile_settings: ReconcileSettings | None = None,
        compile_in_child: bool = False,
    ) -> None:
        """``setting_names`` name the knobs of ``limits.services`` and
        ``limits.backends`` as the user sets them (say, the agent's flags); a
        :class:`CapacityError` tells the user to raise them. ``compile_in_child``:
        :meth:`load` compiles and attaches in a child process (see the module doc)."""
        self.cgroup_path = Path(cgroup_path)
        self.pin_dir = Path(pin_dir)
        self.local_cluster_id = local_cluster_id
        self.limits = limits or MapLimits()
        self.bpf_dir = Path(bpf_dir) if bpf_dir else default_bpf_dir()
        self._services: bpfsys.ByFamily[SlotKey, ServiceEntry] | None = None
        self._backends: bpfsys.ByFamily[int, BackendEntry] | None = None
        self.setting_names = setting_names
        self._capacity = Capacity()
        self._refused: str | None = None  # the last capacity error, logged once
        self.attachments: list[hooks.Attachment] = []
        self.reconcile_settings = reconcile_settings or ReconcileSettings()
        # What the last full reconcile wrote, kept up to date by the incremental ones;
        # None: the next reconcile reads the maps.
        self._planner: IncrementalPlanner | None = None
        self._incremental = 0  # incremental reconciles since the last full one
        self._verified_at = 0.0
        self._clock: Callable[[], float] = time.monotonic
        self.compile_in_child = compile_in_child

    # --- lifecycle -----------------------------------------------------------------

    def _check_environment(self) -> None:
        if not _SAFE_PATH.match(str(self.pin_dir)):
            raise DatapathError(f"pin dir {self.pin_dir} must be absolute and use only [A-Za-z0-9_/-]")
        existing = self.pin_dir
        while not existing.exists():
            existing = existing.parent
        if not bpfsys.is_fs(existing, bpfsys.BPF_FS_MAGIC):
            raise DatapathError(
                f"{existing} is not on bpffs, so pins would not survive: mount -t bpf bpf /sys/fs/bpf "
                "(scripts/setup.sh does) and keep the pin dir under it"
            )
        if not (self.bpf_dir / SOURCE).is_file():
            raise DatapathError(
                f"{self.bpf_dir / SOURCE} not found; set CLUSTERMESH_BPF_DIR to the bpf/ directory"
            )
        if os.geteuid() != 0:
            raise DatapathError("loading BPF programs needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)")

    def _cflags(self) -> list[str]:
        return [
            f"-I{self.bpf_dir}",
            f'-DCM_PIN_DIR="{self.pin_dir}"',
            f"-DCM_SVC4_MAX={int(self.limits.services)}",
            f"-DCM_BACKEND4_MAX={int(self.limits.backends)}",
            f"-DCM_REV4_MAX={int(self.limits.rev_nat)}",
            f"-DCM_SVC6_MAX={int(self.limits.services)}",
            f"-DCM_BACKEND6_MAX={int(self.limits.backends)}",
            f"-DCM_REV6_MAX={int(self.limits.rev_nat)}",
        ]

    def load(self) -> list[hooks.Attachment]:
        """Compile, reuse or create the pinned maps, and make sure every hook is
        attached to the cgroup, reusing a live attachment of the same program.

        Safe to call on a node whose datapath is already running (agent
        restart): the maps keep their contents and no hook is ever detached.
        """
        self._check_environment()
        if self.compile_in_child:
            attachments = self._attach_from_child()
            for a in attachments:
                log.info("hook %s: %s program id %d (compiled by a child process)", a.hook, a.action, a.prog_id)
        else:
            attachments = self._compile_and_attach()
        self.attachments = attachments
        self._open_maps()
        return attachments

    def _attach_from_child(self) -> list[hooks.Attachment]:
        job = {"cgroup": str(self.cgroup_path), "pin_dir": str(self.pin_dir), "bpf_dir": str(self.bpf_dir),
               "local_cluster_id": self.local_cluster_id, "limits": dataclasses.asdict(self.limits)}
        try:
            res = subprocess.run([sys.executable, "-m", "clustermesh.datapath.loader", json.dumps(job)],
                                 capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DatapathError(f"the child process compiling {SOURCE} failed: {exc}") from exc
        if res.returncode != 0:
            # The child prints the DatapathError's message (what to do next) last.
            lines = res.stderr.strip().splitlines()
            raise DatapathError(lines[-1] if lines else f"the child compiling {SOURCE} exited with "
                                f"{res.returncode} and said nothing")
        return [hooks.Attachment(**a) for a in json.loads(res.stdout)]

    def _compile_and_attach(self) -> list[hooks.Attachment]:
        bcc = _import_bcc()
        self.pin_dir.mkdir(parents=True, exist_ok=True)
        check_pinned_maps(self.pin_dir, self.limits)
        source = self.bpf_dir / SOURCE
        try:
            module = bcc.BPF(src_file=str(source).encode(), cflags=self._cflags())
        except Exception as exc:
            raise DatapathError(
                f"bcc could not compile {source}: {exc} (clang's errors are above). bcc needs kernel "
                f"headers at /lib/modules/{os.uname().release}/build: run scripts/setup.sh"
            ) from exc
        try:
            with hooks.fd(hooks.open_cgroup(self.cgroup_path)) as cgroup_fd:
                attachments = []
                for hook in hooks.HOOKS:
                    try:
                        fn = module.load_func(
                            hook.name.encode(), hook.prog_type, attach_type=hook.attach_type
                        )
                    except Exception as exc:
                        raise DatapathError(
                            f"the kernel refused program {hook.name}: {exc}. It needs root and a kernel "
                            ">= 5.18 with CONFIG_CGROUP_BPF (bpf_set_retval in sock_addr programs)"
                        ) from exc
                    attachments.append(hooks.ensure_attached(cgroup_fd, hook, fn.fd, self.pin_dir))
        finally:
            # Attached programs hold their maps; the module's own fds can go.
            module.cleanup()
            del module
            release_freed_heap()  # clang's and LLVM's, in-process: about 30 MB
        return attachments

    def _open_maps(self) -> None:
        self.close()
        opened: list[bpfsys.BpfMap[Any, Any]] = []
        try:
            for name, codec in (
                (SVC4_MAP, SERVICE_CODEC),
                (SVC6_MAP, SERVICE6_CODEC),
                (BACKEND4_MAP, BACKEND_CODEC),
                (BACKEND6_MAP, BACKEND6_CODEC),
            ):
                opened.append(bpfsys.BpfMap.open_pinned(self.pin_dir / name, codec))
        except DatapathError:
            for bpf_map in opened:
                bpf_map.close()
            raise
        svc4, svc6, be4, be6 = opened
        self._services = bpfsys.ByFamily(svc4, svc6, lambda key, _value: key.frontend.v6)
        self._backends = bpfsys.ByFamily(
            be4, be6, lambda _key, value: None if value is None else value.ip.version == 6
        )
        # The pinned maps' own sizes, not self.limits: a map pinned by an
        # earlier agent keeps the size it was made with.
        sizes = {name: bpfsys.map_info(m.fd).max_entries for name, m in zip(
            (SVC4_MAP, SVC6_MAP, BACKEND4_MAP, BACKEND6_MAP), opened, strict=True)}
        self._capacity = Capacity(
            services=sizes[SVC4_MAP],
            backends=sizes[BACKEND4_MAP],
            services6=sizes[SVC6_MAP],
            backends6=sizes[BACKEND6_MAP],
            services_setting=self.setting_names[0],
            backends_setting=self.setting_names[1],
        )
        for name, size in sizes.items():
            metrics.DATAPATH_MAP_CAPACITY.labels(name).set(size)

    def close(self) -> None:
        """Forget our fds. Programs stay attached and maps stay pinned."""
        # Reopened maps may be other maps (destroyed and loaded again meanwhile):
        # read them before trusting what we remember writing.
        self._planner = None
        for bpf_map in (self._services, self._backends):
            if bpf_map is not None:
                bpf_map.close()
        self._services = self._backends = None

    def __enter__(self) -> SocketLB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def detach(self) -> list[str]:
        """Take the programs off the cgroup (maps stay pinned and filled)."""
        return hooks.detach(self.cgroup_path, self.pin_dir)

    def destroy(self) -> None:
        """Detach and remove every pin: the node is back to no clustermesh datapath."""
        self.close()
        hooks.destroy(self.cgroup_path, self.pin_dir)

    # --- maps ------------------------------------------------------------------------------

    @property
    def maps(self) -> Maps:
        if self._services is None or self._backends is None:
            if not (self.pin_dir / SVC4_MAP).exists():
                raise DatapathError(f"no maps pinned in {self.pin_dir}: call load() first")
            self._open_maps()
        assert self._services is not None and self._backends is not None
        return Maps(services=self._services, backends=self._backends, capacity=self._capacity)

    def read(self) -> MapState:
        return self.maps.read()

    def dry_run(self, services: Iterable[ServiceSpec]) -> list[Op]:
        """What :meth:`program` would write now."""
        return dry_run(self.maps, services, self.local_cluster_id)

    def program(self, services: Iterable[ServiceSpec] | Mapping[Frontend, ServiceSpec],
                changed_hint: Collection[Frontend] | None = None) -> list[Op]:
        """Make the maps hold exactly ``services`` (ordered, batched writes).

        ``changed_hint``: the frontends that may differ from the last successful call, with
        ``services`` by frontend; the others are not looked at (see :meth:`IncrementalPlanner.plan`).
        A full sync ignores it.

        The first call reads the maps and diffs everything; later ones plan only
        the services that changed (:class:`IncrementalPlanner`). One in
        ``reconcile_settings.verify_every`` (or the first after
        ``verify_interval`` seconds) then reads the maps back, after writing its
        change, and repairs what differs from memory with a full reconcile.

        Raises :class:`CapacityError` when they do not fit; nothing is written
        then, and the error is logged once (until the next success) and
        counted in ``clustermesh_datapath_map_full_total``.
        """
        maps = self.maps
        try:
            if self._verify_due():
                ops = self._full_sync(maps, services.values() if isinstance(services, Mapping) else services)
            else:
                assert self._planner is not None
                ops = self._planner.write(maps, services, changed_hint)
                self._incremental += 1
        except CapacityError as exc:
            # Refused before any write: the planner's memory still matches the maps.
            metrics.DATAPATH_MAP_FULL.labels(exc.map_name).inc()
            if str(exc) != self._refused:
                log.error("datapath: %s", exc)
                self._refused = str(exc)
            raise
        except BaseException:
            # Some writes may be in, some not: read the maps next time.
            self._planner = None
            raise
        self._refused = None
        if ops:
            log.info("datapath: %d map writes", len(ops))
        return ops

    def _verify_due(self) -> bool:
        settings = self.reconcile_settings
        return (
            self._planner is None
            or self._incremental >= settings.verify_every
            or self._clock() - self._verified_at >= settings.verify_interval
        )

    def _full_sync(self, maps: Maps, services: Iterable[ServiceSpec]) -> list[Op]:
        previous = self._planner
        if previous is None:
            ops, _, planner = full_sync(maps, services, self.local_cluster_id)
        else:
            # The change first, planned from memory, so it reaches the maps as fast
            # as any other; then the maps are read back (the slow part: about 0.5 s
            # at 10,000 services) and compared with what memory says they now hold.
            specs = list(services)
            ops = previous.write(maps, specs)
            found = maps.read()
            planner = previous
            if found != previous.state:
                log.warning(
                    "datapath: %d map entries differed from what this agent wrote; repairing",
                    drift(previous.state, found),
                )
                self._planner = None  # until the repair is in
                repair, _, planner = full_sync(maps, specs, self.local_cluster_id, found)
                ops += repair
        self._planner = planner
        self._incremental = 0
        self._verified_at = self._clock()
        return ops

    def attached(self) -> dict[str, list[int]]:
        """Hook name -> ids of our programs on the cgroup (one each when healthy)."""
        return hooks.attached_ids(self.cgroup_path)


def _child_main(argv: list[str]) -> int:
    """``python -m clustermesh.datapath.loader JOB``: compile, attach and pin for a parent
    that keeps no compiler in memory; prints the attachments as JSON."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    job = json.loads(argv[0])
    lb = SocketLB(job["cgroup"], job["pin_dir"], job["local_cluster_id"], limits=MapLimits(**job["limits"]),
                  bpf_dir=job["bpf_dir"])
    try:
        lb._check_environment()
        attachments = lb._compile_and_attach()
    except DatapathError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(json.dumps([dataclasses.asdict(a) for a in attachments]))
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
