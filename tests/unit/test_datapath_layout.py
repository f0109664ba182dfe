"""The ctypes mirrors in clustermesh/datapath/layout.py match bpf/clustermesh_maps.h.

gcc compiles a tiny program against the real header that prints sizeof and
offsetof of every struct and field; Python compares them with ctypes. The
field lists themselves come from parsing the header, so a field added on one
side only fails here too.
"""

from __future__ import annotations

import ctypes
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from clustermesh.datapath import layout, model
from clustermesh.datapath.layout import (
    BACKEND6_CODEC,
    BACKEND_CODEC,
    MIRRORS,
    REV4_CODEC,
    REV6_CODEC,
    SERVICE6_CODEC,
    SERVICE_CODEC,
)
from clustermesh.datapath.model import BackendEntry, Frontend, ServiceEntry, SlotKey
from tests.prereq import require_binary

HEADER = Path(__file__).resolve().parents[2] / "bpf" / "clustermesh_maps.h"


def header_structs() -> dict[str, list[str]]:
    """struct name -> field names, in order, parsed from the header."""
    text = re.sub(r"/\*.*?\*/", "", HEADER.read_text(), flags=re.S)
    structs = {}
    for name, body in re.findall(r"struct\s+(\w+)\s*\{(.*?)\};", text, flags=re.S):
        fields = re.findall(r"(\w+)\s*(?:\[\s*\w+\s*\])?\s*;", body)
        structs[name] = fields
    return structs


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    gcc = require_binary("gcc", "apt-get install gcc libc6-dev linux-libc-dev")
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        '#include "clustermesh_maps.h"',
        "int main(void) {",
        '  printf("{\\"structs\\": {");',
    ]
    for i, (name, fields) in enumerate(header_structs().items()):
        sep = "," if i else ""
        lines.append(
            f'  printf("{sep}\\"{name}\\": {{\\"size\\": %zu, \\"fields\\": {{", sizeof(struct {name}));'
        )
        for j, field in enumerate(fields):
            fsep = "," if j else ""
            lines.append(f'  printf("{fsep}\\"{field}\\": %zu", offsetof(struct {name}, {field}));')
        lines.append('  printf("}}");')
    lines.append('  printf("}, \\"constants\\": {");')
    for i, const in enumerate(layout.HEADER_CONSTANTS):
        sep = "," if i else ""
        lines.append(f'  printf("{sep}\\"{const}\\": %llu", (unsigned long long)({const}));')
    lines += ['  printf("}}\\n");', "  return 0;", "}"]
    tmp = tmp_path_factory.mktemp("layout")
    src = tmp / "layout.c"
    src.write_text("\n".join(lines) + "\n")
    exe = tmp / "layout"
    subprocess.run(
        [gcc, "-Wall", "-Werror", "-I", str(HEADER.parent), "-o", str(exe), str(src)], check=True, timeout=60
    )
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True, timeout=10).stdout
    result: dict[str, Any] = json.loads(out)
    return result


def test_every_header_struct_has_a_mirror() -> None:
    assert set(header_structs()) == set(MIRRORS)


@pytest.mark.parametrize("name", sorted(MIRRORS))
def test_mirror_matches_header(name: str, c_layout: dict[str, Any]) -> None:
    mirror = MIRRORS[name]
    c_struct = c_layout["structs"][name]
    assert f"``struct {name}``" in (mirror.__doc__ or ""), "the docstring must name its C twin"
    assert [f[0] for f in mirror._fields_] == header_structs()[name]
    assert ctypes.sizeof(mirror) == c_struct["size"]
    offsets = {field: getattr(mirror, field).offset for field, *_ in mirror._fields_}
    assert offsets == c_struct["fields"]


def test_constants_match_header(c_layout: dict[str, Any]) -> None:
    assert c_layout["constants"] == layout.HEADER_CONSTANTS
    assert layout.HEADER_CONSTANTS["CM_SVC_F_AFFINITY_LOCAL"] == model.SVC_F_AFFINITY_LOCAL
    assert layout.HEADER_CONSTANTS["CM_SVC_F_AFFINITY_REMOTE"] == model.SVC_F_AFFINITY_REMOTE
    assert layout.HEADER_CONSTANTS["CM_BE_F_LOCAL"] == model.BE_F_LOCAL
    assert layout.HEADER_CONSTANTS["CM_SLOT_MASTER"] == model.SLOT_MASTER


# --- codecs: byte order as the BPF programs see it ---------------------------------------


def test_service_key_bytes_are_in_network_order() -> None:
    key = SERVICE_CODEC.encode_key(SlotKey(Frontend("10.96.0.10", 80, "TCP"), 2))
    assert bytes(key) == bytes([10, 96, 0, 10, 0, 80, 2, 0, 6, 0, 0, 0])


def test_backend_value_bytes() -> None:
    entry = BackendEntry(Frontend("10.244.1.10", 8080).ip, 8080, 3, model.BE_F_LOCAL)
    raw = BACKEND_CODEC.encode_value(entry)
    assert bytes(raw) == bytes([10, 244, 1, 10, 0x1F, 0x90, 1, 0, 3, 0, 0, 0])


@pytest.mark.parametrize(
    ("codec", "key", "value"),
    [
        (SERVICE_CODEC, SlotKey(Frontend("10.96.0.10", 53, "UDP"), 0), ServiceEntry.master(3, 1, 1)),
        (SERVICE_CODEC, SlotKey(Frontend("10.96.255.1", 65535), 65535), ServiceEntry.slot(0xFFFFFFFF)),
        (BACKEND_CODEC, 7, BackendEntry(Frontend("10.245.2.10", 1).ip, 1, 255, 0)),
        (REV4_CODEC, (2**64 - 1, Frontend("10.245.2.10", 1).ip, 9), (Frontend("10.96.0.1", 1).ip, 443)),
        (SERVICE6_CODEC, SlotKey(Frontend("fd00:96::10", 53, "UDP"), 3), ServiceEntry.slot(7)),
        (BACKEND6_CODEC, 9, BackendEntry(Frontend("fd00:245::1", 1).ip, 8080, 2, 0)),
        (REV6_CODEC, (5, Frontend("fd00:245::1", 1).ip, 9), (Frontend("fd00:96::1", 1).ip, 443)),
    ],
)
def test_codecs_round_trip(codec: layout.Codec[Any, Any], key: object, value: object) -> None:
    raw_key = codec.encode_key(key)
    raw_value = codec.encode_value(value)
    assert ctypes.sizeof(raw_key) == ctypes.sizeof(codec.key_type)
    assert codec.decode_key(codec.key_type.from_buffer_copy(bytes(raw_key))) == key
    assert codec.decode_value(codec.value_type.from_buffer_copy(bytes(raw_value))) == value


@pytest.mark.parametrize(
    ("codec", "keys", "values"),
    [
        (
            SERVICE_CODEC,
            [SlotKey(Frontend("10.96.0.10", 53, "UDP"), 0), SlotKey(Frontend("10.96.255.1", 65535), 65535)],
            [ServiceEntry.master(3, 1, 1), ServiceEntry.slot(0xFFFFFFFF)],
        ),
        (
            BACKEND_CODEC,
            [7, 0xFFFFFFFF],
            [
                BackendEntry(Frontend("10.245.2.10", 1).ip, 1, 255, 0),
                BackendEntry(Frontend("10.244.1.10", 1).ip, 8080, 0xFFFFFFFF, model.BE_F_LOCAL),
            ],
        ),
        (REV4_CODEC, [(1, Frontend("10.245.2.10", 1).ip, 9)], [(Frontend("10.96.0.1", 1).ip, 443)]),
        (
            SERVICE6_CODEC,
            [SlotKey(Frontend("fd00:96::10", 53, "UDP"), 0), SlotKey(Frontend("fd00::ffff", 65535), 65535)],
            [ServiceEntry.master(3, 1, 1), ServiceEntry.slot(0xFFFFFFFF)],
        ),
        (BACKEND6_CODEC, [7], [BackendEntry(Frontend("fd00:245::1", 1).ip, 8080, 3, model.BE_F_LOCAL)]),
    ],
)
def test_bulk_encoding_gives_the_bytes_of_the_ctypes_mirrors(
    codec: layout.Codec[Any, Any], keys: list[Any], values: list[Any]
) -> None:
    """The batch writers' struct formats agree with the mirrors (and so with the header)."""
    assert codec.pack_keys(keys) == b"".join(bytes(codec.encode_key(k)) for k in keys)
    assert codec.pack_values(values) == b"".join(bytes(codec.encode_value(v)) for v in values)


def test_ipv6_service_key_bytes_are_in_network_order() -> None:
    key = SERVICE6_CODEC.encode_key(SlotKey(Frontend("fd00:96::a", 80, "TCP"), 2))
    assert bytes(key) == bytes([0xFD, 0, 0, 0x96] + [0] * 11 + [0x0A, 0, 80, 2, 0, 6, 0, 0, 0])
