"""Backends for the datapath tests; runs inside the test's backend netns.

Usage: _servers.py NAME=IP [NAME=IP ...]   (IPv4 or IPv6 addresses)
Each backend answers on IP:8080/tcp with a tiny HTTP response whose body is its
NAME, and on IP:5353/udp with its NAME. Prints "ready" once every socket is
bound, then serves until killed. Standalone on purpose: it starts fast.
"""

from __future__ import annotations

import socket
import sys
import threading

TCP_PORT = 8080
UDP_PORT = 5353


def serve_tcp(sock: socket.socket, name: str) -> None:
    body = f"{name}\n".encode()
    reply = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    while True:
        conn, _ = sock.accept()
        with conn:
            conn.settimeout(2)
            try:
                conn.recv(4096)
                conn.sendall(reply)
            except OSError:
                pass


def serve_udp(sock: socket.socket, name: str) -> None:
    while True:
        _, peer = sock.recvfrom(2048)
        sock.sendto(name.encode(), peer)


def main(argv: list[str]) -> int:
    threads = []
    for arg in argv:
        name, ip = arg.split("=", 1)
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        tcp = socket.socket(family, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind((ip, TCP_PORT))
        tcp.listen(512)
        udp = socket.socket(family, socket.SOCK_DGRAM)
        udp.bind((ip, UDP_PORT))
        threads += [
            threading.Thread(target=serve_tcp, args=(tcp, name), daemon=True),
            threading.Thread(target=serve_udp, args=(udp, name), daemon=True),
        ]
    for thread in threads:
        thread.start()
    print("ready", flush=True)
    threading.Event().wait()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
