"""``clustermesh lab down``: everything a lab made removed from its state record alone (processes by
their cgroup, datapath pins, namespaces, cgroups, mount points, credential folders), also after the
lab's supervisor died."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clustermesh import private_files
from clustermesh.datapath import hooks
from clustermesh.lab.netns import NetnsError, delete_netns, ip, kill_cgroup, remove_cgroup


def teardown(state: dict[str, Any]) -> list[str]:
    """Remove everything a lab made, from its state record alone; each step on its own, so
    one failure leaves no more behind. Returns the problems met."""
    problems: list[str] = []

    def attempt(what: str, fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:
            problems.append(f"{what}: {exc}")

    root = Path(state["cgroup_root"])
    # Every lab process and every pod process lives under the lab's cgroup: one write stops them all.
    attempt("kill lab processes", kill_cgroup, root, 10.0)
    for name, node in state.get("nodes", {}).items():
        if Path(node["cgroup"]).exists():
            attempt(f"datapath of {name}", hooks.destroy, node["cgroup"], node["pin_dir"])
        else:
            attempt(f"pins of {name}", hooks.remove_pins, node["pin_dir"])
    for cluster in state.get("clusters", {}).values():
        attempt("pod mount points", _remove_made_paths, Path(cluster["state_dirs"]))
    attempt("namespaces", _remove_namespaces, state["netns_prefix"])
    attempt("cgroups", remove_cgroup, root)
    # The killed agents and operators could not remove their copies of the remotes' credentials.
    for component in private_files.COMPONENTS:
        attempt(f"{component} credential folders", private_files.remove_dead_folders, component)
    return problems


def _remove_namespaces(prefix: str) -> None:
    for netns in sorted(_netns_names(), reverse=True):
        if netns.startswith(prefix):
            delete_netns(netns)
    left = [n for n in _netns_names() if n.startswith(prefix)]
    if left:
        raise NetnsError(f"still there: {', '.join(left)}")


def process_start(pid: int) -> str:
    """A process's start time (clock ticks since boot): with the pid, it names the process
    even after the pid is reused."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _netns_names() -> list[str]:
    return [line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()]


def _remove_made_paths(state_dirs: Path) -> None:
    """The mount points node agents had to make on the host (their made-paths.json)."""
    from clustermesh.lab.node.volumes import remove_made_path

    for made_file in state_dirs.glob("*/made-paths.json"):
        for made in reversed(json.loads(made_file.read_text())):
            remove_made_path(Path(made))
