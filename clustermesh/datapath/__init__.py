"""Socket-level load balancing for global services (cgroup v2 sock_addr BPF).

Importing this package never imports bcc: the pure parts (model, plan) and the
syscall-level parts (dump, destroy) work without it. ``SocketLB`` and the
other names of :mod:`clustermesh.datapath.loader` are loaded on first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from clustermesh.datapath.dump import dump, dump_main
from clustermesh.datapath.errors import DatapathError
from clustermesh.datapath.hooks import destroy, pin_dir_for
from clustermesh.datapath.model import (
    Affinity,
    Backend,
    BackendEntry,
    Frontend,
    MapState,
    Proto,
    ServiceEntry,
    ServiceSpec,
    SlotKey,
)
from clustermesh.datapath.plan import (
    DeleteBackend,
    DeleteService,
    Maps,
    Op,
    PutBackend,
    PutService,
    apply,
    broken,
    desired_state,
    diff,
    dry_run,
    leftovers,
    sync_maps,
)

if TYPE_CHECKING:
    from clustermesh.datapath.loader import MapLimits, SocketLB

_LAZY = {"SocketLB", "MapLimits"}

__all__ = [
    "Affinity",
    "Backend",
    "BackendEntry",
    "DatapathError",
    "DeleteBackend",
    "DeleteService",
    "Frontend",
    "MapLimits",
    "MapState",
    "Maps",
    "Op",
    "Proto",
    "PutBackend",
    "PutService",
    "ServiceEntry",
    "ServiceSpec",
    "SlotKey",
    "SocketLB",
    "apply",
    "broken",
    "desired_state",
    "destroy",
    "diff",
    "dry_run",
    "dump",
    "dump_main",
    "leftovers",
    "pin_dir_for",
    "sync_maps",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from clustermesh.datapath import loader

        return getattr(loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
