"""The README's main job: two clusters on this machine and the Star Wars failover demo.

Everything real: two control planes, two TLS stores with auth behind read-only grpc-proxies,
two operators, two agents with their socket-LBs and routes, pods in network namespaces.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.datapath.conftest import cgroup2_root
from tests.prereq import require, require_binary, require_root

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def prereqs(control_plane) -> None:  # control_plane: fails early (under CI) if kube binaries are missing
    require_root()
    for binary in ("etcd", "etcdctl", "ip", "kubectl"):
        require_binary(binary)
    require(cgroup2_root() is not None, "a cgroup v2 mount", "run scripts/setup.sh")


def counts(line: str) -> dict[str, int]:
    return {name: int(n) for name, n in re.findall(r"(lab-\d): (\d+)", line.split("answers by cluster:")[1])}


def test_lab_demo_fails_over_between_clusters(prereqs: None, tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "clustermesh.cli", "lab", "up", "--dir", str(tmp_path / "lab"), "--demo", "--no-wait"],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    out = res.stdout
    assert res.returncode == 0, out + res.stderr
    for step in range(1, 7):
        assert f"[lab {step}/6]" in out
    lines = [ln for ln in out.splitlines() if "answers by cluster" in ln]
    assert len(lines) == 4, out
    before_1, before_2, failover, revived = (counts(ln) for ln in lines)
    assert set(before_1) == {"lab-1", "lab-2"} and set(before_2) == {"lab-1", "lab-2"}
    assert set(failover) == {"lab-2"}, "with lab-1's base down, every answer comes from lab-2"
    assert set(revived) == {"lab-1", "lab-2"}
    assert all("failed: 0" in ln for ln in lines)
    assert "[lab] tearing down" in out
    leftovers = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "cml-" not in leftovers, "the lab removes its namespaces"
