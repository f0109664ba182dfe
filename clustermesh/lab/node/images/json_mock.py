"""The lab's ``cilium/json-mock``: a read-only JSON HTTP server, as the image's json-server is used.

The image serves a JSON file of collections on port 80: ``/db`` is the whole document, ``/NAME`` a
collection, ``/NAME/ID`` one item, anything else 404 with ``{}``; it logs one line per request on stdout.
Here ``/`` answers the whole document too, so a probe of ``localhost`` succeeds.

    python -m clustermesh.lab.node.images.json_mock [--port 80] [--host 0.0.0.0] [FILE]

json-server options the image's Pods may pass (``--watch``, ``--middlewares``, ...) are accepted and
ignored. SIGTERM and SIGINT stop it with status 0.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

DEFAULT_DB: dict[str, Any] = {
    "private": [{"id": 1, "body": "secret information"}],
    "public": [{"id": 1, "body": "public information"}],
}


def answer(db: dict[str, Any], path: str) -> tuple[int, Any]:
    """(status, JSON body) for a GET of ``path``."""
    parts = [p for p in urlsplit(path).path.split("/") if p]
    if not parts or parts == ["db"]:
        return 200, db
    collection = db.get(parts[0])
    if collection is None or len(parts) > 2:
        return 404, {}
    if len(parts) == 1:
        return 200, collection
    if isinstance(collection, list):
        for item in collection:
            if isinstance(item, dict) and str(item.get("id")) == parts[1]:
                return 200, item
    return 404, {}


def make_handler(db: dict[str, Any]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "json-mock"
        protocol_version = "HTTP/1.1"

        def _reply(self, status: int, body: Any, *, head: bool = False, allow: str = "") -> None:
            started = time.perf_counter()
            data = (json.dumps(body, indent=2) + "\n").encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            if allow:
                self.send_header("Allow", allow)
            took = (time.perf_counter() - started) * 1000
            # json-server's (morgan "dev") format: METHOD PATH STATUS TIME ms - BYTES. Logged before the
            # body goes out, so a request the client saw answered is always in the log.
            print(f"{self.command} {self.path} {status} {took:.3f} ms - {len(data)}", flush=True)
            self.end_headers()
            if not head:
                self.wfile.write(data)

        def do_GET(self) -> None:
            self._reply(*answer(db, self.path))

        def do_HEAD(self) -> None:
            status, body = answer(db, self.path)
            self._reply(status, body, head=True)

        def _read_only(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            self._reply(405, {}, allow="GET, HEAD")

        do_POST = do_PUT = do_PATCH = do_DELETE = _read_only

        def version_string(self) -> str:
            return self.server_version

        def log_message(self, format: str, *args: Any) -> None:  # one line per request is _reply's
            pass

    return Handler


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="json-mock", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", nargs="?", help="a JSON file of collections (default: the image's)")
    parser.add_argument("--port", "-p", type=int, default=80)
    parser.add_argument("--host", "-H", default="0.0.0.0", help="address to listen on; '' means every one")
    parser.add_argument("--watch", "-w", action="store_true", help="accepted for json-server compatibility")
    # json-server options that take a value, accepted (so their value is not taken for the source) and ignored
    for flags in (("--middlewares", "-m"), ("--routes", "-r"), ("--config", "-c"), ("--static", "-s"),
                  ("--delay", "-d"), ("--id", "-i"), ("--foreignKeySuffix", "--fks"), ("--snapshots", "-S")):
        parser.add_argument(*flags, dest=f"ignored_{flags[0][2:]}", action="append", help=argparse.SUPPRESS)
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    opts, ignored = parse_args(argv)
    # The image's own data file is /default.json; its content is DEFAULT_DB.
    source = None if opts.source in (None, "/default.json") else Path(opts.source)
    db = json.loads(source.read_text()) if source is not None else DEFAULT_DB
    ignored += [f"--{name.removeprefix('ignored_')}" for name, value in vars(opts).items()
                if name.startswith("ignored_") and value]
    if ignored:
        print(f"json-mock: ignoring json-server options {' '.join(ignored)}", file=sys.stderr, flush=True)

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server = ThreadingHTTPServer((opts.host or "0.0.0.0", opts.port), make_handler(db))
    server.daemon_threads = True
    host, port = opts.host or "0.0.0.0", server.server_address[1]
    print(f"json-mock: serving {', '.join(f'/{name}' for name in db)} on http://{host}:{port}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
