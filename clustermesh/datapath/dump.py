"""``clustermesh datapath dump``: the pinned maps of a node, for people.

Reads the pins directly (no bcc, no compile), so it works on a node whose
agent is down, which is when one usually needs it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from clustermesh.datapath import bpfsys, hooks
from clustermesh.datapath.errors import DatapathError
from clustermesh.datapath.layout import (
    BACKEND4_MAP,
    BACKEND6_CODEC,
    BACKEND6_MAP,
    BACKEND_CODEC,
    REV4_CODEC,
    REV4_MAP,
    REV6_CODEC,
    REV6_MAP,
    SERVICE6_CODEC,
    SERVICE_CODEC,
    SVC4_MAP,
    SVC6_MAP,
    Codec,
)
from clustermesh.datapath.model import Affinity, BackendEntry, MapState, SlotKey
from clustermesh.datapath.plan import broken, leftovers

K = TypeVar("K")
V = TypeVar("V")


@dataclass
class Snapshot:
    """Everything ``dump`` shows, read once."""

    pin_dir: Path
    state: MapState
    programs: dict[str, int | None] = field(default_factory=dict)  # hook -> pinned prog id
    maps: dict[str, bpfsys.MapInfo] = field(default_factory=dict)
    rev_entries: int = 0


def _read_into(snap: Snapshot, name: str, codec: Codec[K, V], into: dict[K, V], required: bool = False) -> None:
    path = snap.pin_dir / name
    if not required and not path.exists():
        return
    with bpfsys.BpfMap.open_pinned(path, codec) as bpf_map:
        into.update(bpf_map.snapshot())
        snap.maps[name] = bpfsys.map_info(bpf_map.fd)


def _count(snap: Snapshot, name: str, codec: Codec[K, V]) -> int:
    path = snap.pin_dir / name
    if not path.exists():
        return 0
    with bpfsys.BpfMap.open_pinned(path, codec) as bpf_map:
        snap.maps[name] = bpfsys.map_info(bpf_map.fd)
        return len(bpf_map)


def read(pin_dir: str | os.PathLike[str]) -> Snapshot:
    """Read the pinned maps and program pins of one node."""
    root = Path(pin_dir)
    if not (root / SVC4_MAP).exists():
        raise DatapathError(f"no clustermesh maps pinned in {root}; is this the node's pin dir?")
    state = MapState()
    snap = Snapshot(root, state)
    # The IPv6 maps are missing on a node last loaded by an IPv4-only agent.
    _read_into(snap, SVC4_MAP, SERVICE_CODEC, state.services, required=True)
    _read_into(snap, SVC6_MAP, SERVICE6_CODEC, state.services)
    _read_into(snap, BACKEND4_MAP, BACKEND_CODEC, state.backends, required=True)
    _read_into(snap, BACKEND6_MAP, BACKEND6_CODEC, state.backends)
    snap.rev_entries = _count(snap, REV4_MAP, REV4_CODEC) + _count(snap, REV6_MAP, REV6_CODEC)
    for hook in hooks.HOOKS:
        snap.programs[hook.name] = None
        with contextlib.suppress(OSError), hooks.fd(bpfsys.obj_get(root / hook.name)) as prog_fd:
            snap.programs[hook.name] = bpfsys.prog_info(prog_fd).id
    return snap


def _hostport(backend: BackendEntry) -> str:
    host = f"[{backend.ip}]" if backend.ip.version == 6 else str(backend.ip)
    return f"{host}:{backend.port}"


def _flags(flags: int) -> str:
    affinity = Affinity.from_flags(flags)
    rest = flags & ~affinity.flags
    return f"affinity {affinity.value}" + (f" flags {rest:#x}" if rest else "")


def _services(state: MapState) -> Iterator[tuple[SlotKey, list[SlotKey]]]:
    masters = sorted(key for key in state.services if key.is_master)
    for master in masters:
        count = state.services[master].count
        yield master, [SlotKey(master.frontend, slot) for slot in range(1, count + 1)]


def render(snap: Snapshot) -> str:
    """The human-readable dump."""
    state = snap.state
    lines = [f"pin dir {snap.pin_dir}"]
    progs = ", ".join(
        f"{name} id {pid}" if pid is not None else f"{name} NOT PINNED" for name, pid in snap.programs.items()
    )
    lines.append(f"programs: {progs}")
    svc6 = sum(1 for key in state.services if key.frontend.v6)
    be6 = sum(1 for entry in state.backends.values() if entry.ip.version == 6)
    sizes = {
        SVC4_MAP: str(len(state.services) - svc6),
        SVC6_MAP: str(svc6),
        BACKEND4_MAP: str(len(state.backends) - be6),
        BACKEND6_MAP: str(be6),
        REV4_MAP: "",  # counted together below
        REV6_MAP: "",
    }
    lines.append(
        "maps: "
        + "  ".join(
            f"{name} {sizes[name]}/{info.max_entries}" for name, info in sorted(snap.maps.items()) if sizes[name]
        )
        + f"  reverse entries {snap.rev_entries}"
    )
    lines.append("")
    masters = list(_services(state))
    lines.append(f"services ({len(masters)})")
    for master, slots in masters:
        entry = state.services[master]
        note = "  (no backend: connect refused)" if entry.count == 0 else ""
        counts = f"count {entry.count}  preferred {entry.preferred}"
        lines.append(f"  {master.frontend}  {counts}  {_flags(entry.flags)}{note}")
        eligible = entry.preferred or entry.count
        for key in slots:
            slot = state.services.get(key)
            if slot is None:
                lines.append(f"    slot {key.slot:<3} MISSING")
                continue
            backend = state.backends.get(slot.backend_id)
            if backend is None:
                lines.append(f"    slot {key.slot:<3} backend {slot.backend_id}  MISSING")
                continue
            marks = [m for m, on in (("local", backend.is_local), ("preferred", key.slot <= eligible)) if on]
            lines.append(
                f"    slot {key.slot:<3} backend {slot.backend_id:<6} {_hostport(backend)}"
                f"  cluster {backend.cluster_id}  {' '.join(marks)}".rstrip()
            )
    lines.append("")
    lines.append(f"backends ({len(state.backends)})")
    for bid, backend in sorted(state.backends.items()):
        local = "  local" if backend.is_local else ""
        lines.append(f"  {bid:<6} {_hostport(backend)}  cluster {backend.cluster_id}{local}")
    bad, stale = broken(state), leftovers(state)
    if bad or stale:
        lines.append("")
        lines.append("problems")
        lines += [f"  BROKEN {p}" for p in bad]
        lines += [f"  leftover {p}" for p in stale]
    return "\n".join(lines) + "\n"


def to_json(snap: Snapshot) -> dict[str, Any]:
    """The dump as JSON-ready data (for scripts and tests)."""
    state = snap.state
    services = []
    for master, slots in _services(state):
        entry = state.services[master]
        rows = []
        for key in slots:
            slot = state.services.get(key)
            backend = state.backends.get(slot.backend_id) if slot else None
            rows.append(
                {
                    "slot": key.slot,
                    "backend_id": slot.backend_id if slot else None,
                    "ip": str(backend.ip) if backend else None,
                    "port": backend.port if backend else None,
                    "cluster_id": backend.cluster_id if backend else None,
                }
            )
        services.append(
            {
                "frontend": str(master.frontend),
                "count": entry.count,
                "preferred": entry.preferred,
                "flags": entry.flags,
                "affinity": Affinity.from_flags(entry.flags).value,
                "slots": rows,
            }
        )
    return {
        "pin_dir": str(snap.pin_dir),
        "programs": snap.programs,
        "services": services,
        "backends": {
            str(bid): {"ip": str(b.ip), "port": b.port, "cluster_id": b.cluster_id, "flags": b.flags}
            for bid, b in sorted(state.backends.items())
        },
        "rev_nat_entries": snap.rev_entries,
        "broken": broken(state),
        "leftovers": leftovers(state),
    }


def dump(pin_dir: str | os.PathLike[str]) -> str:
    return render(read(pin_dir))


def dump_main(pin_dir: str, *, as_json: bool = False) -> int:
    """Entry point of ``clustermesh datapath dump``: 0 on success, 1 on error."""
    try:
        snap = read(pin_dir)
    except DatapathError as exc:
        print(f"clustermesh datapath dump: {exc}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(to_json(snap), indent=2))
    else:
        sys.stdout.write(render(snap))
    return 0
