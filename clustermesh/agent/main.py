"""``clustermesh agent``: wire the Kubernetes client, the socket-LB and the remotes together."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from typing import Any

from clustermesh import metrics, trace
from clustermesh.agent.agent import Agent, AgentConfig
from clustermesh.agent.routes import RoutingError
from clustermesh.datapath import DatapathError, pin_dir_for
from clustermesh.kube import KubeClient, KubeError
from clustermesh.kvstore import KVStoreError
from clustermesh.schema import SchemaError

log = logging.getLogger(__name__)


def run_agent(args: argparse.Namespace) -> int:
    trace.set_role(f"agent-{args.node}")
    pin_dir = args.pin_dir or str(pin_dir_for(args.node))

    def socket_lb(local_cluster_id: int) -> Any:
        from clustermesh.datapath import SocketLB  # bcc is loaded only here
        from clustermesh.datapath.loader import MapLimits

        limits = MapLimits(services=args.lb_service_map_max, backends=args.lb_backend_map_max,
                           rev_nat=args.lb_rev_nat_map_max)
        return SocketLB(args.cgroup, pin_dir, local_cluster_id, limits=limits,
                        setting_names=("--lb-service-map-max", "--lb-backend-map-max"), compile_in_child=True)

    config = AgentConfig(node=args.node, cgroup=args.cgroup, pin_dir=pin_dir, mesh_name=args.clustermesh,
                         grace_period=args.grace_period, heartbeat_timeout=args.heartbeat_timeout,
                         first_sync_wait=args.first_sync_wait,
                         routes=args.routes, route_drain=args.route_drain)
    try:
        agent = Agent(config, KubeClient(args.kubeconfig, args.context), socket_lb)
        # Served while start() waits for the ClusterMesh object: alive, and saying what it waits for.
        if args.metrics_port >= 0:
            metrics.serve(args.metrics_host, args.metrics_port, lambda: (True, json.dumps(agent.status())),
                          agent.ready)
        agent.start()
    except (KubeError, DatapathError, SchemaError, ValueError, RoutingError, KVStoreError) as exc:
        print(f"clustermesh agent: {exc}", file=sys.stderr)
        return 1
    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping; the datapath keeps its maps", signum)
        agent.request_stop()  # not stop(): the handler may run in the middle of a reconcile

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        agent.run()
    finally:
        agent.stop()
    return 0
