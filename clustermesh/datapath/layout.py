"""ctypes mirrors of bpf/clustermesh_maps.h, and codecs to the model types.

Each Structure names its C twin; tests/unit/test_datapath_layout.py compiles the
header and fails when a size or an offset differs. Big-endian (``__be*``)
fields are kept as the integer whose in-memory bytes are in network order,
which is what the BPF programs compare against ``ctx->user_ip4``/``user_port``.
"""

from __future__ import annotations

import ctypes
import socket
import struct
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv6Address
from typing import Generic, TypeAlias, TypeVar

from clustermesh.datapath.model import BackendEntry, Frontend, Proto, ServiceEntry, SlotKey

# Map names, also the file names of their pins in the pin directory.
SVC4_MAP = "cm_svc4"
BACKEND4_MAP = "cm_backend4"
REV4_MAP = "cm_rev4"
SVC6_MAP = "cm_svc6"
BACKEND6_MAP = "cm_backend6"
REV6_MAP = "cm_rev6"

# Defaults of the CM_*_MAX macros in the header.
SVC4_MAX = 262144
BACKEND4_MAX = 131072
REV4_MAX = 131072

# Header constants mirrored in clustermesh.datapath.model (checked by the layout test).
HEADER_CONSTANTS = {
    "CM_SLOT_MASTER": 0,
    "CM_SVC_F_AFFINITY_LOCAL": 1 << 0,
    "CM_SVC_F_AFFINITY_REMOTE": 1 << 1,
    "CM_BE_F_LOCAL": 1 << 0,
    "CM_SVC4_MAX": SVC4_MAX,
    "CM_BACKEND4_MAX": BACKEND4_MAX,
    "CM_REV4_MAX": REV4_MAX,
    "CM_SVC6_MAX": SVC4_MAX,
    "CM_BACKEND6_MAX": BACKEND4_MAX,
    "CM_REV6_MAX": REV4_MAX,
}


class Svc4Key(ctypes.Structure):
    """Mirror of ``struct cm_svc4_key``."""

    _fields_ = (
        ("addr", ctypes.c_uint32),
        ("port", ctypes.c_uint16),
        ("slot", ctypes.c_uint16),
        ("proto", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
    )


class Svc6Key(ctypes.Structure):
    """Mirror of ``struct cm_svc6_key``."""

    _fields_ = (
        ("addr", ctypes.c_uint8 * 16),
        ("port", ctypes.c_uint16),
        ("slot", ctypes.c_uint16),
        ("proto", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
    )


class SvcVal(ctypes.Structure):
    """Mirror of ``struct cm_svc_val``."""

    _fields_ = (
        ("backend_id", ctypes.c_uint32),
        ("count", ctypes.c_uint16),
        ("preferred", ctypes.c_uint16),
        ("flags", ctypes.c_uint32),
    )


class Backend4(ctypes.Structure):
    """Mirror of ``struct cm_backend4``."""

    _fields_ = (
        ("addr", ctypes.c_uint32),
        ("port", ctypes.c_uint16),
        ("flags", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
        ("cluster_id", ctypes.c_uint32),
    )


class Backend6(ctypes.Structure):
    """Mirror of ``struct cm_backend6``."""

    _fields_ = (
        ("addr", ctypes.c_uint8 * 16),
        ("port", ctypes.c_uint16),
        ("flags", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
        ("cluster_id", ctypes.c_uint32),
    )


class Rev4Key(ctypes.Structure):
    """Mirror of ``struct cm_rev4_key``."""

    _fields_ = (
        ("cookie", ctypes.c_uint64),
        ("addr", ctypes.c_uint32),
        ("port", ctypes.c_uint16),
        ("pad", ctypes.c_uint16),
    )


class Rev4Val(ctypes.Structure):
    """Mirror of ``struct cm_rev4_val``."""

    _fields_ = (
        ("addr", ctypes.c_uint32),
        ("port", ctypes.c_uint16),
        ("pad", ctypes.c_uint16),
    )


class Rev6Key(ctypes.Structure):
    """Mirror of ``struct cm_rev6_key``."""

    _fields_ = (
        ("cookie", ctypes.c_uint64),
        ("addr", ctypes.c_uint8 * 16),
        ("port", ctypes.c_uint16),
        ("pad", ctypes.c_uint16 * 3),
    )


class Rev6Val(ctypes.Structure):
    """Mirror of ``struct cm_rev6_val``."""

    _fields_ = (
        ("addr", ctypes.c_uint8 * 16),
        ("port", ctypes.c_uint16),
        ("pad", ctypes.c_uint16),
    )


# C struct name -> its mirror; the layout test walks this table.
MIRRORS: dict[str, type[ctypes.Structure]] = {
    "cm_svc4_key": Svc4Key,
    "cm_svc6_key": Svc6Key,
    "cm_svc_val": SvcVal,
    "cm_backend4": Backend4,
    "cm_backend6": Backend6,
    "cm_rev4_key": Rev4Key,
    "cm_rev4_val": Rev4Val,
    "cm_rev6_key": Rev6Key,
    "cm_rev6_val": Rev6Val,
}


# --- byte order ------------------------------------------------------------------


def be32(addr: IPv4Address | IPv6Address) -> int:
    """The __be32 field value for ``addr`` (IPv4 only: the caller routed it to a v4 map)."""
    if addr.version != 4:
        raise ValueError(f"{addr} is IPv6: it belongs in an IPv6 map")
    return int(struct.unpack("=I", addr.packed)[0])


def from_be32(value: int) -> IPv4Address:
    return IPv4Address(struct.pack("=I", value))


def be16(port: int) -> int:
    return socket.htons(port)


def from_be16(value: int) -> int:
    return socket.ntohs(value)


# --- codecs -------------------------------------------------------------------------

K = TypeVar("K")
V = TypeVar("V")
CKey: TypeAlias = ctypes.Structure | ctypes.c_uint32


class Codec(Generic[K, V]):
    """How one BPF map's keys and values look in C and in Python."""

    name: str
    key_type: type[CKey]
    value_type: type[ctypes.Structure]

    def encode_key(self, key: K) -> CKey:
        raise NotImplementedError

    def decode_key(self, raw: CKey | int) -> K:
        raise NotImplementedError

    def encode_value(self, value: V) -> ctypes.Structure:
        raise NotImplementedError

    def decode_value(self, raw: ctypes.Structure) -> V:
        raise NotImplementedError

    # Bulk encoding for batch syscalls: the keys (values) back to back, as an
    # array of the C struct. Codecs of the maps the agent writes override these
    # with struct.pack_into, several times faster than a ctypes object per entry
    # (a million entries at 100,000 services); test_datapath_layout checks that
    # both ways give the same bytes.

    def pack_keys(self, keys: Sequence[K]) -> bytes:
        return b"".join(bytes(self.encode_key(k)) for k in keys)

    def pack_values(self, values: Sequence[V]) -> bytes:
        return b"".join(bytes(self.encode_value(v)) for v in values)


_SVC_KEY = struct.Struct("=IHHB3x")  # struct cm_svc4_key, addr and port already in network order
_SVC_VAL = struct.Struct("=IHHI")  # struct cm_svc_val
_BACKEND_KEY = struct.Struct("=I")
_BACKEND_VAL = struct.Struct("=4sHBxI")  # struct cm_backend4
_SVC6_KEY = struct.Struct("=16sHHB3x")  # struct cm_svc6_key
_BACKEND6_VAL = struct.Struct("=16sHBxI")  # struct cm_backend6


class ServiceCodec(Codec[SlotKey, ServiceEntry]):
    name = SVC4_MAP
    key_type = Svc4Key
    value_type = SvcVal

    _CACHE_MAX = 1 << 18

    def __init__(self) -> None:
        # A service has 1 + count keys sharing one frontend: building (and
        # validating) it once per map read instead of once per key halves
        # the time to read a big map.
        self._frontends: dict[tuple[int, int, int], Frontend] = {}

    def _frontend(self, addr: int, port: int, proto: int) -> Frontend:
        raw = (addr, port, proto)
        frontend = self._frontends.get(raw)
        if frontend is None:
            if len(self._frontends) >= self._CACHE_MAX:
                self._frontends.clear()
            frontend = Frontend(from_be32(addr), from_be16(port), Proto(proto))
            self._frontends[raw] = frontend
        return frontend

    def encode_key(self, key: SlotKey) -> Svc4Key:
        fe = key.frontend
        return Svc4Key(addr=be32(fe.ip), port=be16(fe.port), slot=key.slot, proto=int(fe.proto))

    def decode_key(self, raw: CKey | int) -> SlotKey:
        assert isinstance(raw, Svc4Key)
        return SlotKey(self._frontend(raw.addr, raw.port, raw.proto), raw.slot)

    def encode_value(self, value: ServiceEntry) -> SvcVal:
        return SvcVal(
            backend_id=value.backend_id, count=value.count, preferred=value.preferred, flags=value.flags
        )

    def decode_value(self, raw: ctypes.Structure) -> ServiceEntry:
        assert isinstance(raw, SvcVal)
        return ServiceEntry(raw.backend_id, raw.count, raw.preferred, raw.flags)

    def pack_keys(self, keys: Sequence[SlotKey]) -> bytes:
        out = bytearray(_SVC_KEY.size * len(keys))
        wire: dict[Frontend, tuple[int, int, int]] = {}  # a frontend has 1 + count keys
        pack, size = _SVC_KEY.pack_into, _SVC_KEY.size
        for i, key in enumerate(keys):
            fe = key.frontend
            raw = wire.get(fe)
            if raw is None:
                raw = wire[fe] = (be32(fe.ip), be16(fe.port), int(fe.proto))
            pack(out, i * size, raw[0], raw[1], key.slot, raw[2])
        return bytes(out)

    def pack_values(self, values: Sequence[ServiceEntry]) -> bytes:
        out = bytearray(_SVC_VAL.size * len(values))
        pack, size = _SVC_VAL.pack_into, _SVC_VAL.size
        for i, v in enumerate(values):
            pack(out, i * size, v.backend_id, v.count, v.preferred, v.flags)
        return bytes(out)


class BackendCodec(Codec[int, BackendEntry]):
    name = BACKEND4_MAP
    key_type = ctypes.c_uint32
    value_type = Backend4

    def encode_key(self, key: int) -> ctypes.c_uint32:
        return ctypes.c_uint32(key)

    def decode_key(self, raw: CKey | int) -> int:
        # ctypes hands out array elements of c_uint32 as plain ints.
        if isinstance(raw, int):
            return raw
        assert isinstance(raw, ctypes.c_uint32)
        return int(raw.value)

    def encode_value(self, value: BackendEntry) -> Backend4:
        return Backend4(
            addr=be32(value.ip), port=be16(value.port), flags=value.flags, cluster_id=value.cluster_id
        )

    def decode_value(self, raw: ctypes.Structure) -> BackendEntry:
        assert isinstance(raw, Backend4)
        return BackendEntry(from_be32(raw.addr), from_be16(raw.port), raw.cluster_id, raw.flags)

    def pack_keys(self, keys: Sequence[int]) -> bytes:
        out = bytearray(_BACKEND_KEY.size * len(keys))
        for i, key in enumerate(keys):
            _BACKEND_KEY.pack_into(out, i * _BACKEND_KEY.size, key)
        return bytes(out)

    def pack_values(self, values: Sequence[BackendEntry]) -> bytes:
        out = bytearray(_BACKEND_VAL.size * len(values))
        pack, size, htons = _BACKEND_VAL.pack_into, _BACKEND_VAL.size, socket.htons
        for i, v in enumerate(values):
            pack(out, i * size, v.ip.packed, htons(v.port), v.flags, v.cluster_id)
        return bytes(out)


class Rev4Codec(Codec[tuple[int, IPv4Address, int], tuple[IPv4Address, int]]):
    """cm_rev4: (socket cookie, backend ip, backend port) -> (ClusterIP, port)."""

    name = REV4_MAP
    key_type = Rev4Key
    value_type = Rev4Val

    def encode_key(self, key: tuple[int, IPv4Address, int]) -> Rev4Key:
        cookie, ip, port = key
        return Rev4Key(cookie=cookie, addr=be32(ip), port=be16(port))

    def decode_key(self, raw: CKey | int) -> tuple[int, IPv4Address, int]:
        assert isinstance(raw, Rev4Key)
        return int(raw.cookie), from_be32(raw.addr), from_be16(raw.port)

    def encode_value(self, value: tuple[IPv4Address, int]) -> Rev4Val:
        ip, port = value
        return Rev4Val(addr=be32(ip), port=be16(port))

    def decode_value(self, raw: ctypes.Structure) -> tuple[IPv4Address, int]:
        assert isinstance(raw, Rev4Val)
        return from_be32(raw.addr), from_be16(raw.port)


SERVICE_CODEC = ServiceCodec()
BACKEND_CODEC = BackendCodec()
REV4_CODEC = Rev4Codec()


# --- IPv6 ---------------------------------------------------------------------------------


def _ip6(raw: ctypes.Array[ctypes.c_uint8]) -> IPv6Address:
    return IPv6Address(bytes(raw))


def _u8x16(addr: IPv4Address | IPv6Address) -> ctypes.Array[ctypes.c_uint8]:
    return (ctypes.c_uint8 * 16).from_buffer_copy(addr.packed)


class Service6Codec(Codec[SlotKey, ServiceEntry]):
    """cm_svc6: the IPv6 frontends' slots; values as in cm_svc4."""

    name = SVC6_MAP
    key_type = Svc6Key
    value_type = SvcVal

    def __init__(self) -> None:
        self._frontends: dict[tuple[bytes, int, int], Frontend] = {}

    def encode_key(self, key: SlotKey) -> Svc6Key:
        fe = key.frontend
        return Svc6Key(addr=_u8x16(fe.ip), port=be16(fe.port), slot=key.slot, proto=int(fe.proto))

    def decode_key(self, raw: CKey | int) -> SlotKey:
        assert isinstance(raw, Svc6Key)
        wire = (bytes(raw.addr), raw.port, raw.proto)
        frontend = self._frontends.get(wire)
        if frontend is None:
            if len(self._frontends) >= ServiceCodec._CACHE_MAX:
                self._frontends.clear()
            frontend = self._frontends[wire] = Frontend(IPv6Address(wire[0]), from_be16(raw.port), Proto(raw.proto))
        return SlotKey(frontend, raw.slot)

    def encode_value(self, value: ServiceEntry) -> SvcVal:
        return SERVICE_CODEC.encode_value(value)

    def decode_value(self, raw: ctypes.Structure) -> ServiceEntry:
        return SERVICE_CODEC.decode_value(raw)

    def pack_keys(self, keys: Sequence[SlotKey]) -> bytes:
        out = bytearray(_SVC6_KEY.size * len(keys))
        for i, key in enumerate(keys):
            fe = key.frontend
            _SVC6_KEY.pack_into(out, i * _SVC6_KEY.size, fe.ip.packed, be16(fe.port), key.slot, int(fe.proto))
        return bytes(out)

    def pack_values(self, values: Sequence[ServiceEntry]) -> bytes:
        return SERVICE_CODEC.pack_values(values)


class Backend6Codec(Codec[int, BackendEntry]):
    """cm_backend6: backend id -> IPv6 backend (ids are shared with cm_backend4)."""

    name = BACKEND6_MAP
    key_type = ctypes.c_uint32
    value_type = Backend6

    def encode_key(self, key: int) -> ctypes.c_uint32:
        return ctypes.c_uint32(key)

    def decode_key(self, raw: CKey | int) -> int:
        return BACKEND_CODEC.decode_key(raw)

    def encode_value(self, value: BackendEntry) -> Backend6:
        return Backend6(addr=_u8x16(value.ip), port=be16(value.port), flags=value.flags, cluster_id=value.cluster_id)

    def decode_value(self, raw: ctypes.Structure) -> BackendEntry:
        assert isinstance(raw, Backend6)
        return BackendEntry(_ip6(raw.addr), from_be16(raw.port), raw.cluster_id, raw.flags)

    def pack_keys(self, keys: Sequence[int]) -> bytes:
        return BACKEND_CODEC.pack_keys(keys)

    def pack_values(self, values: Sequence[BackendEntry]) -> bytes:
        out = bytearray(_BACKEND6_VAL.size * len(values))
        for i, v in enumerate(values):
            _BACKEND6_VAL.pack_into(out, i * _BACKEND6_VAL.size, v.ip.packed, be16(v.port), v.flags, v.cluster_id)
        return bytes(out)


class Rev6Codec(Codec[tuple[int, IPv6Address, int], tuple[IPv6Address, int]]):
    """cm_rev6: (socket cookie, backend ip, backend port) -> (ClusterIP, port)."""

    name = REV6_MAP
    key_type = Rev6Key
    value_type = Rev6Val

    def encode_key(self, key: tuple[int, IPv6Address, int]) -> Rev6Key:
        cookie, ip, port = key
        return Rev6Key(cookie=cookie, addr=_u8x16(ip), port=be16(port))

    def decode_key(self, raw: CKey | int) -> tuple[int, IPv6Address, int]:
        assert isinstance(raw, Rev6Key)
        return int(raw.cookie), _ip6(raw.addr), from_be16(raw.port)

    def encode_value(self, value: tuple[IPv6Address, int]) -> Rev6Val:
        ip, port = value
        return Rev6Val(addr=_u8x16(ip), port=be16(port))

    def decode_value(self, raw: ctypes.Structure) -> tuple[IPv6Address, int]:
        assert isinstance(raw, Rev6Val)
        return _ip6(raw.addr), from_be16(raw.port)


SERVICE6_CODEC = Service6Codec()
BACKEND6_CODEC = Backend6Codec()
REV6_CODEC = Rev6Codec()
