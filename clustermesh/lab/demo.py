"""The Star Wars demo's programs, run inside lab pod namespaces.

    python -m clustermesh.lab.demo serve --cluster lab-1 --pod rebel-base-1 [--port 80]
    python -m clustermesh.lab.demo xwing --url http://CLUSTER_IP/ --count 10

``serve`` answers every GET with the galaxy's status and who answered (the
rebel-base of Cilium's demo, in Python); ``xwing`` makes COUNT requests, each
on a new connection, and prints one JSON line per answer and a summary.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def serve(cluster: str, pod: str, port: int) -> None:
    body = json.dumps({"Galaxy": "Alderaan", "Cluster": cluster, "Pod": pod}).encode() + b"\n"

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    print("ready", flush=True)
    server.serve_forever()


def xwing(url: str, count: int, timeout: float) -> int:
    clusters: Counter[str] = Counter()
    failures = 0
    for _ in range(count):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                answer = json.loads(resp.read())
            clusters[answer.get("Cluster", "?")] += 1
            print(json.dumps(answer), flush=True)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            failures += 1
            reason = getattr(exc, "reason", exc)
            print(json.dumps({"error": str(reason)}), flush=True)
        time.sleep(0.05)
    print(json.dumps({"summary": dict(clusters), "failed": failures}), flush=True)
    return 0 if failures == 0 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clustermesh.lab.demo")
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--cluster", required=True)
    s.add_argument("--pod", required=True)
    s.add_argument("--port", type=int, default=80)
    x = sub.add_parser("xwing")
    x.add_argument("--url", required=True)
    x.add_argument("--count", type=int, default=10)
    x.add_argument("--timeout", type=float, default=2.0)
    args = parser.parse_args(argv)
    socket.setdefaulttimeout(10)
    if args.cmd == "serve":
        serve(args.cluster, args.pod, args.port)
        return 0
    return xwing(args.url, args.count, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
