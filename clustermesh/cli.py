"""The ``clustermesh`` command line: one subcommand per component.

Subcommands import their component lazily so that ``clustermesh --help`` works
without kopf, bcc or a cluster, and a missing piece names itself.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from clustermesh import __version__


def cmd_version(args: argparse.Namespace) -> int:
    print(f"clustermesh {__version__}")
    return 0


def cmd_operator(args: argparse.Namespace) -> int:
    from clustermesh.operator.main import run_operator

    return run_operator(args)


def cmd_agent(args: argparse.Namespace) -> int:
    from clustermesh.agent.main import run_agent

    return run_agent(args)


def cmd_status(args: argparse.Namespace) -> int:
    from clustermesh.agent.status import run_status

    return run_status(args)


def cmd_connect(args: argparse.Namespace) -> int:
    from clustermesh.connect import run_connect

    return run_connect(args)


def cmd_lab(args: argparse.Namespace) -> int:
    from clustermesh.lab.run import run_lab

    return run_lab(args)


def cmd_datapath(args: argparse.Namespace) -> int:
    from clustermesh.datapath.command import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clustermesh",
        description="Multi-cluster global Services for Kubernetes with eBPF socket load balancing.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("version", help="print the version")
    p.set_defaults(func=cmd_version)

    p = sub.add_parser(
        "operator",
        help="export this cluster's global Services and Nodes into its state store",
        description="Run the per-cluster operator (kopf). Identity comes from the ClusterMesh "
        "resource, or from --cluster-name/--cluster-id on the first start.",
    )
    p.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"), help="default: in-cluster or ~/.kube")
    p.add_argument("--context", default=None, help="kubeconfig context")
    p.add_argument(
        "--etcd", default=os.environ.get("CLUSTERMESH_ETCD", "http://127.0.0.1:2379"),
        help="this cluster's state store (etcd itself, not the proxy): URL",
    )
    p.add_argument(
        "--etcd-prefix", default=os.environ.get("CLUSTERMESH_ETCD_PREFIX", ""),
        help="key prefix inside the store; expose it to remote clusters with grpc-proxy --namespace=PREFIX",
    )
    p.add_argument("--etcd-ca", default=os.environ.get("CLUSTERMESH_ETCD_CA"))
    p.add_argument("--etcd-cert", default=os.environ.get("CLUSTERMESH_ETCD_CERT"))
    p.add_argument("--etcd-key", default=os.environ.get("CLUSTERMESH_ETCD_KEY"))
    p.add_argument("--cluster-name", default=os.environ.get("CLUSTERMESH_CLUSTER_NAME"))
    p.add_argument("--cluster-id", type=int, default=_env_int("CLUSTERMESH_CLUSTER_ID"))
    p.add_argument("--clustermesh", default="default", help="name of the ClusterMesh resource")
    p.add_argument("--lease-ttl", type=int, default=15, help="seconds; records vanish this long after a crash")
    p.add_argument(
        "--resync-interval", type=float, default=300.0,
        help="seconds between full listings that catch missed deletions",
    )
    p.add_argument("--heartbeat-interval", type=float, default=60.0, help="seconds between heartbeats")
    p.add_argument(
        "--min-write-interval", type=float, default=0.25,
        help="seconds between two writes of one record; changes in between are coalesced",
    )
    p.add_argument(
        "--batch-window", type=float, default=0.0,
        help="seconds kopf waits for more events of one object before handling it",
    )
    p.add_argument("--metrics-port", type=int, default=9963, help="Prometheus /metrics and /healthz; -1: off")
    p.add_argument("--metrics-host", default="127.0.0.1")
    p.add_argument("--namespace", action="append", default=None, help="watch only these namespaces")
    p.add_argument(
        "--peering", default=None,
        help="kopf peering name for leader election (needs crds/kopf-peering.yaml); default: standalone",
    )
    p.add_argument(
        "--priority", type=int, default=None,
        help="peering priority; the highest live one writes, the others stand by (default: random)",
    )
    p.set_defaults(func=cmd_operator)

    p = sub.add_parser(
        "agent", help="per-node agent: merge remote backends into the eBPF maps",
        description="Watch this cluster's global Services and every remote cluster of the ClusterMesh, "
        "and program the node's socket-level load balancer.",
    )
    p.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"))
    p.add_argument("--context", default=None)
    p.add_argument("--node", required=True, help="this node's name (pins go to /sys/fs/bpf/clustermesh/<node>)")
    p.add_argument("--cgroup", required=True, help="cgroup v2 directory whose sockets are load-balanced")
    p.add_argument("--pin-dir", default=None, help="bpffs folder for the maps (default from --node)")
    p.add_argument("--clustermesh", default="default", help="name of the ClusterMesh resource")
    p.add_argument("--grace-period", type=float, default=60.0,
                   help="seconds an unreachable remote keeps serving before its backends are withdrawn")
    p.add_argument("--routes", default="off",
                   help="routes to remote pod CIDRs via remote node IPs: off (default), host, or netns:NAME")
    p.add_argument("--heartbeat-timeout", type=float, default=180.0,
                   help="seconds without a remote heartbeat before that remote counts as unreachable")
    p.add_argument("--metrics-port", type=int, default=9964, help="Prometheus /metrics and /healthz; -1: off")
    p.add_argument("--metrics-host", default="127.0.0.1")
    p.set_defaults(func=cmd_agent)
    p = sub.add_parser("status", help="show the mesh as this cluster sees it (checks every remote live)")
    p.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"))
    p.add_argument("--context", default=None)
    p.add_argument("--clustermesh", default="default", help="name of the ClusterMesh resource")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for remotes to be ready")
    p.add_argument("--secrets-namespace", default="kube-system", help="where remote TLS Secrets live by default")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser(
        "connect", help="make two clusters remotes of each other",
        description="Copy each cluster's access Secret (spec.access) into the other and add each to the "
        "other's ClusterMesh spec.clusters.",
    )
    p.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"))
    p.add_argument("--context", default=None, help="the source cluster's context")
    p.add_argument("--destination-kubeconfig", default=None, help="default: --kubeconfig")
    p.add_argument("--destination-context", default=None, help="the destination cluster's context")
    p.add_argument("--clustermesh", default="default")
    p.add_argument("--destination-clustermesh", default="default")
    p.add_argument("--one-way", action="store_true", help="only the source learns about the destination")
    p.set_defaults(func=cmd_connect)

    p = sub.add_parser("lab", help="small real Kubernetes clusters on this machine (no Docker), meshed, and the "
                       "Star Wars demo")
    lab = p.add_subparsers(dest="lab_command", metavar="ACTION")
    up = lab.add_parser("up", help="start the clusters and stay in the foreground until Ctrl-C")
    up.add_argument("--dir", default=None, help="state folder (default ~/.cache/clustermesh/lab)")
    up.add_argument("--clusters", type=int, default=2, choices=range(1, 10), metavar="N")
    up.add_argument("--nodes", type=int, default=2, choices=range(1, 10), metavar="M", help="nodes per cluster")
    up.add_argument("--demo", action="store_true", help="run the Star Wars failover demo once the lab is up")
    up.add_argument("--no-wait", action="store_true", help="tear down right after (with --demo: a smoke test)")
    for action, text in (("down", "remove the lab (also after its supervisor died)"),
                         ("status", "clusters, nodes, pods and processes of the lab"),
                         ("xwing", "x-wing asks rebel-base through kubectl exec")):
        a = lab.add_parser(action, help=text)
        a.add_argument("--dir", default=None)
        if action == "xwing":
            a.add_argument("--cluster", default="lab-1")
            a.add_argument("--count", type=int, default=10)
    p.set_defaults(func=cmd_lab)

    p = sub.add_parser("datapath", help="inspect or remove a node's eBPF socket-LB datapath")
    from clustermesh.datapath.command import build_parser as datapath_parser

    datapath_parser(p)
    p.set_defaults(func=cmd_datapath)
    return parser


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.command == "lab" and not args.lab_command:
        return _usage(parser)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
