"""Clients for the datapath tests; run inside the test netns and cgroup.

Usage:
  _client.py tcp IP PORT COUNT          COUNT connects: getpeername + one HTTP exchange each
  _client.py udp IP PORT COUNT          COUNT sendto/recvfrom exchanges on one unconnected socket
  _client.py udp-connected IP PORT      connect(), send, recvfrom, getpeername
  _client.py udp-reconnect IP PORT IP2 PORT2  connect() to IP:PORT, getpeername, connect() again to
                                        IP2:PORT2, getpeername, one exchange there
  _client.py loop IP PORT STOPFILE MAX  connect in a loop until STOPFILE exists (at most MAX s)
  _client.py hold PROTO IP PORT STOPFILE  connect (tcp or udp), print getpeername, keep the socket
                                        until STOPFILE exists (at most 30 s), then exchange once

IPv6 addresses work too (addresses in the output are then [host, port, flowinfo, scope]).
Prints one JSON document. Standalone: it starts fast and imports nothing of ours.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from typing import Any

TIMEOUT = 2.0


def family(ip: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def http_once(ip: str, port: int) -> dict[str, Any]:
    try:
        with socket.create_connection((ip, port), timeout=TIMEOUT) as sock:
            peer = sock.getpeername()
            sock.sendall(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
    except OSError as exc:
        return {"ok": False, "errno": exc.errno, "error": str(exc)}
    body = data.split(b"\r\n\r\n", 1)[-1].decode().strip()
    return {"ok": True, "name": body, "peer": list(peer)}


def udp_many(ip: str, port: int, count: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    with socket.socket(family(ip), socket.SOCK_DGRAM) as sock:
        sock.settimeout(TIMEOUT)
        for _ in range(count):
            try:
                sock.sendto(b"who", (ip, port))
                data, sender = sock.recvfrom(2048)
            except OSError as exc:
                out.append({"ok": False, "errno": exc.errno, "error": str(exc)})
                continue
            out.append({"ok": True, "name": data.decode(), "from": list(sender)})
    return out


def udp_connected(ip: str, port: int) -> dict[str, Any]:
    with socket.socket(family(ip), socket.SOCK_DGRAM) as sock:
        sock.settimeout(TIMEOUT)
        try:
            sock.connect((ip, port))
            peer = sock.getpeername()
            sock.send(b"who")
            data, sender = sock.recvfrom(2048)
        except OSError as exc:
            return {"ok": False, "errno": exc.errno, "error": str(exc)}
    return {"ok": True, "name": data.decode(), "from": list(sender), "peer": list(peer)}


def udp_reconnect(ip: str, port: int, ip2: str, port2: int) -> dict[str, Any]:
    with socket.socket(family(ip), socket.SOCK_DGRAM) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect((ip, port))
        first = sock.getpeername()
        sock.connect((ip2, port2))
        second = sock.getpeername()
        sock.send(b"who")
        data, sender = sock.recvfrom(2048)
    return {"first": list(first), "second": list(second), "name": data.decode(), "from": list(sender)}


def loop(ip: str, port: int, stopfile: str, max_seconds: float) -> dict[str, Any]:
    ok = 0
    failed: list[str] = []
    names: dict[str, int] = {}
    deadline = time.monotonic() + max_seconds
    print("started", flush=True)
    while not os.path.exists(stopfile) and time.monotonic() < deadline:
        result = http_once(ip, port)
        if result["ok"]:
            ok += 1
            names[result["name"]] = names.get(result["name"], 0) + 1
        else:
            failed.append(result["error"])
        time.sleep(0.002)
    return {"ok": ok, "failed": failed, "names": names}


def hold(proto: str, ip: str, port: int, stopfile: str) -> dict[str, Any]:
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(family(ip), kind) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect((ip, port))
        print(json.dumps({"peer": list(sock.getpeername())}), flush=True)
        deadline = time.monotonic() + 30
        while not os.path.exists(stopfile) and time.monotonic() < deadline:
            time.sleep(0.01)
        peer = sock.getpeername()
        if proto == "tcp":
            sock.sendall(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
            return {"peer": list(peer), "name": data.split(b"\r\n\r\n", 1)[-1].decode().strip()}
        sock.send(b"who")
        reply, sender = sock.recvfrom(2048)
        return {"peer": list(peer), "name": reply.decode(), "from": list(sender)}


def main(argv: list[str]) -> int:
    mode = argv[0]
    if mode == "hold":
        print(json.dumps(hold(argv[1], argv[2], int(argv[3]), argv[4])), flush=True)
        return 0
    ip, port = argv[1], int(argv[2])
    result: Any
    if mode == "tcp":
        result = [http_once(ip, port) for _ in range(int(argv[3]))]
    elif mode == "udp":
        result = udp_many(ip, port, int(argv[3]))
    elif mode == "udp-connected":
        result = udp_connected(ip, port)
    elif mode == "udp-reconnect":
        result = udp_reconnect(ip, port, argv[3], int(argv[4]))
    elif mode == "loop":
        result = loop(ip, port, argv[3], float(argv[4]))
    else:
        raise SystemExit(f"unknown mode {mode}")
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
