"""``clustermesh operator``: wire the Kubernetes client, etcd, metrics and kopf together."""

from __future__ import annotations

import argparse
import logging
import random
import sys

import kopf

from clustermesh import metrics, trace
from clustermesh.kube import KubeClient, KubeError
from clustermesh.kvstore import Endpoint, KVClient, KVStoreError
from clustermesh.operator import handlers
from clustermesh.operator.controller import Operator, OperatorConfig
from clustermesh.store.sync import WriterSettings

log = logging.getLogger(__name__)


def run_operator(args: argparse.Namespace) -> int:
    trace.set_role("operator")
    # kopf pauses *every* operator of equal priority, so a random one elects a single writer.
    priority = args.priority if args.priority is not None else random.randint(1, 1_000_000)
    try:
        kube = KubeClient(args.kubeconfig, args.context)
        endpoint = Endpoint.parse(args.etcd, args.etcd_ca, args.etcd_cert, args.etcd_key)
        kv = KVClient(endpoint, prefix=args.etcd_prefix)
        config = OperatorConfig(
            mesh_name=args.clustermesh,
            cluster_name=args.cluster_name,
            cluster_id=args.cluster_id,
            namespaces=tuple(args.namespace or ()),
            resync_interval=args.resync_interval,
            cache=args.cache,
            grace_period=args.grace_period,
            certificates=tuple((name, path) for name, path in (("etcd ca.crt", args.etcd_ca),
                                                                ("etcd client", args.etcd_cert)) if path),
            peering=args.peering,
            priority=priority,
            status_lease=args.status_lease,
            status_lease_namespace=args.status_lease_namespace,
            replica=args.replica,
            writer=WriterSettings(
                lease_ttl=args.lease_ttl,
                heartbeat_interval=args.heartbeat_interval,
                min_interval=args.min_write_interval,
            ),
        )
        operator = Operator(config, kv, kube)
    except (KubeError, KVStoreError, ValueError) as exc:
        print(f"clustermesh operator: {exc}", file=sys.stderr)
        return 1
    if args.metrics_port >= 0:
        try:
            # Probes answer while the operator waits for its ClusterMesh: alive, not ready.
            metrics.serve(args.metrics_host, args.metrics_port, operator.health, operator.ready)
        except OSError as exc:
            print(f"clustermesh operator: metrics port {args.metrics_port}: {exc}; "
                  "pick another with --metrics-port (or -1 to disable)", file=sys.stderr)
            return 1
    try:
        operator.ensure_mesh()
    except (KubeError, ValueError) as exc:
        print(f"clustermesh operator: {exc}", file=sys.stderr)
        return 1
    memo = kopf.Memo(operator=operator, connection=kube.connection(), batch_window=args.batch_window)
    if not args.verbose:  # one line per handled event is noise at this rate
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    kopf.run(
        registry=handlers.registry,
        clusterwide=not args.namespace,
        namespaces=args.namespace or (),
        standalone=args.peering is None,
        peering_name=args.peering,
        priority=priority,
        memo=memo,
    )
    return 0
