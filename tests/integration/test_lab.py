"""`clustermesh lab up`: the README's main command brings up a cluster that kubectl can use."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.prereq import require_binary

REPO = Path(__file__).resolve().parents[2]


def test_lab_up_starts_a_reachable_cluster(tmp_path: Path, control_plane) -> None:
    require_binary("etcd")
    require_binary("etcdctl", "run scripts/setup.sh (Debian package etcd-client)")
    res = subprocess.run(
        [sys.executable, "-m", "clustermesh.cli", "lab", "up", "--dir", str(tmp_path), "--name", "lab-t",
         "--no-wait"],
        capture_output=True, text=True, timeout=180, cwd=REPO,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    for step in range(1, 7):
        assert f"[lab {step}/6]" in res.stdout
    assert "kubectl --kubeconfig" in res.stdout and "get ns" in res.stdout
    assert "[lab] stopping" in res.stdout
    assert (tmp_path / "lab-t" / "control-plane" / "kubeconfig").exists()
    assert "password=" in (tmp_path / "lab-t" / "remote-credentials").read_text()
    assert "first full export in" in (tmp_path / "lab-t" / "operator.log").read_text()
