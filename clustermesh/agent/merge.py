"""The agent's merge: store records of every cluster -> what the datapath balances to.

Pure: ``ClusterService`` records in, :class:`~clustermesh.datapath.ServiceSpec`
out. The rules are Cilium's: a Service that is global in *this* cluster gets,
for each of its frontends (ClusterIP and port), the backends of every cluster
that exports the same namespace/name with ``shared``, matched by port name
and protocol. Remote records never add frontends: the local Service decides
what is load-balanced here. IPv6 and dual-stack Services work the same way:
each frontend takes the backends of its own address family.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from clustermesh.cluster.export import (
    LEGACY_SHARED_ANNOTATION,
    SHARED_ANNOTATION,
    ClusterIdentity,
    affinity,
    export_service,
)
from clustermesh.datapath.model import Affinity, Backend, Frontend, Proto, ServiceSpec
from clustermesh.schema import WILDCARD_PROTOCOLS, ClusterService, PortConfig, PortsByIP

SHARED_ANNOTATIONS = (SHARED_ANNOTATION, LEGACY_SHARED_ANNOTATION)

DATAPATH_PROTOCOLS = ("TCP", "UDP")  # SCTP is exported but not load-balanced yet


def frontend_protocols(pc: PortConfig) -> tuple[str, ...]:
    """The datapath protocols a port config asks for. Cilium stores ANY and NONE
    as protocol 0, which its maps match for every protocol; our maps key on the
    protocol, so a wildcard becomes one TCP and one UDP frontend."""
    if pc.protocol in WILDCARD_PROTOCOLS:
        return DATAPATH_PROTOCOLS
    return (pc.protocol,) if pc.protocol in DATAPATH_PROTOCOLS else ()


def _protocol_matches(backend: PortConfig, protocol: str) -> bool:
    return backend.protocol == protocol or backend.protocol in WILDCARD_PROTOCOLS


@dataclass(frozen=True)
class LocalService:
    """A global Service of this cluster as the agent sees it locally.

    ``backends`` are this cluster's ready endpoints, whether or not the Service
    shares them (``shared: false`` still serves its own cluster)."""

    namespace: str
    name: str
    frontends: PortsByIP
    backends: PortsByIP = field(default_factory=dict)
    affinity: Affinity = Affinity.NONE


@dataclass
class MergeResult:
    specs: list[ServiceSpec]
    problems: list[str] = field(default_factory=list)


def _backends_for(
    port_name: str, protocol: str, ports_by_ip: PortsByIP, cluster_id: int, problems: list[str], source: str,
    exclude: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network] = (), family: int = 4,
) -> set[Backend]:
    out = set()
    for ip, by_name in ports_by_ip.items():
        pc = by_name.get(port_name)
        if pc is None or not _protocol_matches(pc, protocol):
            continue
        addr = ipaddress.ip_address(ip)
        if addr.version != family:
            # A dual-stack Service has endpoints of both families; a socket is
            # rewritten within its own family, so each frontend takes its own.
            continue
        if any(addr in net for net in exclude):
            # Same address as a local pod: traffic would land on the wrong pod.
            problems.append(f"{source}: backend {ip} is inside this cluster's pod CIDRs; not used")
            continue
        out.add(Backend(addr, pc.port, cluster_id))
    return out


def merge_service(
    local_cluster_id: int,
    local: LocalService,
    remotes: Iterable[ClusterService],
    exclude_remote_cidrs: Iterable[str] = (),
) -> MergeResult:
    """One local global Service + the remote records of the same namespace/name."""
    problems: list[str] = []
    exclude = [ipaddress.ip_network(c, strict=False) for c in exclude_remote_cidrs]
    shared_remotes = []
    for rec in remotes:
        if (rec.namespace, rec.name) != (local.namespace, local.name):
            continue
        if rec.cluster_id == local_cluster_id:
            problems.append(f"cluster {rec.cluster} uses this cluster's ID {local_cluster_id}; ignored")
            continue
        if rec.shared:
            shared_remotes.append(rec)
    by_frontend: dict[Frontend, set[Backend]] = {}
    for ip, by_name in local.frontends.items():
        addr = ipaddress.ip_address(ip)
        for port_name, pc in by_name.items():
            protocols = frontend_protocols(pc)
            if not protocols:
                problems.append(f"{ip}:{pc.port}/{pc.protocol}: protocol not load-balanced yet")
                continue
            where = f"{local.namespace}/{local.name}"
            for protocol in protocols:
                backends = _backends_for(port_name, protocol, local.backends, local_cluster_id, problems, where,
                                         family=addr.version)
                for rec in shared_remotes:
                    backends |= _backends_for(port_name, protocol, rec.backends, rec.cluster_id, problems,
                                              f"{where} from {rec.cluster}", exclude, family=addr.version)
                frontend = Frontend(addr, pc.port, Proto.parse(protocol))
                # A wildcard port may land on a frontend that an explicit port already asked for:
                # one frontend, the backends of both (the datapath holds one entry per frontend).
                by_frontend.setdefault(frontend, set()).update(backends)
    specs = [ServiceSpec(frontend, frozenset(backends), local.affinity) for frontend, backends in by_frontend.items()]
    return MergeResult(specs, problems)


def merge(
    local_cluster_id: int,
    local_services: Mapping[tuple[str, str], LocalService],
    remote_records: Iterable[ClusterService],
    exclude_remote_cidrs: Iterable[str] = (),
) -> MergeResult:
    """Every local global Service merged with every remote record: the datapath's desired state."""
    by_service: dict[tuple[str, str], list[ClusterService]] = {}
    for rec in remote_records:
        by_service.setdefault((rec.namespace, rec.name), []).append(rec)
    result = MergeResult([])
    for ref, local in sorted(local_services.items()):
        one = merge_service(local_cluster_id, local, by_service.get(ref, ()), exclude_remote_cidrs)
        result.specs += one.specs
        result.problems += one.problems
    return result


def local_service(identity: ClusterIdentity, service: Mapping[str, Any], slices: Iterable[Mapping[str, Any]]) -> (
    LocalService | None
):
    """A local Service (Kubernetes dict) as the merge needs it, or None when it is not
    global. Its own backends count here even when it does not share them."""
    meta = service.get("metadata") or {}
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if k not in SHARED_ANNOTATIONS}
    unshared_view = {**service, "metadata": {**meta, "annotations": annotations}}
    result = export_service(identity, unshared_view, slices)
    if result.record is None:
        return None
    aff, _problem = affinity(service)
    return LocalService(result.record.namespace, result.record.name, result.record.frontends,
                        result.record.backends, Affinity.parse(aff))
