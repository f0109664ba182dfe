"""``clustermesh lab``: the whole mesh on this machine, no Docker (see mesh.py).

    clustermesh lab up [--clusters 2] [--demo] [--no-wait]   bring it up (Ctrl-C tears it down)
    clustermesh lab xwing --cluster lab-1 [--count 10]       x-wing asks rebel-base, from lab-1
    clustermesh lab kill-base --cluster lab-1                 lab-1's rebel-base stops being ready
    clustermesh lab revive-base --cluster lab-1
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from clustermesh.lab.kubeapi import KubeAPI
from clustermesh.lab.mesh import LabMesh, run_xwing, set_base_ready
from clustermesh.lab.netns import NetnsError
from clustermesh.lab.servers import CACHE, ServerError

REPO = Path(__file__).resolve().parents[2]
TOTAL = 6


def _say(step: int, total: int, text: str) -> None:
    print(f"[lab {step}/{total}] {text}", flush=True)


def _base(args: argparse.Namespace) -> Path:
    return Path(args.dir) if getattr(args, "dir", None) else CACHE / "lab"


def _summary(result: dict[str, Any]) -> str:
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(result.get("summary", {}).items())) or "none"
    return f"answers by cluster: {counts}; failed: {result.get('failed', 0)}"


def _wait_for(mesh: LabMesh, cluster: str, want: set[str], timeout: float = 90.0) -> dict[str, Any]:
    """Ask until x-wing of ``cluster`` gets answers from exactly the clusters ``want``."""
    deadline = time.monotonic() + timeout
    result: dict[str, Any] = {}
    while time.monotonic() < deadline:
        result = mesh.xwing(cluster, count=12)
        if set(result.get("summary", {})) == want and result.get("failed") == 0:
            return result
        time.sleep(1)
    raise ServerError(f"x-wing in {cluster} never got answers from exactly {sorted(want)}: {_summary(result)}")


def demo(mesh: LabMesh) -> None:
    names = {c.name for c in mesh.clusters}
    first = mesh.clusters[0].name
    print("\n=== Star Wars demo ===", flush=True)
    for c in mesh.clusters:
        result = _wait_for(mesh, c.name, names)
        print(f"x-wing in {c.name} -> rebel-base: {_summary(result)}", flush=True)
    if len(mesh.clusters) < 2:
        return
    print(f"\nkilling the rebel-base of {first} (its endpoints stop being ready)", flush=True)
    mesh.set_base(first, ready=False)
    result = _wait_for(mesh, first, names - {first})
    print(f"x-wing in {first} -> rebel-base: {_summary(result)}   <- failover, same ClusterIP", flush=True)
    print(f"\nreviving the rebel-base of {first}", flush=True)
    mesh.set_base(first, ready=True)
    result = _wait_for(mesh, first, names)
    print(f"x-wing in {first} -> rebel-base: {_summary(result)}\n", flush=True)


def lab_up(args: argparse.Namespace) -> int:
    base = _base(args)
    if base.exists():
        subprocess.run(["rm", "-rf", str(base)], check=True)
    base.mkdir(parents=True)
    mesh = LabMesh(base, clusters=args.clusters, affinity=args.affinity, say=_say)

    def interrupted(*_: object) -> None:
        raise KeyboardInterrupt  # unwinds through the finally below, wherever we are

    signal.signal(signal.SIGTERM, interrupted)
    try:
        mesh.up()
        (base / "state.json").write_text(json.dumps(mesh.state(), indent=2))
        kubeconfig = base / "kubeconfig"
        print(
            "\nThe lab is up.\n"
            f"  kubectl --kubeconfig {kubeconfig} --context lab-1 get clustermesh\n"
            f"  kubectl --kubeconfig {kubeconfig} --context lab-2 get svc rebel-base\n"
            f"  clustermesh lab xwing --cluster lab-1          # x-wing asks rebel-base\n"
            f"  clustermesh lab kill-base --cluster lab-1      # then ask again: failover\n"
            f"  clustermesh status --kubeconfig {kubeconfig} --context lab-1\n"
            f"  logs and state: {base}\n",
            flush=True,
        )
        if args.demo:
            demo(mesh)
        if args.no_wait:
            return 0
        print("Press Ctrl-C to stop the lab.", flush=True)
        stop = threading.Event()
        try:
            while not stop.wait(2):
                for c in mesh.clusters:
                    for proc in c.processes:
                        if not proc.running:
                            raise ServerError(f"{proc.name} exited; see {proc.log_path}:\n{proc.tail()}")
        except KeyboardInterrupt:
            pass
        return 0
    except (ServerError, NetnsError, subprocess.CalledProcessError) as exc:
        print(f"lab: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("[lab] interrupted", flush=True)
        return 130
    finally:
        print("[lab] tearing down", flush=True)
        mesh.down()
        (base / "state.json").unlink(missing_ok=True)


def _state(args: argparse.Namespace) -> dict[str, Any]:
    path = _base(args) / "state.json"
    if not path.exists():
        raise ServerError(f"no lab running ({path} is missing): start one with clustermesh lab up")
    data: dict[str, Any] = json.loads(path.read_text())
    if args.cluster not in data["clusters"]:
        raise ServerError(f"no cluster {args.cluster!r}; the lab has {', '.join(data['clusters'])}")
    return data


def _api(kubeconfig: str) -> KubeAPI:
    config = json.loads(Path(kubeconfig).read_text())
    cluster = config["clusters"][0]["cluster"]
    return KubeAPI(cluster["server"], config["users"][0]["user"]["token"], cluster["certificate-authority"])


def lab_xwing(args: argparse.Namespace) -> int:
    info = _state(args)["clusters"][args.cluster]
    cluster_ip = _api(info["kubeconfig"]).get("Service", "default", "rebel-base")["spec"]["clusterIP"]
    return run_xwing(info["xwing_netns"], Path(info["cgroup"]), cluster_ip, args.count, capture=False).returncode


def lab_base(args: argparse.Namespace, ready: bool) -> int:
    info = _state(args)["clusters"][args.cluster]
    set_base_ready(_api(info["kubeconfig"]), info["base_ip"], ready)
    print(f"rebel-base of {args.cluster} is {'ready' if ready else 'down'}")
    return 0


def run_lab(args: argparse.Namespace) -> int:
    try:
        if args.lab_command == "up":
            return lab_up(args)
        if args.lab_command == "xwing":
            return lab_xwing(args)
        if args.lab_command in ("kill-base", "revive-base"):
            return lab_base(args, ready=args.lab_command == "revive-base")
    except ServerError as exc:
        print(f"lab: {exc}", file=sys.stderr)
        return 1
    print(__doc__, file=sys.stderr)
    return 2
