"""Prometheus metrics and the /healthz endpoint, shared by the operator and the agent."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

log = logging.getLogger(__name__)

EXPORTS = Counter(
    "clustermesh_operator_exports_total",
    "Records written to or deleted from the state store.",
    ["kind", "op"],
)
SKIPPED_WRITES = Counter(
    "clustermesh_operator_skipped_writes_total",
    "Writes skipped because the stored JSON would not change.",
)
ERRORS = Counter(
    "clustermesh_errors_total",
    "Problems met and survived: bad input, unreachable store, API failures.",
    ["component", "kind"],
)
ETCD_LATENCY = Histogram(
    "clustermesh_etcd_request_seconds",
    "Duration of state-store requests.",
    ["op"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
QUEUE_DEPTH = Gauge(
    "clustermesh_operator_queue_depth",
    "Keys whose desired value is not yet in the store.",
)
EXPORTED = Gauge(
    "clustermesh_operator_exported",
    "Records this cluster currently exports.",
    ["kind"],
)
STORE_REACHABLE = Gauge(
    "clustermesh_store_reachable",
    "1 when the last state-store request succeeded.",
)

CERTIFICATE_EXPIRY = Gauge(
    "clustermesh_certificate_expiry_timestamp_seconds",
    "When each certificate this process uses stops being valid (Unix time): alert well before it.",
    ["certificate"],
)

DATAPATH_MAP_FULL = Counter(
    "clustermesh_datapath_map_full_total",
    "Desired states refused (nothing written) because a socket-LB map is too small.",
    ["map"],
)
DATAPATH_MAP_CAPACITY = Gauge(
    "clustermesh_datapath_map_capacity",
    "max_entries of each socket-LB map the agent writes.",
    ["map"],
)


class _Handler(BaseHTTPRequestHandler):
    health: Callable[[], tuple[bool, str]] = staticmethod(lambda: (True, "ok"))
    ready: Callable[[], tuple[bool, str]] | None = None

    def do_GET(self) -> None:
        if self.path.startswith("/metrics"):
            body, status, ctype = generate_latest(), 200, CONTENT_TYPE_LATEST
        elif self.path.startswith("/healthz") or self.path.startswith("/readyz"):
            check = self.ready if self.path.startswith("/readyz") and self.ready else self.health
            ok, text = check()
            body, status, ctype = (text + "\n").encode(), 200 if ok else 503, "text/plain"
        else:
            body, status, ctype = b"not found: try /metrics, /healthz or /readyz\n", 404, "text/plain"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("metrics http: " + format, *args)


def serve(
    host: str, port: int, health: Callable[[], tuple[bool, str]],
    ready: Callable[[], tuple[bool, str]] | None = None,
) -> ThreadingHTTPServer:
    """Serve /metrics, /healthz (alive: ``health``) and /readyz (serving: ``ready``, or
    ``health`` when not given) from a daemon thread; each check returns (ok, text)."""
    handler = type("Handler", (_Handler,), {"health": staticmethod(health),
                                            "ready": staticmethod(ready) if ready else None})
    server = ThreadingHTTPServer((host, port), handler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    log.info("metrics, /healthz and /readyz on http://%s:%d", host, server.server_address[1])
    return server
