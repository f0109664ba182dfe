"""The README's main command, ``clustermesh lab up --demo``: the Star Wars failover through kubectl, here in
direct mode (``--direct``: every agent reads the other cluster's store itself). The cache mode, the lab's
default, runs the same demo in tests/e2e/deploy/test_manifests.py, so the failover is covered in both."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.e2e.test_lab import _prereqs

REPO = Path(__file__).resolve().parents[2]


def test_lab_up_demo_fails_over_between_clusters(tmp_path: Path) -> None:
    _prereqs()
    res = subprocess.run(
        [sys.executable, "-m", "clustermesh.cli", "lab", "up", "--dir", str(tmp_path / "lab"), "--nodes", "1",
         "--demo", "--no-wait", "--direct"],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    out = res.stdout
    assert res.returncode == 0, out + res.stderr
    for step in range(1, 7):
        assert f"[lab {step}/6]" in out
    assert "kubectl --context lab-1 apply -f demo/starwars/cluster1.yaml" in out
    assert "agents read each remote's store directly" in out and "deploy/direct" in out
    failover = re.search(r"failover: last answer from Cluster-1 ([\d.]+)s after the scale command; since then only "
                         r"Cluster-2; failed requests: (\d+)", out)
    assert failover is not None, out
    assert int(failover.group(2)) == 0, out
    rates = [ln for ln in out.splitlines() if "/s" in ln and "failed" in ln]
    assert rates and all("failed 0" in ln for ln in rates), out
    assert "[lab] down" in out
    tag = re.search(r"\(lab (\w+): namespaces", out)
    assert tag is not None, out
    leftovers = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"cml-{tag.group(1)}-" not in leftovers, "the lab removes its namespaces"
