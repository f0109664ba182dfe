"""Typed values of the datapath: what the agent wants, and what the maps hold.

Two levels live here, both plain frozen dataclasses (no bcc, no ctypes):

- the desired state as the agent thinks of it: :class:`ServiceSpec` made of a
  :class:`Frontend`, its :class:`Backend` set and an :class:`Affinity`;
- the map contents as the kernel sees them: :class:`SlotKey` ->
  :class:`ServiceEntry` (the ``cm_svc4`` map) and backend id ->
  :class:`BackendEntry` (the ``cm_backend4`` map), gathered in :class:`MapState`.

:mod:`clustermesh.datapath.plan` turns the first into the second.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import NamedTuple

# Flag values shared with bpf/clustermesh_maps.h (the layout test checks them).
SVC_F_AFFINITY_LOCAL = 1 << 0
SVC_F_AFFINITY_REMOTE = 1 << 1
BE_F_LOCAL = 1 << 0

SLOT_MASTER = 0
MAX_SLOTS = 0xFFFF  # count and preferred are __u16
MAX_BACKEND_ID = 0xFFFFFFFF


class Proto(enum.IntEnum):
    """L4 protocol of a frontend, with the IANA numbers the kernel uses."""

    TCP = 6
    UDP = 17

    @classmethod
    def parse(cls, value: str | int | Proto) -> Proto:
        """Accept ``"TCP"``, ``"tcp"``, ``6`` or a :class:`Proto`."""
        if isinstance(value, str):
            try:
                return cls[value.upper()]
            except KeyError:
                raise ValueError(f"unsupported protocol {value!r}: use TCP or UDP") from None
        return cls(value)


class Affinity(enum.StrEnum):
    """``service.cilium.io/affinity``: which backends a node prefers."""

    NONE = "none"
    LOCAL = "local"
    REMOTE = "remote"

    @classmethod
    def parse(cls, value: str | Affinity | None) -> Affinity:
        """Missing or empty means ``none``, as in Cilium."""
        if not value:
            return cls.NONE
        try:
            return cls(str(value).lower())
        except ValueError:
            raise ValueError(f"unknown affinity {value!r}: use local, remote or none") from None

    @property
    def flags(self) -> int:
        return {
            Affinity.NONE: 0,
            Affinity.LOCAL: SVC_F_AFFINITY_LOCAL,
            Affinity.REMOTE: SVC_F_AFFINITY_REMOTE,
        }[self]

    @classmethod
    def from_flags(cls, flags: int) -> Affinity:
        if flags & SVC_F_AFFINITY_LOCAL:
            return cls.LOCAL
        if flags & SVC_F_AFFINITY_REMOTE:
            return cls.REMOTE
        return cls.NONE


IPAddress = IPv4Address | IPv6Address
_V6_TAG = 1 << 128  # added to an IPv6 address's integer: no IPv4 integer can equal it


def _ip(value: object, what: str) -> IPAddress:
    """Coerce ``value`` to an IPv4 or IPv6 address (no zone: the maps hold 4 or 16 bytes)."""
    addr = value if isinstance(value, IPv4Address | IPv6Address) else ip_address(str(value))
    if isinstance(addr, IPv6Address) and addr.scope_id:
        raise ValueError(f"{what} {addr}: a zoned IPv6 address cannot be balanced")
    return addr


def ip_key(addr: IPAddress) -> int:
    """An integer that orders and identifies ``addr`` among addresses of both
    families: IPv4 first, IPv6 after, never equal across families."""
    return int(addr) if addr.version == 4 else int(addr) | _V6_TAG


def _port(value: int, what: str) -> int:
    if not 0 < int(value) <= 0xFFFF:
        raise ValueError(f"{what} port {value} is outside 1..65535")
    return int(value)


def _u32(value: int, what: str) -> int:
    if not 0 <= int(value) <= 0xFFFFFFFF:
        raise ValueError(f"{what} {value} does not fit in 32 bits")
    return int(value)


class _OrderedByKey:
    """Ordering by ``key`` (an integer tuple): IPv4 before IPv6, and no
    IPv4Address/IPv6Address comparison, which Python refuses across families."""

    __slots__ = ()
    key: tuple[int, int, int]

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, type(self)):
            return NotImplemented
        return self.key < other.key

    def __le__(self, other: object) -> bool:
        if not isinstance(other, type(self)):
            return NotImplemented
        return self.key <= other.key

    def __gt__(self, other: object) -> bool:
        if not isinstance(other, type(self)):
            return NotImplemented
        return self.key > other.key

    def __ge__(self, other: object) -> bool:
        if not isinstance(other, type(self)):
            return NotImplemented
        return self.key >= other.key


@dataclass(frozen=True, slots=True)
class Frontend(_OrderedByKey):
    """A service address: ClusterIP, port and protocol.

    ``ip`` may be given as a string; it is stored as an :class:`IPv4Address`
    or :class:`IPv6Address` (the two families use separate maps).
    """

    ip: IPAddress
    port: int
    proto: Proto = Proto.TCP
    _hash: int = field(default=0, init=False, repr=False, compare=False)
    key: tuple[int, int, int] = field(default=(0, 0, 0), init=False, repr=False, compare=False)
    """(:func:`ip_key`, port, proto): sorts like the dataclass within a family, in C."""
    v6: bool = field(default=False, init=False, repr=False, compare=False)
    """An IPv6 frontend: its entries live in cm_svc6."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "ip", _ip(self.ip, "frontend"))
        object.__setattr__(self, "port", _port(self.port, "frontend"))
        object.__setattr__(self, "proto", Proto.parse(self.proto))
        object.__setattr__(self, "key", (ip_key(self.ip), self.port, int(self.proto)))
        object.__setattr__(self, "v6", self.ip.version == 6)
        # Frontends key every map dict; IPv4Address hashes through hex(),
        # which dominated a 10,000-service reconcile.
        object.__setattr__(self, "_hash", hash(self.key))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        # Frontends read back from a map are equal to, not the same objects
        # as, the desired ones: every dict lookup of a reconcile compares them,
        # and the generated __eq__ would go through IPv4Address.__eq__.
        if self is other:
            return True
        if not isinstance(other, Frontend):
            return NotImplemented
        return self.key == other.key

    def __str__(self) -> str:
        host = f"[{self.ip}]" if self.v6 else str(self.ip)
        return f"{host}:{self.port}/{self.proto.name}"


@dataclass(frozen=True, slots=True)
class Backend(_OrderedByKey):
    """One endpoint of a service, in some cluster of the mesh.

    Its identity (and so its backend id in the maps) is the whole triple.
    """

    ip: IPAddress
    port: int
    cluster_id: int
    key: tuple[int, int, int] = field(default=(0, 0, 0), init=False, repr=False, compare=False)
    """(:func:`ip_key`, port, cluster id): sorts like the dataclass, several times cheaper."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "ip", _ip(self.ip, "backend"))
        object.__setattr__(self, "port", _port(self.port, "backend"))
        object.__setattr__(self, "cluster_id", _u32(self.cluster_id, "cluster id"))
        object.__setattr__(self, "key", (ip_key(self.ip), self.port, self.cluster_id))

    def __hash__(self) -> int:
        return hash(self.key)

    def __str__(self) -> str:
        host = f"[{self.ip}]" if self.ip.version == 6 else str(self.ip)
        return f"{host}:{self.port}@{self.cluster_id}"


@dataclass(frozen=True)
class ServiceSpec:
    """What one frontend should balance to. Backends are a set: order and
    duplicates do not matter."""

    frontend: Frontend
    backends: frozenset[Backend] = field(default_factory=frozenset)
    affinity: Affinity = Affinity.NONE

    def __post_init__(self) -> None:
        object.__setattr__(self, "backends", frozenset(self.backends))
        object.__setattr__(self, "affinity", Affinity.parse(self.affinity))


# --- map level ---------------------------------------------------------------


class SlotKey(NamedTuple):
    """Key of the ``cm_svc4`` map (C: ``struct cm_svc4_key``).

    A NamedTuple rather than a frozen dataclass, as is :class:`ServiceEntry`:
    100,000 services make a million of each per reconcile, and a tuple is
    built, hashed and compared in C (three times faster to build).
    """

    frontend: Frontend
    slot: int = SLOT_MASTER

    @property
    def order(self) -> tuple[tuple[int, int, int], int]:
        """Sort key equal to the natural order, without IPv4Address comparisons."""
        return self.frontend.key, self.slot

    @property
    def is_master(self) -> bool:
        return self.slot == SLOT_MASTER


class ServiceEntry(NamedTuple):
    """Value of the ``cm_svc4`` map (C: ``struct cm_svc_val``).

    A master entry (slot 0) carries ``count``, ``preferred`` and ``flags``; a
    slot entry carries only ``backend_id``.
    """

    backend_id: int = 0
    count: int = 0  # type: ignore[assignment]  # shadows tuple.count, as the C field is named
    preferred: int = 0
    flags: int = 0

    @classmethod
    def master(cls, count: int, preferred: int, flags: int = 0) -> ServiceEntry:
        return cls(0, count, preferred, flags)

    @classmethod
    def slot(cls, backend_id: int) -> ServiceEntry:
        return cls(backend_id)


@dataclass(frozen=True, slots=True)
class BackendEntry:
    """Value of the ``cm_backend4`` map (C: ``struct cm_backend4``), or of
    ``cm_backend6`` for an IPv6 ``ip``."""

    ip: IPAddress
    port: int
    cluster_id: int
    flags: int = 0

    @property
    def backend(self) -> Backend:
        return Backend(self.ip, self.port, self.cluster_id)

    @property
    def key(self) -> tuple[int, int, int]:
        """The :attr:`Backend.key` of the backend this entry describes."""
        return ip_key(self.ip), self.port, self.cluster_id

    def __eq__(self, other: object) -> bool:
        # A no-change reconcile compares every backend read from the map with
        # the desired one (a million at 100,000 services): compare integers.
        if not isinstance(other, BackendEntry):
            return NotImplemented
        return (self.key, self.flags) == (other.key, other.flags)

    def __hash__(self) -> int:
        return hash((self.key, self.flags))

    @property
    def is_local(self) -> bool:
        return bool(self.flags & BE_F_LOCAL)


@dataclass
class MapState:
    """The contents of the service and backend maps, as plain dicts."""

    services: dict[SlotKey, ServiceEntry] = field(default_factory=dict)
    backends: dict[int, BackendEntry] = field(default_factory=dict)
