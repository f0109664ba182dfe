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
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlparse

# gRPC's fork handlers abort a child forked while other threads are in gRPC calls (pyroute2
# forks to open a netlink socket in another network namespace, while watches run): nothing
# here forks to use gRPC in the child, so they are off before grpc is first imported.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

import etcd3
import etcd3.exceptions
import etcd3.transactions
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
class StoreId:
    """Which etcd answered (cluster and member ID from the response header): a store
    replaced behind the same address, or another replica behind a Service, has another."""

    cluster: int
    member: int

    def __str__(self) -> str:
        return f"{self.cluster:x}/{self.member:x}"


@dataclass(frozen=True)
class Listing:
    items: dict[str, KeyValue]
    revision: int
    store: StoreId | None = None


@dataclass(frozen=True)
class PrefixSummary:
    """How many keys a prefix holds and the newest change among them, read at ``revision``:
    enough to tell whether a watch on the prefix has kept up, without reading any value."""

    count: int
    newest: int
    """The highest mod_revision under the prefix (0: it is empty)."""
    revision: int


@dataclass(frozen=True)
class StoreView:
    """What a probe saw: the store's revision and identity."""

    revision: int
    store: StoreId


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


def _store_of(header: Any) -> StoreId:
    return StoreId(int(header.cluster_id), int(header.member_id))


def _text(raw: bytes | str | None) -> str | None:
    if raw is None:
        return None
    return raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw


class KVClient:
    """A small, typed, synchronous etcd v3 client.

    Blocking calls; async callers use ``asyncio.to_thread``. Thread-safe as
    far as the underlying gRPC channel is.

    A *session* is one gRPC channel and, with a user, one login. Every failed call ends
    the session it ran on, so the next call opens a new connection (and logs in again)
    and, with several endpoints, tries the next one in order. A store replaced behind
    the same address does not know the old login token: etcd 3.4 holds a request with
    a token from the future (``<random>.<raft index>``) until its deadline, so the
    refusal looks like a timeout, never like an auth error. Ending the session on any
    failure (a broken watch stream too) is what makes such a reader log in again.
    """

    def __init__(
        self,
        endpoint: Endpoint | str | Sequence[Endpoint | str],
        timeout: float = 5.0,
        prefix: str = "",
        user: str | None = None,
        password: str | None = None,
    ) -> None:
        """``prefix`` is prepended to every key sent and removed from every key read, the
        way ``etcd grpc-proxy --namespace`` does: a store written with prefix P is read
        through a proxy with ``--namespace=P`` in the plain ``cilium/...`` layout.

        ``endpoint`` may be several: the first is used until a call fails, then the next."""
        given = [endpoint] if isinstance(endpoint, Endpoint | str) else list(endpoint)
        if not given:
            raise KVStoreError("no etcd endpoint given")
        self.endpoints = tuple(Endpoint.parse(e) if isinstance(e, str) else e for e in given)
        self._current = 0
        self.timeout = timeout
        self.prefix = prefix
        self._user = user
        self._password = password
        self._lock = threading.Lock()
        self._etcd: Any = None
        self._generation = 0
        self.sessions = 0
        """How many sessions (connections, logins) this client opened: a test's window on re-logins."""

    @property
    def endpoint(self) -> Endpoint:
        """The endpoint in use (or tried next)."""
        return self.endpoints[self._current]

    def _session(self) -> tuple[Any, int]:
        """The etcd3 client of the current session and its generation; opens one when there is
        none (with a user it logs in, and the remote may be down when we start)."""
        with self._lock:
            if self._etcd is None:
                try:
                    self._etcd = self._connect(self.endpoint)
                except KVStoreError:
                    self._advance()
                    raise
                self._generation += 1
                self.sessions += 1
            return self._etcd, self._generation

    @property
    def _client(self) -> Any:
        return self._session()[0]

    def _advance(self) -> None:
        self._current = (self._current + 1) % len(self.endpoints)

    def _end_session(self, generation: int, next_endpoint: bool) -> None:
        """End session ``generation`` if it is still the current one: the next call connects
        (and logs in) again, on the next endpoint when ``next_endpoint``."""
        with self._lock:
            if generation != self._generation or self._etcd is None:
                return
            old, self._etcd = self._etcd, None
            if next_endpoint:
                self._advance()
        with contextlib.suppress(Exception):  # closing a broken channel must never mask the real error
            old.close()

    def _connect(self, endpoint: Endpoint) -> Any:
        if (self._user is None) != (self._password is None):
            raise KVStoreError(f"etcd {endpoint}: give both a user and a password, or neither")
        try:
            client = etcd3.client(
                host=endpoint.host,
                port=endpoint.port,
                ca_cert=endpoint.ca_cert,
                cert_key=endpoint.key_file,
                cert_cert=endpoint.cert_file,
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
            raise _translate(exc, f"connect as {self._user}", endpoint) from exc
        # The client benches an endpoint for 5 minutes after one failed call; with a
        # single etcd that is 5 minutes of refusing to even try. Retry at once instead.
        for ep in getattr(client, "endpoints", {}).values():
            ep.time_retry = 0.0
        return client

    def _call(self, what: str, fn: Callable[[Any], Any]) -> Any:
        """``fn(etcd3 client)`` on the current session; a failure ends the session."""
        for attempt in (1, 2):
            client, generation = self._session()
            try:
                return fn(client)
            except (etcd3.exceptions.Etcd3Exception, grpc.RpcError) as exc:
                auth = bool(self._user) and _unauthenticated(exc)
                error = _translate(exc, what, self.endpoints[self._current])
                self._end_session(generation, next_endpoint=isinstance(error, KVUnavailable) and not auth)
                if attempt == 1 and auth:
                    continue  # the token expired (--auth-token-ttl) or the store is new: log in again, once
                raise error from exc
            except ValueError as exc:  # the client's "failed node" state
                self._end_session(generation, next_endpoint=True)
                raise KVUnavailable(f"{what} on etcd {self.endpoint}: {exc}") from exc
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            generation = self._generation
        self._end_session(generation, next_endpoint=False)

    def __enter__(self) -> KVClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ KV

    def get(self, key: str) -> str | None:
        value, _meta = self._call(f"get {key}", lambda c: c.get(self.prefix + key))
        return _text(value)

    def list_prefix(self, prefix: str) -> Listing:
        """All keys under ``prefix`` and the store revision they were read at."""
        if self.prefix + prefix:
            resp = self._call(f"list {prefix}", lambda c: c.get_prefix_response(self.prefix + prefix))
        else:  # etcd refuses an empty key; the whole keyspace is the range \0..\0
            resp = self._call("list everything", lambda c: c.get_all_response())
        items = {}
        for kv in resp.kvs:
            key = (_text(kv.key) or "")[len(self.prefix) :]
            items[key] = KeyValue(key, _text(kv.value) or "", kv.mod_revision, kv.lease)
        return Listing(items, resp.header.revision, _store_of(resp.header))

    def count_prefix(self, prefix: str) -> int:
        """How many keys are under ``prefix``, without reading their values (etcd's
        count_only): cheap against a store with 10,000 records."""
        resp = self._call(f"count {prefix}", lambda c: c.get_prefix_response(self.prefix + prefix, count_only=True))
        return int(resp.count)

    def summarize_prefix(self, prefix: str) -> PrefixSummary:
        """The count of keys under ``prefix`` and the newest mod_revision among them, in one
        linearizable range of at most one key (sorted by mod_revision, keys only)."""
        resp = self._call(f"summarize {prefix}", lambda c: c.get_prefix_response(
            self.prefix + prefix, keys_only=True, limit=1, sort_target="mod", sort_order="descend"))
        newest = int(resp.kvs[0].mod_revision) if resp.kvs else 0
        return PrefixSummary(int(resp.count), newest, int(resp.header.revision))

    def probe(self, key: str, timeout: float) -> StoreView:
        """Is the store answering? One linearizable count of ``key`` with its own deadline
        (a frozen proxy keeps TCP up and answers nothing, so only a deadline tells).
        Returns the store's revision and identity: a lower revision than one seen before,
        or another member, means the store behind the proxy was replaced."""
        def call(client: Any) -> Any:
            request = client._build_get_range_request(self.prefix + key, count_only=True)
            return client.kvstub.Range(request, timeout, credentials=client.call_credentials,
                                       metadata=client.metadata)
        resp = self._call(f"probe {key}", call)
        return StoreView(int(resp.header.revision), _store_of(resp.header))

    def put(self, key: str, value: str, lease: int | None = None) -> None:
        self._call(f"put {key}", lambda c: c.put(self.prefix + key, value, lease=lease))

    def apply(self, puts: dict[str, str], deletes: list[str], lease: int | None = None) -> None:
        """Many puts and deletes in as few round trips as etcd allows: one txn per
        128 operations or about 1 MiB, whichever comes first."""
        p = self.prefix
        chunk: list[Any] = []
        size = 0

        def flush() -> None:
            nonlocal chunk, size
            if chunk:
                ops = chunk
                self._call(f"txn of {len(ops)} ops", lambda c: c.transaction(compare=[], success=ops, failure=[]))
            chunk, size = [], 0

        ops = [(etcd3.transactions.Put(p + k, v, lease=lease), len(k) + len(v)) for k, v in puts.items()]
        ops += [(etcd3.transactions.Delete(p + k), len(k)) for k in deletes]
        for op, op_size in ops:
            if chunk and (len(chunk) >= MAX_TXN_OPS or size + op_size > MAX_TXN_BYTES):
                flush()
            chunk.append(op)
            size += op_size
        flush()

    def delete(self, key: str) -> bool:
        return bool(self._call(f"delete {key}", lambda c: c.delete(self.prefix + key)))

    def delete_prefix(self, prefix: str) -> int:
        resp = self._call(f"delete {prefix}*", lambda c: c.delete_prefix(self.prefix + prefix))
        return int(getattr(resp, "deleted", 0))

    def revision(self) -> int:
        resp = self._call("revision", lambda c: c.get_response("\0"))
        return int(resp.header.revision)

    def status(self) -> dict[str, Any]:
        st = self._call("status", lambda c: c.status())
        return {"version": st.version, "db_size": st.db_size, "raft_index": st.raft_index}

    # ------------------------------------------------------------ leases

    def grant_lease(self, ttl: int) -> int:
        lease = self._call(f"grant lease ttl={ttl}", lambda c: c.lease(ttl))
        return int(lease.id)

    def keepalive(self, lease_id: int) -> int:
        """Refresh a lease once; return its new TTL (0 or less: the lease is gone)."""
        responses = self._call(f"keep-alive lease {lease_id:x}", lambda c: list(c.refresh_lease(lease_id)))
        return int(responses[0].TTL) if responses else 0

    def lease_ttl(self, lease_id: int) -> int:
        """Remaining TTL; -1 when the lease does not exist (expired or revoked)."""
        info = self._call(f"lease info {lease_id:x}", lambda c: c.get_lease_info(lease_id))
        return int(info.TTL)

    def revoke_lease(self, lease_id: int) -> None:
        self._call(f"revoke lease {lease_id:x}", lambda c: c.revoke_lease(lease_id))

    # ------------------------------------------------------------ watch

    def watch_prefix(self, prefix: str, start_revision: int | None = None) -> Watch:
        kwargs: dict[str, Any] = {}
        if start_revision is not None:
            kwargs["start_revision"] = start_revision
        with self._lock:
            generation = self._generation
        responses, cancel = self._call(
            f"watch {prefix}", lambda c: c.watch_prefix_response(self.prefix + prefix, **kwargs)
        )
        # A stream that breaks ends its session too: what answers next may be another etcd.
        return Watch(responses, cancel, self.endpoint, prefix, strip=len(self.prefix),
                     on_error=lambda: self._end_session(generation, next_endpoint=True))


class Watch:
    """An iterator of :class:`WatchEvent`; ``cancel()`` ends it from any thread."""

    def __init__(
        self, responses: Iterator[Any], cancel: Callable[[], None], endpoint: Endpoint, prefix: str, strip: int = 0,
        on_error: Callable[[], None] = lambda: None,
    ) -> None:
        self._strip = strip
        self._on_error = on_error
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
            self._on_error()
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
