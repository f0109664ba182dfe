"""Socket-LB on a real kernel: root, bcc, a throwaway cgroup v2 and two netns.

See conftest.py for the topology and why no test address can leave the machine.
"""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from clustermesh.datapath import (
    Affinity,
    Backend,
    DatapathError,
    Frontend,
    ServiceSpec,
    SocketLB,
    bpfsys,
    command,
    dump_main,
    hooks,
)
from clustermesh.datapath.layout import REV4_CODEC, REV4_MAP
from tests.datapath.conftest import LB_LOCAL_CLUSTER, REPO, Topology, names_of
from tests.prereq import require_binary

pytestmark = pytest.mark.datapath

LOCAL_CLUSTER = LB_LOCAL_CLUSTER
CLUSTER_IP = "10.96.0.10"
EMPTY_IP = "10.96.0.20"
WEB = Frontend(CLUSTER_IP, 80, "TCP")
DNS = Frontend(CLUSTER_IP, 53, "UDP")
EMPTY = Frontend(EMPTY_IP, 80, "TCP")
EMPTY_UDP = Frontend(EMPTY_IP, 53, "UDP")

BACKENDS = {"local-a": "10.244.1.10", "remote-b": "10.245.1.10", "remote-c": "10.245.2.10"}
CLUSTER_OF = {"local-a": 1, "remote-b": 2, "remote-c": 3}
REMOTE = {"remote-b", "remote-c"}


def backends(names: Iterable[str], port: int) -> frozenset[Backend]:
    return frozenset(Backend(BACKENDS[n], port, CLUSTER_OF[n]) for n in names)


def web(names: Iterable[str] = tuple(BACKENDS), affinity: str = "none") -> ServiceSpec:
    return ServiceSpec(WEB, backends(names, 8080), Affinity.parse(affinity))


def dns(names: Iterable[str] = tuple(BACKENDS)) -> ServiceSpec:
    return ServiceSpec(DNS, backends(names, 5353))


@pytest.fixture
def lab(topology: Topology) -> Topology:
    topology.add_backends(BACKENDS)
    return topology


# --- forward and reverse translation -------------------------------------------------------


def test_tcp_connect_to_clusterip_reaches_a_backend_and_sees_the_clusterip(
    lab: Topology, lb: SocketLB
) -> None:
    lb.program([web()])
    results = lab.client("tcp", CLUSTER_IP, "80", "30")
    assert names_of(results) <= set(BACKENDS)
    # random among three backends: 30 connects all landing on one is ~1e-13
    assert len(names_of(results)) > 1
    assert {tuple(r["peer"]) for r in results} == {(CLUSTER_IP, 80)}  # getpeername


def test_curl_through_the_clusterip(lab: Topology, lb: SocketLB) -> None:
    curl = require_binary("curl", "apt-get install curl")
    lb.program([web()])
    out = lab.run(
        [curl, "-sS", "--max-time", "3", "-w", "\n%{remote_ip}:%{remote_port}", f"http://{CLUSTER_IP}/"]
    )
    body, remote = out.strip().rsplit("\n", 1)
    assert body.strip() in BACKENDS
    assert remote == f"{CLUSTER_IP}:80"


def test_udp_request_reply_comes_from_the_clusterip(lab: Topology, lb: SocketLB) -> None:
    lb.program([web(), dns()])
    results = lab.client("udp", CLUSTER_IP, "53", "20")
    assert names_of(results) <= set(BACKENDS)
    assert {tuple(r["from"]) for r in results} == {(CLUSTER_IP, 53)}  # recvmsg translated


def test_connected_udp_is_balanced_at_connect(lab: Topology, lb: SocketLB) -> None:
    lb.program([dns()])
    result = lab.client("udp-connected", CLUSTER_IP, "53")
    assert result["ok"], result
    assert result["name"] in BACKENDS
    assert tuple(result["peer"]) == (CLUSTER_IP, 53)
    assert tuple(result["from"]) == (CLUSTER_IP, 53)


def rev_entries(pin_dir: Path) -> dict[tuple[int, IPv4Address, int], tuple[IPv4Address, int]]:
    with bpfsys.BpfMap.open_pinned(pin_dir / REV4_MAP, REV4_CODEC) as rev:
        return rev.snapshot()


@pytest.mark.parametrize(("proto", "port"), [("tcp", 80), ("udp", 53)])
def test_a_connected_socket_keeps_its_translation_while_open_and_across_a_restart(
    lab: Topology, lb: SocketLB, pin_dir: Path, tmp_path: Path, proto: str, port: int
) -> None:
    lb.program([web(), dns()])
    stopfile = tmp_path / "stop"
    proc, first = lab.start_hold(proto, CLUSTER_IP, port, stopfile)
    try:
        assert tuple(first["peer"]) == (CLUSTER_IP, port)
        assert set(rev_entries(pin_dir).values()) == {(IPv4Address(CLUSTER_IP), port)}
        # A restarted agent loads again: the pinned cm_rev4 keeps serving the socket.
        restarted = SocketLB(lb.cgroup_path, pin_dir, LOCAL_CLUSTER)
        assert {a.action for a in restarted.load()} == {"kept"}
        restarted.close()
    finally:
        last = lab.finish_loop(proc, stopfile)
    assert tuple(last["peer"]) == (CLUSTER_IP, port)
    assert last["name"] in BACKENDS
    if proto == "udp":
        assert tuple(last["from"]) == (CLUSTER_IP, port)  # recvmsg on a connected socket
    assert rev_entries(pin_dir) == {}  # closed: cm_release4 took the entry


def test_reverse_entries_live_as_long_as_their_sockets(lab: Topology, lb: SocketLB, pin_dir: Path) -> None:
    lb.program([web(), dns()])
    assert names_of(lab.client("tcp", CLUSTER_IP, "80", "20")) <= set(BACKENDS)
    assert lab.client("udp-connected", CLUSTER_IP, "53")["ok"]
    # closed sockets took their entries with them (cm_release4) ...
    assert rev_entries(pin_dir) == {}
    # ... while an unconnected UDP socket leaves one per backend, for the LRU
    assert names_of(lab.client("udp", CLUSTER_IP, "53", "5"))
    left = rev_entries(pin_dir)
    assert 1 <= len(left) <= 3
    assert set(left.values()) == {(IPv4Address(CLUSTER_IP), 53)}


def test_reverse_map_is_a_per_cpu_lru(lb: SocketLB, pin_dir: Path) -> None:
    """Each CPU takes and gives back its own elements: no list shared by all CPUs."""
    with hooks.fd(bpfsys.obj_get(pin_dir / REV4_MAP)) as fd:
        info = bpfsys.map_info(fd)
    assert info.type == bpfsys.BPF_MAP_TYPE_LRU_HASH
    assert info.flags & bpfsys.BPF_F_NO_COMMON_LRU


def test_udp_socket_connected_again_elsewhere_shows_its_real_peer(lab: Topology, lb: SocketLB) -> None:
    # the first connect can only pick remote-c: a stale translation would match the second peer
    lb.program([dns(["remote-c"])])
    result = lab.client("udp-reconnect", CLUSTER_IP, "53", BACKENDS["remote-c"], "5353")
    assert tuple(result["first"]) == (CLUSTER_IP, 53)
    assert tuple(result["second"]) == (BACKENDS["remote-c"], 5353)
    assert result["name"] == "remote-c"
    assert tuple(result["from"]) == (BACKENDS["remote-c"], 5353)


def test_addresses_not_in_the_map_pass_untouched(lab: Topology, lb: SocketLB) -> None:
    lb.program([web()])
    # A backend address is not a frontend: the connect lands exactly there
    # and getpeername shows the real address.
    direct = lab.client("tcp", BACKENDS["remote-b"], "8080", "5")
    assert names_of(direct) == {"remote-b"}
    assert {tuple(r["peer"]) for r in direct} == {(BACKENDS["remote-b"], 8080)}
    # A ClusterIP, or a port of it, that is not ours is left to the kernel's
    # routing (here: none, so ENETUNREACH, not our ECONNREFUSED).
    for ip, port in (("10.96.0.99", "80"), (CLUSTER_IP, "81")):
        (result,) = lab.client("tcp", ip, port, "1")
        assert result["errno"] == errno.ENETUNREACH, result
    # A process outside the cgroup is not balanced at all.
    (outside,) = lab.client("tcp", CLUSTER_IP, "80", "1", in_cgroup=False)
    assert outside["errno"] == errno.ENETUNREACH, outside


def test_service_without_backends_refuses_with_econnrefused(lab: Topology, lb: SocketLB) -> None:
    """count == 0: the hook refuses and sets ECONNREFUSED (see bpf/sock_lb.c)."""
    lb.program([web(), ServiceSpec(EMPTY), ServiceSpec(EMPTY_UDP)])
    start = time.monotonic()
    tcp = lab.client("tcp", EMPTY_IP, "80", "3")
    udp = lab.client("udp", EMPTY_IP, "53", "3")
    assert [r["errno"] for r in tcp] == [errno.ECONNREFUSED] * 3
    assert [r["errno"] for r in udp] == [errno.ECONNREFUSED] * 3
    assert time.monotonic() - start < 10  # refused at once, not timed out
    assert names_of(lab.client("tcp", CLUSTER_IP, "80", "3")) <= set(BACKENDS)


# --- affinity and failover -----------------------------------------------------------------


def test_affinity_local_fails_over_to_remote_without_a_failed_connect(
    lab: Topology, lb: SocketLB, tmp_path: Path
) -> None:
    lb.program([web(BACKENDS, "local")])
    assert names_of(lab.client("tcp", CLUSTER_IP, "80", "20")) == {"local-a"}

    stopfile = tmp_path / "stop"
    loop = lab.start_loop(CLUSTER_IP, 80, stopfile)
    time.sleep(0.3)
    ops = lb.program([web(REMOTE, "local")])  # the local backend goes away
    assert ops
    time.sleep(0.3)
    summary = lab.finish_loop(loop, stopfile)
    assert summary["failed"] == []
    assert summary["ok"] > 10
    assert "local-a" in summary["names"]  # the loop did run across the change

    after = names_of(lab.client("tcp", CLUSTER_IP, "80", "30"))
    assert after == REMOTE
    assert all(b.cluster_id != LOCAL_CLUSTER for b in lb.read().backends.values())

    lb.program([web(BACKENDS, "local")])  # it comes back: traffic goes home
    assert names_of(lab.client("tcp", CLUSTER_IP, "80", "20")) == {"local-a"}


def test_affinity_remote_prefers_other_clusters(lab: Topology, lb: SocketLB) -> None:
    lb.program([web(BACKENDS, "remote")])
    assert names_of(lab.client("tcp", CLUSTER_IP, "80", "20")) == REMOTE


# --- restart, upgrade, teardown -------------------------------------------------------------


def run_agent(cgroup: Path, pin_dir: Path, specs: list[dict[str, object]]) -> dict[str, object]:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.datapath._agent",
            str(cgroup),
            str(pin_dir),
            str(LOCAL_CLUSTER),
            json.dumps(specs),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report: dict[str, object] = json.loads(proc.stdout)
    return report


def pinned_map_ids(pin_dir: Path) -> dict[str, int]:
    ids = {}
    for name in hooks.MAP_PINS:
        with hooks.fd(bpfsys.obj_get(pin_dir / name)) as fd:
            ids[name] = bpfsys.map_info(fd).id
    return ids


def test_restart_reuses_maps_and_attachment_without_a_failed_connect(
    lab: Topology, cgroup: Path, pin_dir: Path, tmp_path: Path
) -> None:
    spec = [
        {
            "frontend": [CLUSTER_IP, 80, "TCP"],
            "backends": [[ip, 8080, CLUSTER_OF[n]] for n, ip in BACKENDS.items()],
            "affinity": "local",
        }
    ]
    try:
        first = run_agent(cgroup, pin_dir, spec)
        assert {action for _, action in first["attachments"].values()} == {"attached"}  # type: ignore[union-attr]
        maps_before = pinned_map_ids(pin_dir)

        stopfile = tmp_path / "stop"
        loop = lab.start_loop(CLUSTER_IP, 80, stopfile)
        time.sleep(0.3)
        second = run_agent(cgroup, pin_dir, spec)  # a new process: the restarted agent
        time.sleep(0.3)
        summary = lab.finish_loop(loop, stopfile)

        assert second["attachments"] == {h: [pid, "kept"] for h, (pid, _) in first["attachments"].items()}  # type: ignore[union-attr]
        assert second["ops"] == []  # unchanged desired state: nothing written
        assert second["attached"] == {h: [pid] for h, (pid, _) in first["attachments"].items()}  # type: ignore[union-attr]
        assert pinned_map_ids(pin_dir) == maps_before
        assert summary["failed"] == []
        assert summary["names"] == {"local-a": summary["ok"]}
        assert summary["ok"] > 10
    finally:
        hooks.detach(cgroup, pin_dir)
        hooks.remove_pins(pin_dir)


def test_changed_program_replaces_the_attachment_atomically(
    lab: Topology, lb: SocketLB, cgroup: Path, pin_dir: Path, tmp_path: Path
) -> None:
    lb.program([web(), ServiceSpec(EMPTY)])
    before = lb.attached()
    # An "upgrade": the same program with another errno for empty services.
    newer = tmp_path / "bpf"
    shutil.copytree(REPO / "bpf", newer)
    source = newer / "sock_lb.c"
    source.write_text(
        source.read_text().replace(
            "#define CM_NO_BACKEND_ERRNO ECONNREFUSED", "#define CM_NO_BACKEND_ERRNO EHOSTUNREACH"
        )
    )

    upgraded = SocketLB(cgroup, pin_dir, LOCAL_CLUSTER, bpf_dir=newer)
    actions = {a.hook: a.action for a in upgraded.load()}
    assert actions == {
        "cm_connect4": "replaced",
        "cm_sendmsg4": "replaced",
        "cm_recvmsg4": "kept",
        "cm_getpeername4": "kept",
        "cm_release4": "kept",
        "cm_connect6": "replaced",
        "cm_sendmsg6": "replaced",
        "cm_recvmsg6": "kept",
        "cm_getpeername6": "kept",
    }
    after = upgraded.attached()
    assert all(len(ids) == 1 for ids in after.values())
    assert after["cm_connect4"] != before["cm_connect4"]
    assert upgraded.dry_run([web(), ServiceSpec(EMPTY)]) == []  # same maps, same contents
    (refused,) = lab.client("tcp", EMPTY_IP, "80", "1")
    assert refused["errno"] == errno.EHOSTUNREACH
    assert names_of(lab.client("tcp", CLUSTER_IP, "80", "5")) <= set(BACKENDS)
    upgraded.close()


@pytest.mark.parametrize("in_child", [False, True], ids=["in-process", "compiled-by-a-child"])
def test_pinned_map_of_another_layout_is_refused(cgroup: Path, pin_dir: Path, in_child: bool) -> None:
    import bcc  # only to forge an incompatible pinned map

    pin_dir.mkdir()
    forged = bcc.BPF(text=f'BPF_TABLE_PINNED("hash", u64, u64, cm_svc4, 16, "{pin_dir}/cm_svc4");'.encode())
    forged.cleanup()
    with pytest.raises(DatapathError, match="another clustermesh version"):
        SocketLB(cgroup, pin_dir, LOCAL_CLUSTER, compile_in_child=in_child).load()
    assert hooks.attached_ids(cgroup) == {h.name: [] for h in hooks.HOOKS}


CHILD_COMPILE = """
import json, sys
from clustermesh.datapath import Backend, Frontend, ServiceSpec, SocketLB
lb = SocketLB(sys.argv[1], sys.argv[2], 1, compile_in_child=True)
attachments = lb.load()
lb.program([ServiceSpec(Frontend(sys.argv[3], 80, "TCP"), frozenset([Backend(sys.argv[4], 8080, 1)]))])
status = {line.split(":")[0]: int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("Rss")}
print(json.dumps({"bcc": "bcc" in sys.modules, "actions": sorted({a.action for a in attachments}),
                  "rss_mb": (status["RssAnon"] + status["RssFile"]) // 1024}))
"""


def test_the_agent_compiles_in_a_child_and_keeps_no_compiler_in_memory(
    lab: Topology, cgroup: Path, pin_dir: Path
) -> None:
    try:
        res = subprocess.run([sys.executable, "-c", CHILD_COMPILE, str(cgroup), str(pin_dir), CLUSTER_IP,
                              BACKENDS["local-a"]], capture_output=True, text=True, timeout=300, cwd=REPO)
        assert res.returncode == 0, res.stderr
        got = json.loads(res.stdout)
        # bcc maps LLVM (~60 MB) on import and a compile leaves more behind: none of it here.
        assert got["bcc"] is False and got["actions"] == ["attached"], got
        assert got["rss_mb"] < 80, got
        # The child's attachments and pins outlived it: the service is served.
        assert names_of(lab.client("tcp", CLUSTER_IP, "80", "5")) == {"local-a"}
    finally:
        hooks.detach(cgroup, pin_dir)
        hooks.remove_pins(pin_dir)


def test_destroy_detaches_and_unpins(lab: Topology, cgroup: Path, pin_dir: Path) -> None:
    socket_lb = SocketLB(cgroup, pin_dir, LOCAL_CLUSTER)
    socket_lb.load()
    socket_lb.program([web()])
    assert names_of(lab.client("tcp", CLUSTER_IP, "80", "3")) <= set(BACKENDS)
    socket_lb.destroy()
    assert socket_lb.attached() == {h.name: [] for h in hooks.HOOKS}
    assert not pin_dir.exists()
    (result,) = lab.client("tcp", CLUSTER_IP, "80", "1")
    assert result["errno"] == errno.ENETUNREACH  # back to the kernel's routing


def test_dump_shows_frontends_slots_and_backends(
    lb: SocketLB, pin_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lb.program([web(BACKENDS, "local"), ServiceSpec(EMPTY)])
    assert dump_main(str(pin_dir)) == 0
    out = capsys.readouterr().out
    assert "10.96.0.10:80/TCP  count 3  preferred 1  affinity local" in out
    assert "10.244.1.10:8080  cluster 1  local preferred" in out
    assert "10.96.0.20:80/TCP  count 0  preferred 0  affinity none  (no backend: connect refused)" in out
    assert "problems" not in out
    assert dump_main(str(pin_dir), as_json=True) == 0
    data = json.loads(capsys.readouterr().out)
    assert [s["frontend"] for s in data["services"]] == ["10.96.0.10:80/TCP", "10.96.0.20:80/TCP"]
    assert data["broken"] == [] and data["leftovers"] == []
    assert all(pid is not None for pid in data["programs"].values())
    assert dump_main(str(pin_dir / "nope")) == 1


def test_cli_dump_and_destroy(
    lb: SocketLB, cgroup: Path, pin_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lb.program([web()])
    where = ["--pin-dir", str(pin_dir)]
    assert command.main(["dump", *where, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["services"][0]["count"] == 3
    assert command.main(["destroy", "--cgroup", str(cgroup), *where]) == 0
    hook_names = ", ".join(h.name for h in hooks.HOOKS)
    assert f"detached: {hook_names}" in capsys.readouterr().out
    assert hooks.attached_ids(cgroup) == {h.name: [] for h in hooks.HOOKS}
    assert not pin_dir.exists()
    assert command.main(["dump", *where]) == 1
