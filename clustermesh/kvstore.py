"""The etcd boundary: the only module that imports the etcd client.

Everything above works with strings, plain events and our own exceptions, so
the client library (today ``cslab-etcd3``, which keeps python-etcd3's API and
imports with current protobuf) can be swapped here alone.

Keys and values are text (UTF-8). Leases and keep-alive must be sent to etcd
itself: etcd 3.4's grpc-proxy does not forward lease keep-alive streams.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlparse

import etcd3
import etcd3.exceptions
import grpc

log = logging.getLogger(__name__)

MAX_TXN_OPS = 128  # etcd's default --max-txn-ops
MAX_TXN_BYTES = 1024 * 1024  # etcd refuses requests over 1.5 MiB (--max-request-bytes)


class KVStoreError(Exception):
    """An etcd operation failed; ``str()`` says what and where."""


class KVUnavailable(KVStoreError):
    """etcd could not be reached (down, wrong address, network cut). Retry later."""


class LeaseNotFound(KVStoreError):
    """A write named a lease that etcd no longer has (expired, revoked, or the store was
    wiped): grant a new one and write again."""


class RevisionCompacted(KVStoreError):
    """A watch asked for a revision that etcd has compacted away: list again."""

    def __init__(self, compacted_revision: int) -> None:
        super().__init__(f"revision compacted up to {compacted_revision}; list again")
        self.compacted_revision = compacted_revision


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    ca_cert: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    @classmethod
    def parse(
        cls,
        url: str,
        ca_cert: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
    ) -> Endpoint:
        """``http://127.0.0.1:2379`` or ``https://host:port`` (with TLS files)."""
        parsed = urlparse(url if "://" in url else f"http://{url}")
        if not parsed.hostname or not parsed.port:
            raise KVStoreError(f"etcd endpoint {url!r} needs a host and a port, like http://127.0.0.1:2379")
        if parsed.scheme == "https" and not ca_cert:
            raise KVStoreError(f"etcd endpoint {url!r} is https: give the CA certificate too")
        return cls(parsed.hostname, parsed.port, ca_cert, cert_file, key_file)

    def __str__(self) -> str:
        scheme = "https" if self.ca_cert else "http"
        return f"{scheme}://{self.host}:{self.port}"


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: str
    mod_revision: int
    lease: int


@dataclass(frozen=True)
class WatchEvent:
    kind: Literal["put", "delete"]
    key: str
    value: str | None
    revision: int


@dataclass(frozen=True)
class Listing:
    items: dict[str, KeyValue]
    revision: int


_TRANSIENT_GRPC = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
}


def _translate(exc: BaseException, what: str, endpoint: Endpoint) -> KVStoreError:
    where = f"{what} on etcd {endpoint}"
    if isinstance(exc, etcd3.exceptions.RevisionCompactedError):
        return RevisionCompacted(exc.compacted_revision)
    if isinstance(
        exc,
        etcd3.exceptions.ConnectionFailedError
        | etcd3.exceptions.ConnectionTimeoutError
        | etcd3.exceptions.WatchTimedOut,
    ):
        return KVUnavailable(f"{where}: etcd unreachable ({exc.__class__.__name__}); is it running?")
    if isinstance(exc, grpc.RpcError):
        code = exc.code() if hasattr(exc, "code") else None
        details = exc.details() if hasattr(exc, "details") else ""
        if code == grpc.StatusCode.NOT_FOUND and "lease not found" in str(details):
            return LeaseNotFound(f"{where}: {details}")
        if code in _TRANSIENT_GRPC:
            return KVUnavailable(f"{where}: {code}")
        return KVStoreError(f"{where}: {code}: {exc.details() if hasattr(exc, 'details') else exc}")
    return KVStoreError(f"{where}: {exc.__class__.__name__}: {exc}")


def _unauthenticated(exc: BaseException) -> bool:
    code = exc.code() if isinstance(exc, grpc.RpcError) and hasattr(exc, "code") else None
    return code == grpc.StatusCode.UNAUTHENTICATED or "auth token" in str(exc)


def _text(raw: bytes | str | None) -> str | None:
    if raw is None:
        return None
    return raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw


class KVClient:
    """A small, typed, synchronous etcd v3 client.

    Blocking calls; async callers use ``asyncio.to_thread``. Thread-safe as
    far as the underlying gRPC channel is.
    """

    def __init__(
        self,
        endpoint: Endpoint | str,
        timeout: float = 5.0,
        prefix: str = "",
        user: str | None = None,
        password: str | None = None,
    ) -> None:
        """``prefix`` is prepended to every key sent and removed from every key read, the
        way ``etcd grpc-proxy --namespace`` does: a store written with prefix P is read
        through a proxy with ``--namespace=P`` in the plain ``cilium/...`` layout."""
        self.endpoint = Endpoint.parse(endpoint) if isinstance(endpoint, str) else endpoint
        self.timeout = timeout
        self.prefix = prefix
        self._user = user
        self._password = password
        self._lock = threading.Lock()
        self._etcd: Any = None

    @property
    def _client(self) -> Any:
        """The etcd3 client, made on first use: with a user it logs in, and the
        remote may be down when we start."""
        with self._lock:
            if self._etcd is None:
                self._etcd = self._connect()
            return self._etcd

    def _connect(self) -> Any:
        if (self._user is None) != (self._password is None):
            raise KVStoreError(f"etcd {self.endpoint}: give both a user and a password, or neither")
        try:
            client = etcd3.client(
                host=self.endpoint.host,
                port=self.endpoint.port,
                ca_cert=self.endpoint.ca_cert,
                cert_key=self.endpoint.key_file,
                cert_cert=self.endpoint.cert_file,
                timeout=self.timeout,
                user=self._user,
                password=self._password,
                # Notice a silently dropped connection (a watch would otherwise wait forever).
                grpc_options=[
                    ("grpc.keepalive_time_ms", 10_000),
                    ("grpc.keepalive_timeout_ms", 5_000),
                    # Only while a call (a watch) is open: etcd refuses idle pings.
                    ("grpc.keepalive_permit_without_calls", 0),
                ],
            )
        except (etcd3.exceptions.Etcd3Exception, grpc.RpcError) as exc:
            raise _translate(exc, f"connect as {self._user}", self.endpoint) from exc
        # The client benches an endpoint for 5 minutes after one failed call; with a
        # single etcd that is 5 minutes of refusing to even try. Retry at once instead.
        for ep in getattr(client, "endpoints", {}).values():
            ep.time_retry = 0.0
        return client

    def _reconnect(self) -> None:
        with self._lock:
            old, self._etcd = self._etcd, None
        if old is not None:
            with contextlib.suppress(Exception):
                old.close()

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        for attempt in (1, 2):
            try:
                return fn(*args, **kwargs)
            except (etcd3.exceptions.Etcd3Exception, grpc.RpcError) as exc:
                if attempt == 1 and self._user and _unauthenticated(exc):
                    # The login token expired (etcd's --auth-token-ttl): log in again, once.
                    self._reconnect()
                    fn = getattr(self._client, fn.__name__, fn)
                    continue
                raise _translate(exc, what, self.endpoint) from exc
            except ValueError as exc:  # the client's "failed node" state
                raise KVUnavailable(f"{what} on etcd {self.endpoint}: {exc}") from exc
        raise AssertionError("unreachable")

    def close(self) -> None:
        try:
            self._reconnect()
        except Exception:  # closing a broken channel must never mask the real error
            log.debug("closing etcd client for %s failed", self.endpoint, exc_info=True)

    def __enter__(self) -> KVClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ KV

    def get(self, key: str) -> str | None:
        value, _meta = self._call(f"get {key}", self._client.get, self.prefix + key)
        return _text(value)

    def list_prefix(self, prefix: str) -> Listing:
        """All keys under ``prefix`` and the store revision they were read at."""
        if self.prefix + prefix:
            resp = self._call(f"list {prefix}", self._client.get_prefix_response, self.prefix + prefix)
        else:  # etcd refuses an empty key; the whole keyspace is the range \0..\0
            resp = self._call("list everything", self._client.get_all_response)
        items = {}
        for kv in resp.kvs:
            key = (_text(kv.key) or "")[len(self.prefix) :]
            items[key] = KeyValue(key, _text(kv.value) or "", kv.mod_revision, kv.lease)
        return Listing(items, resp.header.revision)

    def count_prefix(self, prefix: str) -> int:
        """How many keys are under ``prefix``, without reading their values (etcd's
        count_only): cheap against a store with 10,000 records."""
        resp = self._call(f"count {prefix}", self._client.get_prefix_response, self.prefix + prefix,
                          count_only=True)
        return int(resp.count)

    def probe(self, key: str, timeout: float) -> int:
        """Is the store answering? One linearizable count of ``key`` with its own deadline
        (a frozen proxy keeps TCP up and answers nothing, so only a deadline tells).
        Returns the store's revision: lower than one seen before means the store behind a
        proxy was replaced."""
        def call() -> Any:
            client = self._client
            request = client._build_get_range_request(self.prefix + key, count_only=True)
            return client.kvstub.Range(request, timeout, credentials=client.call_credentials,
                                       metadata=client.metadata)
        resp = self._call(f"probe {key}", call)
        return int(resp.header.revision)

    def put(self, key: str, value: str, lease: int | None = None) -> None:
        self._call(f"put {key}", self._client.put, self.prefix + key, value, lease=lease)

    def apply(self, puts: dict[str, str], deletes: list[str], lease: int | None = None) -> None:
        """Many puts and deletes in as few round trips as etcd allows: one txn per
        128 operations or about 1 MiB, whichever comes first."""
        tx = self._client.transactions
        p = self.prefix
        chunk: list[Any] = []
        size = 0

        def flush() -> None:
            nonlocal chunk, size
            if chunk:
                self._call(f"txn of {len(chunk)} ops", self._client.transaction, compare=[], success=chunk,
                           failure=[])
            chunk, size = [], 0

        ops = [(tx.put(p + k, v, lease=lease), len(k) + len(v)) for k, v in puts.items()]
        ops += [(tx.delete(p + k), len(k)) for k in deletes]
        for op, op_size in ops:
            if chunk and (len(chunk) >= MAX_TXN_OPS or size + op_size > MAX_TXN_BYTES):
                flush()
            chunk.append(op)
            size += op_size
        flush()

    def delete(self, key: str) -> bool:
        return bool(self._call(f"delete {key}", self._client.delete, self.prefix + key))

    def delete_prefix(self, prefix: str) -> int:
        resp = self._call(f"delete {prefix}*", self._client.delete_prefix, self.prefix + prefix)
        return int(getattr(resp, "deleted", 0))

    def revision(self) -> int:
        resp = self._call("revision", self._client.get_response, "\0")
        return int(resp.header.revision)

    def status(self) -> dict[str, Any]:
        st = self._call("status", self._client.status)
        return {"version": st.version, "db_size": st.db_size, "raft_index": st.raft_index}

    # ------------------------------------------------------------ leases

    def grant_lease(self, ttl: int) -> int:
        lease = self._call(f"grant lease ttl={ttl}", self._client.lease, ttl)
        return int(lease.id)

    def keepalive(self, lease_id: int) -> int:
        """Refresh a lease once; return its new TTL (0 or less: the lease is gone)."""
        responses = self._call(
            f"keep-alive lease {lease_id:x}", lambda: list(self._client.refresh_lease(lease_id))
        )
        return int(responses[0].TTL) if responses else 0

    def lease_ttl(self, lease_id: int) -> int:
        """Remaining TTL; -1 when the lease does not exist (expired or revoked)."""
        info = self._call(f"lease info {lease_id:x}", self._client.get_lease_info, lease_id)
        return int(info.TTL)

    def revoke_lease(self, lease_id: int) -> None:
        self._call(f"revoke lease {lease_id:x}", self._client.revoke_lease, lease_id)

    # ------------------------------------------------------------ watch

    def watch_prefix(self, prefix: str, start_revision: int | None = None) -> Watch:
        kwargs: dict[str, Any] = {}
        if start_revision is not None:
            kwargs["start_revision"] = start_revision
        responses, cancel = self._call(
            f"watch {prefix}", self._client.watch_prefix_response, self.prefix + prefix, **kwargs
        )
        return Watch(responses, cancel, self.endpoint, prefix, strip=len(self.prefix))


class Watch:
    """An iterator of :class:`WatchEvent`; ``cancel()`` ends it from any thread."""

    def __init__(
        self, responses: Iterator[Any], cancel: Callable[[], None], endpoint: Endpoint, prefix: str, strip: int = 0
    ) -> None:
        self._strip = strip
        self._responses = responses
        self._cancel = cancel
        self._endpoint = endpoint
        self._prefix = prefix
        self._cancelled = False

    def cancel(self) -> None:
        if not self._cancelled:
            self._cancelled = True
            try:
                self._cancel()
            except Exception:  # the channel may already be gone; the iterator ends anyway
                log.debug("cancelling watch %s failed", self._prefix, exc_info=True)

    def __iter__(self) -> Iterator[WatchEvent]:
        try:
            for resp in self._responses:
                for ev in resp.events:
                    key = (_text(ev.key) or "")[self._strip :]
                    if isinstance(ev, etcd3.events.DeleteEvent):
                        yield WatchEvent("delete", key, None, ev.mod_revision)
                    else:
                        yield WatchEvent("put", key, _text(ev.value), ev.mod_revision)
        except (etcd3.exceptions.Etcd3Exception, grpc.RpcError) as exc:
            if self._cancelled:
                return
            raise _translate(exc, f"watch {self._prefix}", self._endpoint) from exc


class LeaseKeeper:
    """Keeps one lease alive from a background thread, like etcd's concurrency.Session.

    ``lost`` is set when a refresh finds the lease gone (expired while etcd
    or we were unreachable): the owner must grant a new lease and rewrite its
    keys. ``close()`` stops refreshing and revokes the lease.
    """

    def __init__(self, client: KVClient, ttl: int, on_lost: Callable[[int], None] | None = None) -> None:
        self.client = client
        self.ttl = ttl
        self.lease_id = client.grant_lease(ttl)
        self.lost = threading.Event()
        self._on_lost = on_lost
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"etcd-lease-{self.lease_id:x}", daemon=True
        )
        self._thread.start()

    KEEPALIVE_MAX_INTERVAL = 30.0
    """Seconds. A third of the TTL (Cilium's factor), but at most this: with a 15-minute
    lease, a lease lost to a wiped store is noticed in half a minute, not five."""

    def _run(self) -> None:
        interval = min(max(self.ttl / 3.0, 0.5), self.KEEPALIVE_MAX_INTERVAL)
        wait = interval
        failures = 0
        while not self._stop.wait(wait):
            try:
                ttl = self.client.keepalive(self.lease_id)
            except KVStoreError as exc:
                failures += 1
                if failures == 1:
                    log.warning("lease %x keep-alive failed, retrying: %s", self.lease_id, exc)
                wait = min(0.5, interval)  # a full interval more could outlast the lease
                continue
            if failures:
                log.info("lease %x keep-alive works again after %d failures", self.lease_id, failures)
            failures, wait = 0, interval
            if ttl <= 0:
                log.warning("lease %x expired; its keys are gone and must be rewritten", self.lease_id)
                self.lost.set()
                if self._on_lost:
                    self._on_lost(self.lease_id)
                return

    def close(self, revoke: bool = True) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if revoke and not self.lost.is_set():
            try:
                self.client.revoke_lease(self.lease_id)
            except KVStoreError as exc:
                log.warning("could not revoke lease %x (it will expire by itself): %s", self.lease_id, exc)
