"""Clients for the datapath tests; run inside the test netns and cgroup.

Usage:
  _client.py tcp IP PORT COUNT          COUNT connects: getpeername + one HTTP exchange each
  _client.py udp IP PORT COUNT          COUNT sendto/recvfrom exchanges on one unconnected socket
  _client.py udp-connected IP PORT      connect(), send, recvfrom, getpeername
  _client.py loop IP PORT STOPFILE MAX  connect in a loop until STOPFILE exists (at most MAX s)

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
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
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
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(TIMEOUT)
        try:
            sock.connect((ip, port))
            peer = sock.getpeername()
            sock.send(b"who")
            data, sender = sock.recvfrom(2048)
        except OSError as exc:
            return {"ok": False, "errno": exc.errno, "error": str(exc)}
    return {"ok": True, "name": data.decode(), "from": list(sender), "peer": list(peer)}


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


def main(argv: list[str]) -> int:
    mode, ip, port = argv[0], argv[1], int(argv[2])
    result: Any
    if mode == "tcp":
        result = [http_once(ip, port) for _ in range(int(argv[3]))]
    elif mode == "udp":
        result = udp_many(ip, port, int(argv[3]))
    elif mode == "udp-connected":
        result = udp_connected(ip, port)
    elif mode == "loop":
        result = loop(ip, port, argv[3], float(argv[4]))
    else:
        raise SystemExit(f"unknown mode {mode}")
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
