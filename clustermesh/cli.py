"""The ``clustermesh`` command line: one subcommand per component.

Subcommands import their component lazily so that ``clustermesh --help`` works
without kopf, bcc or a cluster, and a missing piece names itself.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
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


def cmd_disconnect(args: argparse.Namespace) -> int:
    from clustermesh.connect import run_disconnect

    return run_disconnect(args)


def cmd_revoke(args: argparse.Namespace) -> int:
    from clustermesh.connect import run_revoke

    return run_revoke(args)


def cmd_certs(args: argparse.Namespace) -> int:
    from clustermesh.certs import run_certs

    return run_certs(args)


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
    p.add_argument("--lease-ttl", type=int, default=900,
                   help="seconds (Cilium: 15 minutes); records of a crashed operator vanish this long after its "
                   "last keep-alive, unless a new operator takes them over first")
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
    p.add_argument("--metrics-port", type=int, default=9963,
                   help="Prometheus /metrics, /healthz and /readyz (ready: the full export is in the store); -1: off")
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
    p.add_argument(
        "--status-lease", default=None,
        help="HA store replicas: every replica exports to its own etcd, and only the holder of this "
        "coordination.k8s.io Lease writes the ClusterMesh status (default: this operator writes it)",
    )
    p.add_argument("--status-lease-namespace", default=os.environ.get("POD_NAMESPACE", "clustermesh-system"),
                   help="namespace of the --status-lease Lease (default: $POD_NAMESPACE or clustermesh-system)")
    p.add_argument("--replica", default=os.environ.get("POD_NAME") or socket.gethostname(),
                   help="this replica's name in the Lease (default: $POD_NAME or the host name)")
    p.add_argument("--grace-period", type=float, default=60.0,
                   help="seconds an unreachable remote keeps its place (in status and in the cache)")
    p.add_argument("--cache", action="store_true",
                   help="KVStoreMesh: mirror every remote's records into this store (cilium/cache/), so that "
                   "local agents read them here instead of from each remote")
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
    p.add_argument("--route-drain", type=float, default=5.0,
                   help="seconds a remote's route stays after its backends left the maps (requests under way finish)")
    p.add_argument("--first-sync-wait", type=float, default=5.0,
                   help="on a node whose maps are empty, wait up to this many seconds from start for every remote's "
                   "first listing before the first write (one write with everything instead of one per remote)")
    p.add_argument("--heartbeat-timeout", type=float, default=180.0,
                   help="seconds without a remote heartbeat before that remote is listed again (its backends "
                   "stay: only a store that stops answering withdraws them, after --grace-period)")
    p.add_argument("--lb-service-map-max", type=int, default=262_144,
                   help="entries of the service maps made at first start (a frontend plus one per backend slot); "
                   "Cilium's bpf-lb-map-max is the reference")
    p.add_argument("--lb-backend-map-max", type=int, default=131_072, help="entries of the backend maps")
    p.add_argument("--lb-rev-nat-map-max", type=int, default=131_072,
                   help="entries of the reverse-NAT maps (one per open rewritten socket, LRU)")
    p.add_argument("--metrics-port", type=int, default=9870,
                   help="Prometheus /metrics, /healthz and /readyz (not 9962-9964: Cilium's); -1: off")
    p.add_argument("--metrics-host", default="127.0.0.1")
    p.set_defaults(func=cmd_agent)
    p = sub.add_parser("status", help="show the mesh as this cluster sees it (checks every remote live)")
    p.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"))
    p.add_argument("--context", default=None)
    p.add_argument("--clustermesh", default="default", help="name of the ClusterMesh resource")
    p.add_argument("--output", "-o", choices=("table", "json"), default="table",
                   help="json: a stable document (format 1) for scripts; stdout holds nothing else")
    p.add_argument("--wait", action="store_true", help="poll until every remote is ready (exit 1 at --timeout)")
    p.add_argument("--timeout", type=float, default=60.0, help="with --wait: seconds before giving up")
    p.add_argument("--secrets-namespace", default="clustermesh-remotes",
                   help="where remote TLS Secrets live when spec.clusters names no namespace")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser(
        "connect", help="make two clusters remotes of each other",
        description="Give each cluster its own reader in the other's store (etcd user, password and client "
        "certificate, named after it), copy it to that cluster only, and add each to the other's ClusterMesh "
        "spec.clusters. Each store's CA comes from --pki-dir/--destination-pki-dir, the default folder of "
        "`clustermesh certs`, or the Secret clustermesh-store-ca.",
    )
    _add_pair_flags(p, "only the source learns about the destination")
    p.set_defaults(func=cmd_connect)
    p = sub.add_parser(
        "certs", help="make or renew a cluster's store certificates (Secrets)",
        description="One CA per cluster (kept in --pki-dir, or in the cluster with --in-cluster-ca) signs the "
        "store's etcd, operator and grpc-proxy certificates and every reader's identity (connect makes one per "
        "peer); written as the Secrets deploy/ mounts. Re-running keeps what exists and renews what expires "
        "within --renew-before (no leaf outlives the CA); --rotate issues new leaves and passwords.",
    )
    p.add_argument("--cluster", default=None, help="this cluster's name in the mesh (not needed with --from-cluster)")
    p.add_argument("--reader", action="append", default=None,
                   help="an extra reader (etcd user, Secret clustermesh-access-NAME), e.g. a tool; repeatable. "
                   "Peers get theirs from connect")
    p.add_argument("--ca-lifetime", default="1095d", help="a new CA's lifetime (default 1095d, Cilium's)")
    p.add_argument("--leaf-lifetime", default="365d", help="every other certificate's lifetime, at most the CA's")
    p.add_argument("--renew-before", default="30d", help="re-issue a certificate this close to its expiry")
    p.add_argument("--renew", action="store_true",
                   help="only renew: refuse to make a new CA (run it, or the CronJob does, before expiry)")
    p.add_argument("--in-cluster-ca", action="store_true",
                   help="also write the CA (key included) as Secret clustermesh-store-ca, for deploy/'s renewal "
                   "CronJob")
    p.add_argument("--from-cluster", action="store_true",
                   help="read the CA and the current certificates from the cluster's Secrets instead of --pki-dir "
                   "(what the CronJob runs)")
    p.add_argument("--ip", action="append", default=None,
                   help="extra IP of the grpc-proxy certificate: node (NodePort) or load-balancer address")
    p.add_argument("--dns", action="append", default=None, help="extra DNS name of the grpc-proxy certificate")
    p.add_argument("--namespace", default="clustermesh-system", help="where the store runs and the Secrets go")
    p.add_argument("--cluster-domain", default="cluster.local")
    p.add_argument("--pki-dir", default=None, help="CA and keys (default ~/.config/clustermesh/pki/CLUSTER)")
    p.add_argument("--rotate", action="store_true", help="new certificates and passwords (same CA)")
    p.add_argument("--output-dir", default=None, help="write the Secrets as YAML files here instead of applying")
    p.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"))
    p.add_argument("--context", default=None)
    p.set_defaults(func=cmd_certs)
    p = sub.add_parser(
        "disconnect", help="undo connect: remove each cluster from the other",
        description="Remove each cluster from the other's ClusterMesh spec.clusters, delete the access "
        "Secret connect copied and revoke each side's reader in the other's store (its certificate on the "
        "CRL, its etcd user removed). Disconnecting clusters that are not connected changes nothing.",
    )
    _add_pair_flags(p, "only the source forgets the destination")
    p.set_defaults(func=cmd_disconnect)
    p = sub.add_parser(
        "revoke", help="shut one peer's reader out of this cluster's store",
        description="Put the peer's reader certificate on the store CA's CRL (the grpc-proxy refuses it and "
        "closes its open connections) and remove its etcd user and access Secret. Other peers keep reading; "
        "spec.clusters is not changed (disconnect does both).",
    )
    p.add_argument("--peer", required=True, help="the peer cluster's name (its reader's name)")
    p.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"))
    p.add_argument("--context", default=None, help="the context of the cluster whose store the peer reads")
    p.add_argument("--clustermesh", default="default")
    p.add_argument("--pki-dir", default=None, help="the store CA's folder (default: certs' default, or the "
                   "Secret clustermesh-store-ca)")
    p.set_defaults(func=cmd_revoke)

    p = sub.add_parser("lab", help="small real Kubernetes clusters on this machine (no Docker), meshed, and the "
                       "Star Wars demo")
    lab = p.add_subparsers(dest="lab_command", metavar="ACTION")
    up = lab.add_parser("up", help="start the clusters and stay in the foreground until Ctrl-C")
    up.add_argument("--dir", default=None, help="state folder (default ~/.cache/clustermesh/lab)")
    up.add_argument("--clusters", type=int, default=2, choices=range(1, 10), metavar="N")
    up.add_argument("--nodes", type=int, default=2, choices=range(1, 10), metavar="M", help="nodes per cluster")
    up.add_argument("--demo", action="store_true", help="run the Star Wars failover demo once the lab is up")
    up.add_argument("--no-wait", action="store_true", help="tear down right after (with --demo: a smoke test)")
    mode = up.add_mutually_exclusive_group()
    mode.add_argument("--from-manifests", dest="processes", action="store_false",
                      help="(the default) install the mesh with deploy/: clustermesh certs, kubectl apply -k, "
                      "connect; the store and the agents run as Pods")
    mode.add_argument("--processes", dest="processes", action="store_true",
                      help="start the mesh's stores, operators and agents as supervised processes instead "
                      "(what the chaos tests kill and hold down one by one)")
    up.set_defaults(processes=False)
    up.add_argument("--direct", nargs="?", const="all", default="", metavar="CLUSTER,...",
                    help="(deploy/ lab) agents read every remote's store themselves, without the store pods' "
                    "cache (KVStoreMesh): ClusterMesh spec.cache off and deploy/direct's RBAC; in every "
                    "cluster, or only in those named (lab-3: a mesh that mixes both modes)")
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


def _add_pair_flags(p: argparse.ArgumentParser, one_way: str) -> None:
    """The two sides of connect and disconnect (the same flags, so one undoes the other)."""
    p.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"))
    p.add_argument("--context", default=None, help="the source cluster's context")
    p.add_argument("--destination-kubeconfig", default=None, help="default: --kubeconfig")
    p.add_argument("--destination-context", default=None, help="the destination cluster's context")
    p.add_argument("--clustermesh", default="default")
    p.add_argument("--destination-clustermesh", default="default")
    p.add_argument("--one-way", action="store_true", help=one_way)
    p.add_argument("--pki-dir", default=None, help="the source store's CA folder (default: certs' default for "
                   "its name, or its Secret clustermesh-store-ca)")
    p.add_argument("--destination-pki-dir", default=None, help="the destination store's CA folder")


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
