"""The bpf(2) syscall through ctypes: pins, program attachment, map access.

bcc compiles and loads the programs (clustermesh.datapath.loader); everything
that only needs a file descriptor lives here instead, so that reading the maps
(`clustermesh datapath dump`), reconciling them and detaching work without
compiling anything and without importing bcc.

Attribute layouts follow ``union bpf_attr`` in <linux/bpf.h>: each command gets
a Structure holding only the prefix it uses, and the kernel zero-fills the rest.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from clustermesh.datapath.errors import DatapathError
from clustermesh.datapath.layout import CKey, Codec

K = TypeVar("K")
V = TypeVar("V")

_SYS_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "ppc64le": 361, "s390x": 351, "riscv64": 280}

# enum bpf_cmd
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_ATTACH = 8
BPF_PROG_DETACH = 9
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_QUERY = 16
BPF_MAP_LOOKUP_BATCH = 24
BPF_MAP_UPDATE_BATCH = 26
BPF_MAP_DELETE_BATCH = 27

# map flags
BPF_F_NO_COMMON_LRU = 1 << 1

# attach flags
BPF_F_ALLOW_OVERRIDE = 1 << 0
BPF_F_ALLOW_MULTI = 1 << 1
BPF_F_REPLACE = 1 << 2

# map types we create
BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_LRU_HASH = 9

BPF_FS_MAGIC = 0xCAFE4A11
CGROUP2_SUPER_MAGIC = 0x63677270

_BATCH = 4096


class _MapElemAttr(ctypes.Structure):
    _fields_ = (
        ("map_fd", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("key", ctypes.c_uint64),
        ("value", ctypes.c_uint64),  # also next_key for GET_NEXT_KEY
        ("flags", ctypes.c_uint64),
    )


class _BatchAttr(ctypes.Structure):
    _fields_ = (
        ("in_batch", ctypes.c_uint64),
        ("out_batch", ctypes.c_uint64),
        ("keys", ctypes.c_uint64),
        ("values", ctypes.c_uint64),
        ("count", ctypes.c_uint32),
        ("map_fd", ctypes.c_uint32),
        ("elem_flags", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    )


class _ObjAttr(ctypes.Structure):
    _fields_ = (("pathname", ctypes.c_uint64), ("bpf_fd", ctypes.c_uint32), ("file_flags", ctypes.c_uint32))


class _AttachAttr(ctypes.Structure):
    _fields_ = (
        ("target_fd", ctypes.c_uint32),
        ("attach_bpf_fd", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
        ("attach_flags", ctypes.c_uint32),
        ("replace_bpf_fd", ctypes.c_uint32),
    )


class _QueryAttr(ctypes.Structure):
    _fields_ = (
        ("target_fd", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
        ("query_flags", ctypes.c_uint32),
        ("attach_flags", ctypes.c_uint32),
        ("prog_ids", ctypes.c_uint64),
        ("prog_cnt", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
    )


class _InfoAttr(ctypes.Structure):
    _fields_ = (("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32), ("info", ctypes.c_uint64))


class _GetFdByIdAttr(ctypes.Structure):
    _fields_ = (("id", ctypes.c_uint32), ("next_id", ctypes.c_uint32), ("open_flags", ctypes.c_uint32))


class _ProgInfo(ctypes.Structure):
    """Prefix of ``struct bpf_prog_info`` up to ``name``."""

    _fields_ = (
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16),
    )


class _MapInfo(ctypes.Structure):
    """Prefix of ``struct bpf_map_info`` up to ``name``."""

    _fields_ = (
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
    )


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _sys_bpf_number() -> int:
    machine = platform.machine()
    if machine not in _SYS_BPF:
        raise DatapathError(f"no bpf(2) syscall number known for {machine}; add it to bpfsys._SYS_BPF")
    return _SYS_BPF[machine]


_NR_BPF = _sys_bpf_number()


def bpf(cmd: int, attr: ctypes.Structure) -> int:
    """Call bpf(2); raises OSError with the kernel's errno on failure."""
    ret = _libc.syscall(_NR_BPF, ctypes.c_int(cmd), ctypes.byref(attr), ctypes.c_uint(ctypes.sizeof(attr)))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(ret)


def _addr(obj: ctypes._CData) -> int:
    return ctypes.addressof(obj)


# --- objects and pins ---------------------------------------------------------------


def obj_get(path: str | os.PathLike[str]) -> int:
    """Open a pinned map or program; the caller closes the fd."""
    raw = ctypes.create_string_buffer(os.fsencode(path))
    return bpf(BPF_OBJ_GET, _ObjAttr(pathname=_addr(raw)))


def obj_pin(fd: int, path: str | os.PathLike[str]) -> None:
    raw = ctypes.create_string_buffer(os.fsencode(path))
    bpf(BPF_OBJ_PIN, _ObjAttr(pathname=_addr(raw), bpf_fd=fd))


def is_fs(path: str | os.PathLike[str], magic: int) -> bool:
    """Whether ``path`` is on a filesystem of type ``magic`` (statfs f_type)."""

    class _StatFs(ctypes.Structure):
        _fields_ = (("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 120))

    buf = _StatFs()
    if _libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        return False
    return bool((buf.f_type & 0xFFFFFFFF) == magic)


@dataclass(frozen=True)
class ProgInfo:
    id: int
    type: int
    tag: str
    name: str
    map_ids: tuple[int, ...]


@dataclass(frozen=True)
class MapInfo:
    id: int
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str


def prog_info(fd: int) -> ProgInfo:
    info = _ProgInfo()
    bpf(BPF_OBJ_GET_INFO_BY_FD, _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=_addr(info)))
    count = info.nr_map_ids
    ids = (ctypes.c_uint32 * max(count, 1))()
    if count:
        info = _ProgInfo(nr_map_ids=count, map_ids=_addr(ids))
        bpf(BPF_OBJ_GET_INFO_BY_FD, _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=_addr(info)))
    return ProgInfo(
        id=info.id,
        type=info.type,
        tag=bytes(info.tag).hex(),
        name=info.name.decode(errors="replace"),
        map_ids=tuple(sorted(ids[i] for i in range(min(count, info.nr_map_ids)))),
    )


def map_info(fd: int) -> MapInfo:
    info = _MapInfo()
    bpf(BPF_OBJ_GET_INFO_BY_FD, _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=_addr(info)))
    return MapInfo(
        id=info.id,
        type=info.type,
        key_size=info.key_size,
        value_size=info.value_size,
        max_entries=info.max_entries,
        flags=info.map_flags,
        name=info.name.decode(errors="replace"),
    )


# --- cgroup attachment ---------------------------------------------------------------


def prog_query(target_fd: int, attach_type: int) -> tuple[int, list[int]]:
    """(attach flags, ids of programs attached directly to ``target_fd``)."""
    capacity = 64
    while True:
        ids = (ctypes.c_uint32 * capacity)()
        attr = _QueryAttr(
            target_fd=target_fd, attach_type=attach_type, prog_ids=_addr(ids), prog_cnt=capacity
        )
        try:
            bpf(BPF_PROG_QUERY, attr)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                capacity *= 4
                continue
            raise
        return attr.attach_flags, [ids[i] for i in range(attr.prog_cnt)]


def prog_fd_by_id(prog_id: int) -> int:
    return bpf(BPF_PROG_GET_FD_BY_ID, _GetFdByIdAttr(id=prog_id))


def prog_attach(target_fd: int, prog_fd: int, attach_type: int, flags: int, replace_fd: int = 0) -> None:
    attr = _AttachAttr(
        target_fd=target_fd,
        attach_bpf_fd=prog_fd,
        attach_type=attach_type,
        attach_flags=flags,
        replace_bpf_fd=replace_fd,
    )
    bpf(BPF_PROG_ATTACH, attr)


def prog_detach(target_fd: int, prog_fd: int, attach_type: int) -> None:
    bpf(BPF_PROG_DETACH, _AttachAttr(target_fd=target_fd, attach_bpf_fd=prog_fd, attach_type=attach_type))


# --- maps ------------------------------------------------------------------------------


class BpfMap(MutableMapping[K, V], Generic[K, V]):
    """A BPF hash map seen as a MutableMapping of model values.

    Keys and values go through ``codec`` (see clustermesh.datapath.layout).
    ``update_many``/``delete_many``/``items`` use the kernel's batch commands
    (one syscall per few thousand entries) and fall back to single-element
    calls where a kernel or map type lacks them.
    """

    def __init__(self, fd: int, codec: Codec[K, V], path: str = "") -> None:
        self.fd = fd
        self.codec = codec
        self.path = path or codec.name
        self._batch_ok = True

    @classmethod
    def open_pinned(cls, path: str | os.PathLike[str], codec: Codec[K, V]) -> BpfMap[K, V]:
        """Open the map pinned at ``path`` and check its layout against ``codec``."""
        try:
            fd = obj_get(path)
        except OSError as exc:
            raise DatapathError(
                f"cannot open pinned map {path}: {exc.strerror}; is the datapath loaded on this node "
                "(SocketLB.load) and is bpffs mounted at /sys/fs/bpf?"
            ) from exc
        bpf_map = cls(fd, codec, os.fspath(path))
        try:
            bpf_map.check_layout()
        except DatapathError:
            bpf_map.close()
            raise
        return bpf_map

    def check_layout(self) -> MapInfo:
        info = map_info(self.fd)
        want = (ctypes.sizeof(self.codec.key_type), ctypes.sizeof(self.codec.value_type))
        if (info.key_size, info.value_size) != want:
            raise DatapathError(
                f"map {self.path} has key/value sizes {info.key_size}/{info.value_size}, this agent "
                f"expects {want[0]}/{want[1]}: it was made by another clustermesh version. Remove the pins "
                "(clustermesh datapath destroy) and load again; services fall back to kube-proxy meanwhile."
            )
        return info

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> BpfMap[K, V]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _fail(self, what: str, exc: OSError) -> DatapathError:
        hint = ""
        if exc.errno in (errno.E2BIG, errno.ENOSPC, errno.ENOMEM):
            hint = "; the map is full: raise its size (SocketLB limits) or trim services"
        return DatapathError(f"{what} on map {self.path} failed: {exc.strerror}{hint}")

    # single elements

    def __getitem__(self, key: K) -> V:
        ckey = self.codec.encode_key(key)
        cval = self.codec.value_type()
        try:
            bpf(BPF_MAP_LOOKUP_ELEM, _MapElemAttr(map_fd=self.fd, key=_addr(ckey), value=_addr(cval)))
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                raise KeyError(key) from None
            raise self._fail("lookup", exc) from exc
        return self.codec.decode_value(cval)

    def __setitem__(self, key: K, value: V) -> None:
        ckey = self.codec.encode_key(key)
        cval = self.codec.encode_value(value)
        try:
            bpf(BPF_MAP_UPDATE_ELEM, _MapElemAttr(map_fd=self.fd, key=_addr(ckey), value=_addr(cval)))
        except OSError as exc:
            raise self._fail("update", exc) from exc

    def __delitem__(self, key: K) -> None:
        ckey = self.codec.encode_key(key)
        try:
            bpf(BPF_MAP_DELETE_ELEM, _MapElemAttr(map_fd=self.fd, key=_addr(ckey)))
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                raise KeyError(key) from None
            raise self._fail("delete", exc) from exc

    def _raw_keys(self) -> list[CKey]:
        # Snapshot first: walking a hash map while it changes can restart
        # from the first bucket and never end.
        keys: list[CKey] = []
        prev: CKey | None = None
        while True:
            nxt = self.codec.key_type()
            attr = _MapElemAttr(map_fd=self.fd, key=_addr(prev) if prev is not None else 0, value=_addr(nxt))
            try:
                bpf(BPF_MAP_GET_NEXT_KEY, attr)
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    return keys
                raise self._fail("iterate", exc) from exc
            keys.append(nxt)
            prev = nxt

    def __iter__(self) -> Iterator[K]:
        return iter([self.codec.decode_key(k) for k in self._raw_keys()])

    def __len__(self) -> int:
        return len(self._raw_keys())

    # batches

    def snapshot(self) -> dict[K, V]:
        """All entries, read with as few syscalls as the kernel allows."""
        if self._batch_ok:
            try:
                return self._lookup_batch()
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, 524):
                    raise self._fail("batch lookup", exc) from exc
                self._batch_ok = False
        out: dict[K, V] = {}
        for ckey in self._raw_keys():
            key = self.codec.decode_key(ckey)
            try:
                out[key] = self[key]
            except KeyError:
                continue
        return out

    def _lookup_batch(self) -> dict[K, V]:
        out: dict[K, V] = {}
        count = _BATCH
        token_in = ctypes.c_uint64()
        token_out = ctypes.c_uint64()
        first = True
        while True:
            keys = (self.codec.key_type * count)()
            values = (self.codec.value_type * count)()
            attr = _BatchAttr(
                in_batch=0 if first else _addr(token_in),
                out_batch=_addr(token_out),
                keys=_addr(keys),
                values=_addr(values),
                count=count,
                map_fd=self.fd,
            )
            done = False
            try:
                bpf(BPF_MAP_LOOKUP_BATCH, attr)
            except OSError as exc:
                if exc.errno == errno.ENOSPC and attr.count == 0:
                    count *= 2  # one hash bucket holds more than ``count``
                    continue
                if exc.errno != errno.ENOENT:
                    raise
                done = True
            for i in range(attr.count):
                out[self.codec.decode_key(keys[i])] = self.codec.decode_value(values[i])
            if done:
                return out
            token_in.value = token_out.value
            first = False

    def update_many(self, items: Sequence[tuple[K, V]]) -> None:
        for start in range(0, len(items), _BATCH):
            chunk = items[start : start + _BATCH]
            if not self._batch_ok:
                for key, value in chunk:
                    self[key] = value
                continue
            keys = ctypes.create_string_buffer(self.codec.pack_keys([k for k, _ in chunk]))
            values = ctypes.create_string_buffer(self.codec.pack_values([v for _, v in chunk]))
            attr = _BatchAttr(keys=_addr(keys), values=_addr(values), count=len(chunk), map_fd=self.fd)
            try:
                bpf(BPF_MAP_UPDATE_BATCH, attr)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, 524):
                    raise self._fail("batch update", exc) from exc
                self._batch_ok = False
                for key, value in chunk[attr.count :]:
                    self[key] = value

    def delete_many(self, keys: Sequence[K]) -> None:
        pending = list(keys)
        while pending:
            chunk = pending[:_BATCH]
            if not self._batch_ok:
                for key in chunk:
                    self.pop(key, None)
                pending = pending[len(chunk) :]
                continue
            ckeys = ctypes.create_string_buffer(self.codec.pack_keys(chunk))
            attr = _BatchAttr(keys=_addr(ckeys), count=len(chunk), map_fd=self.fd)
            try:
                bpf(BPF_MAP_DELETE_BATCH, attr)
                pending = pending[len(chunk) :]
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    # Already gone is what we want: skip it and go on.
                    pending = pending[attr.count + 1 :]
                elif exc.errno in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, 524):
                    self._batch_ok = False
                    pending = pending[attr.count :]
                else:
                    raise self._fail("batch delete", exc) from exc


class ByFamily(MutableMapping[K, V], Generic[K, V]):
    """An IPv4 map and its IPv6 twin seen as one mapping, for the planner.

    ``is_v6(key, value)`` says where an entry belongs; ``value`` is None when
    only the key is known (lookups and deletes). Where the key alone cannot
    tell (backend ids are shared by both maps), the family of each key seen in
    a snapshot or a write is remembered, and a key never seen is looked for in
    both maps.
    """

    def __init__(
        self, v4: BpfMap[K, V], v6: BpfMap[K, V], is_v6: Callable[[K, V | None], bool | None]
    ) -> None:
        self.v4, self.v6 = v4, v6
        self._is_v6 = is_v6
        self._seen: dict[K, bool] = {}

    def _where(self, key: K, value: V | None = None) -> list[BpfMap[K, V]]:
        v6 = self._is_v6(key, value)
        if v6 is None:
            v6 = self._seen.get(key)
        if v6 is None:
            return [self.v4, self.v6]
        return [self.v6 if v6 else self.v4]

    def _split(self, items: Sequence[tuple[K, V]]) -> tuple[list[tuple[K, V]], list[tuple[K, V]]]:
        v4: list[tuple[K, V]] = []
        v6: list[tuple[K, V]] = []
        for key, value in items:
            family = self._is_v6(key, value)
            (v6 if family else v4).append((key, value))
        return v4, v6

    def close(self) -> None:
        self.v4.close()
        self.v6.close()

    def __getitem__(self, key: K) -> V:
        for bpf_map in self._where(key):
            try:
                return bpf_map[key]
            except KeyError:
                continue
        raise KeyError(key)

    def __setitem__(self, key: K, value: V) -> None:
        self.update_many([(key, value)])

    def __delitem__(self, key: K) -> None:
        for bpf_map in self._where(key):
            try:
                del bpf_map[key]
                self._seen.pop(key, None)
                return
            except KeyError:
                continue
        raise KeyError(key)

    def __iter__(self) -> Iterator[K]:
        yield from self.v4
        yield from self.v6

    def __len__(self) -> int:
        return len(self.v4) + len(self.v6)

    def snapshot(self) -> dict[K, V]:
        v4, v6 = self.v4.snapshot(), self.v6.snapshot()
        self._seen = dict.fromkeys(v4, False)
        self._seen.update(dict.fromkeys(v6, True))
        return {**v4, **v6}

    def update_many(self, items: Sequence[tuple[K, V]]) -> None:
        v4, v6 = self._split(items)
        for bpf_map, part, family in ((self.v4, v4, False), (self.v6, v6, True)):
            if part:
                bpf_map.update_many(part)
                self._seen.update(dict.fromkeys((k for k, _ in part), family))

    def delete_many(self, keys: Sequence[K]) -> None:
        v4: list[K] = []
        v6: list[K] = []
        for key in keys:
            where = self._where(key)
            # identity, not ==: Mapping equality would read both maps
            if any(m is self.v4 for m in where):
                v4.append(key)
            if any(m is self.v6 for m in where):
                v6.append(key)
            self._seen.pop(key, None)
        for bpf_map, part in ((self.v4, v4), (self.v6, v6)):
            if part:
                bpf_map.delete_many(part)
