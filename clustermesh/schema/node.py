"""``Node`` at ``cilium/state/nodes/v1/<cluster>/<node>``: Cilium's Go field names, addresses and pod
CIDRs (primary and secondary, IPv4 and IPv6), every other field kept as it came. Pure."""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from clustermesh.schema.core import (
    MAX_CLUSTER_ID,
    SchemaError,
    _decode_object,
    _str,
    _validate_ip,
    _validate_object_name,
    encode,
    node_key,
    parse_node_key,
    validate_cluster_id,
    validate_cluster_name,
)


@dataclass(frozen=True)
class NodeAddress:
    type: str  # "InternalIP", "ExternalIP", "CiliumInternalIP"
    ip: str


# Node fields this module reads; every other field of Cilium's Node (health and
# ingress IPs, Source, EncryptionKey, Labels, NodeIdentity, ...) is kept as is.
_NODE_FIELDS = (
    "Name", "Cluster", "ClusterID", "IPAddresses",
    "IPv4AllocCIDR", "IPv6AllocCIDR", "IPv4SecondaryAllocCIDRs", "IPv6SecondaryAllocCIDRs",
)


@dataclass(frozen=True)
class Node:
    """A node of a cluster: its addresses and pod CIDRs, in Cilium's Go field names."""

    name: str
    cluster: str
    cluster_id: int
    addresses: tuple[NodeAddress, ...] = ()
    ipv4_pod_cidr: str | None = None
    ipv6_pod_cidr: str | None = None
    # Cilium's IPv4SecondaryAllocCIDRs / IPv6SecondaryAllocCIDRs (multi-pool IPAM, ENI, ...)
    ipv4_secondary_pod_cidrs: tuple[str, ...] = ()
    ipv6_secondary_pod_cidrs: tuple[str, ...] = ()
    # The rest of a Cilium-written record, verbatim, so that it re-encodes unchanged.
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def key(self) -> str:
        return node_key(self.cluster, self.name)

    def internal_ipv4(self) -> str | None:
        for addr in self.addresses:
            if addr.type == "InternalIP" and ipaddress.ip_address(addr.ip).version == 4:
                return addr.ip
        return None

    def ipv4_pod_cidrs(self) -> tuple[str, ...]:
        """Primary first, then the secondary ones."""
        primary = (self.ipv4_pod_cidr,) if self.ipv4_pod_cidr else ()
        return (*primary, *self.ipv4_secondary_pod_cidrs)

    def validate(self, max_cluster_id: int = MAX_CLUSTER_ID) -> Node:
        validate_cluster_name(self.cluster)
        validate_cluster_id(self.cluster_id, max_cluster_id)
        _validate_object_name("node name", self.name)
        for addr in self.addresses:
            _str("address type", addr.type)
            _validate_ip(addr.ip)
        cidrs = [(self.ipv4_pod_cidr, 4), (self.ipv6_pod_cidr, 6)]
        cidrs += [(c, 4) for c in self.ipv4_secondary_pod_cidrs] + [(c, 6) for c in self.ipv6_secondary_pod_cidrs]
        for cidr, version in cidrs:
            if cidr is not None:
                _canonical_cidr(cidr, version)
        return self

    def to_json(self) -> dict[str, Any]:
        data = dict(self.extra)
        data.update({
            "Name": self.name,
            "Cluster": self.cluster,
            "ClusterID": self.cluster_id,
            "IPAddresses": [{"Type": a.type, "IP": a.ip} for a in self.addresses],
            "IPv4AllocCIDR": _ipnet_to_go(self.ipv4_pod_cidr),
            "IPv6AllocCIDR": _ipnet_to_go(self.ipv6_pod_cidr),
        })
        # Go writes null for a nil slice; keep an empty list written by a Cilium agent as it was.
        for name, cidrs in (("IPv4SecondaryAllocCIDRs", self.ipv4_secondary_pod_cidrs),
                            ("IPv6SecondaryAllocCIDRs", self.ipv6_secondary_pod_cidrs)):
            if cidrs:
                data[name] = [_ipnet_to_go(c) for c in cidrs]
        return data

    def encode(self) -> str:
        return encode(self.to_json())

    @classmethod
    def decode(cls, raw: str | bytes, key: str | None = None, *, max_cluster_id: int = MAX_CLUSTER_ID) -> Node:
        data = _decode_object(raw)
        addrs = data.get("IPAddresses")
        if addrs is None:
            addrs = []
        if not isinstance(addrs, list):
            raise SchemaError(f"IPAddresses must be a list, got {addrs!r}")
        addresses = []
        for a in addrs:
            if not isinstance(a, dict):
                raise SchemaError(f"IPAddresses entries must be objects like {{\"Type\": ..., \"IP\": ...}}, got {a!r}")
            addresses.append(NodeAddress(type=_str("IPAddresses[].Type", a.get("Type", "")),
                                         ip=_validate_ip(a.get("IP"))))
        extra = {k: v for k, v in data.items() if k not in _NODE_FIELDS}
        for name in ("IPv4SecondaryAllocCIDRs", "IPv6SecondaryAllocCIDRs"):
            if name in data and not data[name]:
                extra[name] = data[name]  # null or [] as written; to_json writes non-empty lists itself
        node = cls(
            name=_str("node name", data.get("Name", "")),
            cluster=_str("cluster name", data.get("Cluster", "")),
            cluster_id=data.get("ClusterID", 0),
            addresses=tuple(addresses),
            ipv4_pod_cidr=_ipnet_from_go("IPv4AllocCIDR", data.get("IPv4AllocCIDR")),
            ipv6_pod_cidr=_ipnet_from_go("IPv6AllocCIDR", data.get("IPv6AllocCIDR")),
            ipv4_secondary_pod_cidrs=_ipnets_from_go("IPv4SecondaryAllocCIDRs", data.get("IPv4SecondaryAllocCIDRs")),
            ipv6_secondary_pod_cidrs=_ipnets_from_go("IPv6SecondaryAllocCIDRs", data.get("IPv6SecondaryAllocCIDRs")),
            extra=extra,
        ).validate(max_cluster_id)
        if key is not None and parse_node_key(key) != (node.cluster, node.name):
            raise SchemaError(f"key {key!r} does not match payload {node.cluster}/{node.name}")
        return node


def _canonical_cidr(cidr: str, version: int) -> str:
    """A CIDR with no host bits set, of the given IP version, in canonical text."""
    if not isinstance(cidr, str):
        raise SchemaError(f"pod CIDR must be a string, got {cidr!r}")
    if "%" in cidr:
        raise SchemaError(f"pod CIDR {cidr!r}: IPv6 zones are not supported in records")
    try:
        net = ipaddress.ip_network(cidr)
    except ValueError as exc:
        raise SchemaError(f"pod CIDR {cidr!r} is not a canonical CIDR (no host bits set): {exc}") from exc
    if net.version != version:
        raise SchemaError(f"pod CIDR {cidr!r} is not IPv{version}")
    return str(net)


def _ipnet_to_go(cidr: str | None) -> dict[str, str] | None:
    """Go's net.IPNet marshals as {"IP": "...", "Mask": base64(mask bytes)}; Cilium still writes this form."""
    if cidr is None:
        return None
    net = ipaddress.ip_network(cidr)
    return {
        "IP": str(net.network_address),
        "Mask": base64.b64encode(net.netmask.packed).decode("ascii"),
    }


def _ipnet_from_go(what: str, data: object) -> str | None:
    """Both forms Cilium reads: the string "10.244.1.0/24" and Go's {"IP", "Mask"} object.

    Stricter than Cilium on one point: a CIDR with host bits set is refused
    rather than silently masked, since it means the writer is confused.
    """
    if data is None:
        return None
    if isinstance(data, str):
        try:
            net = ipaddress.ip_network(data)
        except ValueError as exc:
            raise SchemaError(f"{what} {data!r} is not a canonical CIDR (no host bits set): {exc}") from exc
        return str(net)
    if not isinstance(data, dict):
        raise SchemaError(f"{what} must be a CIDR string or an object with IP and Mask, got {data!r}")
    ip_text, mask_text = data.get("IP"), data.get("Mask")
    if not isinstance(ip_text, str) or not isinstance(mask_text, str):
        raise SchemaError(f"{what}: IP and Mask must be strings (Mask is base64), got {data!r}")
    ip = ipaddress.ip_address(_validate_ip(ip_text))
    try:
        mask = base64.b64decode(mask_text, validate=True)
    except ValueError as exc:
        raise SchemaError(f"{what}: Mask {mask_text!r} is not base64") from exc
    width = 4 if ip.version == 4 else 16
    if len(mask) != width:
        raise SchemaError(f"{what}: a {len(mask)}-byte Mask does not fit IPv{ip.version} {ip} (want {width} bytes)")
    bits = int.from_bytes(mask, "big")
    prefix = bits.bit_count()
    # Canonical masks are ones then zeros, which is what Go's IPMask.Size() requires too.
    if bits != ((1 << (8 * width)) - 1) ^ ((1 << (8 * width - prefix)) - 1):
        raise SchemaError(f"{what}: Mask {mask_text!r} is not a canonical (contiguous) mask")
    try:
        return str(ipaddress.ip_network(f"{ip}/{prefix}"))
    except ValueError as exc:
        raise SchemaError(f"{what} {ip}/{prefix} has host bits set; want the network address") from exc


def _ipnets_from_go(what: str, data: object) -> tuple[str, ...]:
    if data is None:
        return ()
    if not isinstance(data, list):
        raise SchemaError(f"{what} must be a list of CIDRs, got {data!r}")
    out = []
    for item in data:
        cidr = _ipnet_from_go(f"{what}[]", item)
        if cidr is not None:
            out.append(cidr)
    return tuple(out)
