"""The node agent's Kubernetes client: asyncio, aiohttp, one session, token auth.

Enough for a kubelet: get/list/create/patch/delete, and list-then-watch that resumes
from the last resourceVersion and lists again when the server says it is too old.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

log = logging.getLogger(__name__)
Obj = dict[str, Any]


class APIError(Exception):
    def __init__(self, status: int, body: str, what: str = "") -> None:
        super().__init__(f"{what}: {status} {body[:300]}" if what else f"{status} {body[:300]}")
        self.status = status


class NodeAPI:
    def __init__(self, server: str, token: str, ca_file: str) -> None:
        self.server = server.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        self._ssl = ssl.create_default_context(cafile=ca_file)
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_kubeconfig(cls, path: str, context: str | None = None) -> NodeAPI:
        config = json.loads(Path(path).read_text()) if path.endswith(".json") else _yaml(path)
        ctx_name = context or config.get("current-context")
        ctx = next(c["context"] for c in config["contexts"] if c["name"] == ctx_name)
        cluster = next(c["cluster"] for c in config["clusters"] if c["name"] == ctx["cluster"])
        user = next(u["user"] for u in config["users"] if u["name"] == ctx["user"])
        return cls(cluster["server"], user["token"], cluster["certificate-authority"])

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers=self._headers, connector=aiohttp.TCPConnector(ssl=self._ssl, limit=20),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(self, method: str, path: str, body: Any = None,
                      content_type: str = "application/json", timeout: float = 15.0) -> Any:
        headers = {"Content-Type": content_type} if body is not None else {}
        data = json.dumps(body) if body is not None else None
        try:
            async with self.session().request(method, self.server + path, data=data, headers=headers,
                                              timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                text = await resp.text()
        except (aiohttp.ClientError, TimeoutError) as exc:  # status 0: no answer (server down or restarting)
            raise APIError(0, str(exc) or type(exc).__name__, f"{method} {path}") from exc
        if resp.status >= 300:
            raise APIError(resp.status, text, f"{method} {path}")
        return json.loads(text) if text else None

    async def get(self, path: str) -> Any:
        return await self.request("GET", path)

    async def get_or_none(self, path: str) -> Any:
        try:
            return await self.request("GET", path)
        except APIError as exc:
            if exc.status == 404:
                return None
            raise

    async def patch(self, path: str, body: Any, kind: str = "strategic") -> Any:
        types = {"strategic": "application/strategic-merge-patch+json", "merge": "application/merge-patch+json"}
        return await self.request("PATCH", path, body, types[kind])

    async def watch(self, path: str, query: str = "") -> AsyncIterator[tuple[str, Obj]]:
        """List, then watch; yields ("SYNC", list) after every listing, then (type, object)
        events. Runs until cancelled; connection errors are retried with a short backoff."""
        sep = "&" if query else ""
        rv = ""
        delay = 0.5
        while True:
            try:
                if not rv:
                    listing = await self.request("GET", f"{path}?{query}", timeout=60)
                    rv = listing["metadata"]["resourceVersion"]
                    yield "SYNC", listing
                url = (f"{self.server}{path}?{query}{sep}watch=1&allowWatchBookmarks=true"
                       f"&resourceVersion={rv}&timeoutSeconds=300")
                async with self.session().get(url, timeout=aiohttp.ClientTimeout(total=None, sock_read=330)) as resp:
                    if resp.status != 200:
                        raise APIError(resp.status, await resp.text(), f"watch {path}")
                    delay = 0.5
                    async for line in resp.content:
                        if not line.strip():
                            continue
                        event = json.loads(line)
                        obj = event.get("object", {})
                        if event.get("type") == "ERROR":
                            if obj.get("code") == 410:  # too old: list again
                                rv = ""
                            break
                        rv = obj.get("metadata", {}).get("resourceVersion", rv)
                        if event["type"] != "BOOKMARK":
                            yield event["type"], obj
            except asyncio.CancelledError:
                raise
            except (TimeoutError, aiohttp.ClientError, APIError, ValueError) as exc:
                if isinstance(exc, APIError) and exc.status == 410:
                    rv = ""
                log.warning("watch %s: %s; retrying in %.1fs", path, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)


def _yaml(path: str) -> Obj:
    import yaml

    data: Obj = yaml.safe_load(Path(path).read_text())
    return data
