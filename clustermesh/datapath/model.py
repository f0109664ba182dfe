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
from ipaddress import IPv4Address, ip_address

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


def _ipv4(value: object, what: str) -> IPv4Address:
    """Coerce ``value`` to an IPv4 address; IPv6 gets a message of its own."""
    addr = value if isinstance(value, IPv4Address) else ip_address(str(value))
    if not isinstance(addr, IPv4Address):
        raise ValueError(f"{what} {addr}: IPv6 is not supported by the datapath yet")
    return addr


def _port(value: int, what: str) -> int:
    if not 0 < int(value) <= 0xFFFF:
        raise ValueError(f"{what} port {value} is outside 1..65535")
    return int(value)


def _u32(value: int, what: str) -> int:
    if not 0 <= int(value) <= 0xFFFFFFFF:
        raise ValueError(f"{what} {value} does not fit in 32 bits")
    return int(value)


@dataclass(frozen=True, order=True, slots=True)
class Frontend:
    """A service address: ClusterIP, port and protocol.

    ``ip`` may be given as a string; it is stored as an :class:`IPv4Address`.
    """

    ip: IPv4Address
    port: int
    proto: Proto = Proto.TCP
    _hash: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ip", _ipv4(self.ip, "frontend"))
        object.__setattr__(self, "port", _port(self.port, "frontend"))
        object.__setattr__(self, "proto", Proto.parse(self.proto))
        # Frontends key every map dict; IPv4Address hashes through hex(),
        # which dominated a 10,000-service reconcile.
        object.__setattr__(self, "_hash", hash((int(self.ip), self.port, int(self.proto))))

    def __hash__(self) -> int:
        return self._hash

    def __str__(self) -> str:
        return f"{self.ip}:{self.port}/{self.proto.name}"


@dataclass(frozen=True, order=True, slots=True)
class Backend:
    """One endpoint of a service, in some cluster of the mesh.

    Its identity (and so its backend id in the maps) is the whole triple.
    """

    ip: IPv4Address
    port: int
    cluster_id: int
    key: tuple[int, int, int] = field(default=(0, 0, 0), init=False, repr=False, compare=False)
    """(int ip, port, cluster id): sorts like the dataclass, several times cheaper."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "ip", _ipv4(self.ip, "backend"))
        object.__setattr__(self, "port", _port(self.port, "backend"))
        object.__setattr__(self, "cluster_id", _u32(self.cluster_id, "cluster id"))
        object.__setattr__(self, "key", (int(self.ip), self.port, self.cluster_id))

    def __hash__(self) -> int:
        return hash(self.key)

    def __str__(self) -> str:
        return f"{self.ip}:{self.port}@{self.cluster_id}"


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


@dataclass(frozen=True, order=True, slots=True)
class SlotKey:
    """Key of the ``cm_svc4`` map (C: ``struct cm_svc4_key``)."""

    frontend: Frontend
    slot: int = SLOT_MASTER

    @property
    def is_master(self) -> bool:
        return self.slot == SLOT_MASTER


@dataclass(frozen=True, slots=True)
class ServiceEntry:
    """Value of the ``cm_svc4`` map (C: ``struct cm_svc_val``).

    A master entry (slot 0) carries ``count``, ``preferred`` and ``flags``; a
    slot entry carries only ``backend_id``.
    """

    backend_id: int = 0
    count: int = 0
    preferred: int = 0
    flags: int = 0

    @classmethod
    def master(cls, count: int, preferred: int, flags: int = 0) -> ServiceEntry:
        return cls(backend_id=0, count=count, preferred=preferred, flags=flags)

    @classmethod
    def slot(cls, backend_id: int) -> ServiceEntry:
        return cls(backend_id=backend_id)


@dataclass(frozen=True, slots=True)
class BackendEntry:
    """Value of the ``cm_backend4`` map (C: ``struct cm_backend4``)."""

    ip: IPv4Address
    port: int
    cluster_id: int
    flags: int = 0

    @property
    def backend(self) -> Backend:
        return Backend(self.ip, self.port, self.cluster_id)

    @property
    def key(self) -> tuple[int, int, int]:
        """The :attr:`Backend.key` of the backend this entry describes."""
        return int(self.ip), self.port, self.cluster_id

    @property
    def is_local(self) -> bool:
        return bool(self.flags & BE_F_LOCAL)


@dataclass
class MapState:
    """The contents of the service and backend maps, as plain dicts."""

    services: dict[SlotKey, ServiceEntry] = field(default_factory=dict)
    backends: dict[int, BackendEntry] = field(default_factory=dict)
