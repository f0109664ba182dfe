"""The API forwarder of a lab node: listening sockets in the node's network namespace (127.0.0.1 and the
kubernetes Service's address, on the API port) whose connections go to the API server on the host's
127.0.0.1: kube-proxy's kubeconfig and hostNetwork pods reach the API server through it."""

from __future__ import annotations

import asyncio
import contextlib
import socket

from clustermesh.lab.netns import API_VIP, socket_in_netns


async def start_api_forwarder(netns: str, api_port: int) -> list[asyncio.AbstractServer]:
    listeners = []
    for address in ("127.0.0.1", API_VIP):  # kube-proxy's kubeconfig; pods via the kubernetes Service
        listener = socket_in_netns(netns)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((address, api_port))
        listener.listen(64)
        listener.setblocking(False)
        listeners.append(listener)

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()  # half-close: the answer still flows the other way
        except (OSError, asyncio.IncompleteReadError):
            pass

    async def handle(r1: asyncio.StreamReader, w1: asyncio.StreamWriter) -> None:
        try:
            r2, w2 = await asyncio.open_connection("127.0.0.1", api_port)
        except OSError:
            w1.close()
            return
        try:
            await asyncio.gather(pipe(r1, w2), pipe(r2, w1))
        finally:
            for w in (w1, w2):
                with contextlib.suppress(OSError):
                    w.close()

    return [await asyncio.start_server(handle, sock=listener) for listener in listeners]
