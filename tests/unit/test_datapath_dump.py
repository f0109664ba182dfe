"""The dump rendering, and the import boundaries of clustermesh.datapath (no kernel)."""

from __future__ import annotations

import ast
import subprocess
import sys
from ipaddress import IPv4Address
from pathlib import Path

from clustermesh.datapath import bpfsys
from clustermesh.datapath.dump import Snapshot, render, to_json
from clustermesh.datapath.model import (
    Backend,
    BackendEntry,
    Frontend,
    MapState,
    ServiceEntry,
    ServiceSpec,
    SlotKey,
)
from clustermesh.datapath.plan import desired_state

PACKAGE = Path(__file__).resolve().parents[2] / "clustermesh"
FE = Frontend("10.96.0.10", 80)
EMPTY = Frontend("10.96.0.20", 53, "UDP")


def snapshot(state: MapState) -> Snapshot:
    info = bpfsys.MapInfo(id=1, type=1, key_size=12, value_size=12, max_entries=1024, flags=0, name="cm_svc4")
    return Snapshot(
        Path("/sys/fs/bpf/clustermesh/node-1"),
        state,
        programs={"cm_connect4": 11, "cm_sendmsg4": None},
        maps={"cm_svc4": info},
    )


def test_render_shows_frontends_slots_and_backends() -> None:
    specs = [
        ServiceSpec(
            FE, frozenset({Backend("10.244.1.10", 8080, 1), Backend("10.245.1.10", 8080, 2)}), "local"
        ),
        ServiceSpec(EMPTY),
    ]
    out = render(snapshot(desired_state(specs, local_cluster_id=1)))
    assert "programs: cm_connect4 id 11, cm_sendmsg4 NOT PINNED" in out
    assert "maps: cm_svc4 4/1024" in out
    assert "10.96.0.10:80/TCP  count 2  preferred 1  affinity local\n" in out
    assert "    slot 1   backend 1      10.244.1.10:8080  cluster 1  local preferred\n" in out
    assert "    slot 2   backend 2      10.245.1.10:8080  cluster 2\n" in out
    assert "10.96.0.20:53/UDP  count 0  preferred 0  affinity none  (no backend: connect refused)" in out
    assert "backends (2)" in out
    assert "problems" not in out


def test_render_flags_broken_and_leftover_entries() -> None:
    state = MapState(
        services={
            SlotKey(FE): ServiceEntry.master(count=2, preferred=0),
            SlotKey(FE, 1): ServiceEntry.slot(7),
            SlotKey(FE, 3): ServiceEntry.slot(7),
        },
        backends={8: BackendEntry(IPv4Address("10.245.9.9"), 80, 9)},
    )
    out = render(snapshot(state))
    assert "slot 1   backend 7  MISSING" in out
    assert "slot 2   MISSING" in out
    assert "BROKEN 10.96.0.10:80/TCP slot 1: backend 7 does not exist" in out
    assert "leftover 10.96.0.10:80/TCP slot 3: beyond count 2" in out
    assert "leftover backend 8: no slot uses it" in out
    data = to_json(snapshot(state))
    assert data["services"][0]["slots"][0] == {
        "slot": 1,
        "backend_id": 7,
        "ip": None,
        "port": None,
        "cluster_id": None,
    }
    assert len(data["broken"]) == 2


def test_package_import_does_not_import_bcc() -> None:
    code = (
        "import sys, clustermesh.datapath as d; "
        "assert 'bcc' not in sys.modules, 'bcc imported'; "
        "d.ServiceSpec; d.dump_main; print('ok')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.stdout.strip() == "ok", out.stderr


def test_only_the_loader_imports_bcc() -> None:
    importers = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(name == "bcc" or name.startswith("bcc.") for name in names):
                importers.append(path.relative_to(PACKAGE).as_posix())
    assert importers == ["datapath/loader.py"]
