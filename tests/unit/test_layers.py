"""The layering of ARCHITECTURE.md, enforced: each outside library enters through one
module (or one package), and the pure modules import no I/O library at all."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "clustermesh"

# library -> the only places allowed to import it (files or package folders)
GATEKEEPERS = {
    "etcd3": {"kvstore.py"},
    "grpc": {"kvstore.py"},
    "kopf": {"operator/handlers.py", "operator/main.py"},
    "kubernetes": {"kube.py"},
    "bcc": {"datapath/loader.py"},
    "pyroute2": {"agent/routes.py"},  # and nothing else
    "aiohttp": {"lab/node/server.py", "lab/node/api.py"},  # the lab's kubelet: its server and its client
    "cryptography": {"pki.py", "lab/pki.py"},  # certificates: the CA, leaves, CRL, expiry
}

PURE = [
    "schema/__init__.py",
    "schema/core.py",
    "schema/service.py",
    "schema/node.py",
    "schema/config.py",
    "schema/exports.py",
    "cluster/export.py",
    "cluster/state.py",
    "agent/merge.py",
    "agent/route_plan.py",
    "agent/status_view.py",
    "datapath/model.py",
    "datapath/plan.py",
    "datapath/incremental.py",
    "cluster/mcs.py",
    "lab/node/spec.py",
    "lab/node/pod_status.py",
    "store/readiness.py",
]
IO_LIBRARIES = {"etcd3", "grpc", "kopf", "kubernetes", "bcc", "pyroute2", "socket", "subprocess", "urllib", "aiohttp"}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def _allowed(rel: str, places: set[str]) -> bool:
    return any(rel == p or (p.endswith("/") and rel.startswith(p)) for p in places)


def test_each_library_enters_through_its_gatekeeper() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        for lib in imported_roots(path) & set(GATEKEEPERS):
            if not _allowed(rel, GATEKEEPERS[lib]):
                offenders.append(f"{rel} imports {lib}")
    assert offenders == []


def test_pure_modules_do_no_io() -> None:
    for rel in PURE:
        path = PACKAGE / rel
        assert path.exists(), f"{rel} is listed as pure and is gone: a rename? update PURE and ARCHITECTURE.md"
        assert imported_roots(path) & IO_LIBRARIES == set(), rel


# The lab is a tool beside the product: nothing the product runs imports it. The command line is the
# one door (``clustermesh lab ...`` imports clustermesh.lab.run inside its own subcommand).
LAB_DOOR = {"cli.py": {"clustermesh.lab.run", "clustermesh.lab.run.run_lab"}}


def test_the_product_imports_nothing_from_the_lab() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith("lab/"):
            continue
        lab = {m for m in imported_modules(path) if m == "clustermesh.lab" or m.startswith("clustermesh.lab.")}
        offenders += [f"{rel} imports {m}" for m in sorted(lab - LAB_DOOR.get(rel, set()))]
    assert offenders == []


def test_bcc_is_only_imported_by_the_loader_side_of_the_datapath() -> None:
    pure_datapath = {"datapath/model.py", "datapath/plan.py", "datapath/incremental.py", "datapath/layout.py",
                     "datapath/__init__.py"}
    for rel in pure_datapath:
        path = PACKAGE / rel
        assert path.exists(), rel
        assert "bcc" not in imported_roots(path), f"{rel} must stay importable without bcc"


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


# Data flows one way (ARCHITECTURE.md): the shared layers never reach up into the operator or the
# agent, and the operator and the agent meet only below (the cluster model, the store readers).
LAYERS = {
    "schema/": ("clustermesh.cluster", "clustermesh.operator", "clustermesh.agent", "clustermesh.store",
                "clustermesh.datapath", "clustermesh.kvstore", "clustermesh.kube"),
    "cluster/": ("clustermesh.operator", "clustermesh.agent", "clustermesh.store", "clustermesh.datapath"),
    "store/": ("clustermesh.operator", "clustermesh.agent", "clustermesh.datapath"),
    "operator/": ("clustermesh.agent", "clustermesh.datapath"),
    "agent/": ("clustermesh.operator",),
}


def test_imports_only_go_down_the_layers() -> None:
    offenders = []
    for folder, forbidden in LAYERS.items():
        for path in sorted((PACKAGE / folder).rglob("*.py")):
            rel = path.relative_to(PACKAGE).as_posix()
            offenders += [f"{rel} imports {m}" for m in imported_modules(path) if m.startswith(forbidden)]
    assert offenders == []
