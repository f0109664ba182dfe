"""kubectl for tests: the CRDs, manifests from stdin."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def kubectl(kubeconfig: str, *args: str, stdin: str | None = None) -> str:
    res = subprocess.run(["kubectl", "--kubeconfig", kubeconfig, *args], input=stdin, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, f"kubectl {' '.join(args)}: {res.stderr}"
    return res.stdout


def apply_crds(kubeconfig: str) -> None:
    kubectl(kubeconfig, "apply", "-f", str(REPO / "crds"))
    kubectl(kubeconfig, "wait", "--for=condition=Established", "crd/clustermeshes.clustermesh.io", "--timeout=60s")


def apply_object(kubeconfig: str, obj: dict[str, Any]) -> None:
    kubectl(kubeconfig, "apply", "-f", "-", stdin=json.dumps(obj))


def apply_peering_crd(kubeconfig: str) -> None:
    """kopf's ClusterKopfPeering CRD (crds/), for operators run with --peering outside deploy/."""
    apply_crds(kubeconfig)
    kubectl(kubeconfig, "wait", "--for=condition=Established", "crd/clusterkopfpeerings.kopf.dev", "--timeout=60s")
