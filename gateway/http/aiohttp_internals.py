"""Every use of aiohttp's internals, in one place. Each has a test that fails when aiohttp
changes underneath it (tests/test_library_internals.py): the public API offers none of
them, and each is pinned by what the gateway needs, not by taste."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

from aiohttp import web

ProtocolFactory = Callable[[], asyncio.Protocol]


async def send_continue(request: web.Request) -> None:
    """`HTTP/1.1 100 Continue`, sent by a handler once its own checks passed.

    The interim answer goes through the response writer, which counts it in `output_size`;
    aiohttp reads a non-zero count as "the answer has started" and would then refuse to
    send an error answer for this request. The count is put back: the answer proper has
    not started."""
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0


def requests_queued_behind(request: web.Request) -> bool:
    """Whether bytes after this request's body were already received and parsed as a next
    request on its connection (aiohttp queues them in the protocol's `_messages`)."""
    return bool(getattr(request.protocol, "_messages", None))


class WrappedRunner(web.AppRunner):
    """An AppRunner whose sites get `wrap(aiohttp's protocol factory)`.

    Sites hand `runner.server` to `loop.create_server()`; there is no public hook between
    the two, so the property is overridden (a guard admits or refuses each connection)."""

    def __init__(
        self,
        app: web.Application,
        wrap: Callable[[ProtocolFactory], ProtocolFactory],
        **kwargs: Any,
    ) -> None:
        super().__init__(app, **kwargs)
        self._wrap = wrap

    @property
    def server(self) -> Any:
        inner = super().server
        return None if inner is None else self._wrap(inner)


def listening_sockets(site: web.BaseSite) -> list[socket.socket]:
    """A started site's listening sockets (aiohttp keeps the asyncio server in `_server`)."""
    server = site._server
    assert isinstance(server, asyncio.Server), "the site is not started"
    return list(server.sockets)


def listen_again(site: web.BaseSite, backlog: int) -> None:
    """Give a started site's listening sockets a kernel queue of `backlog` connections.

    asyncio passes create_server()'s `backlog` to listen() and also takes it as the number
    of connections to accept at each wake-up, before any protocol sees one; each takes a
    descriptor. A site is started with the burst the descriptors can absorb, then its
    sockets listen again (on a duplicate: the same socket) with the queue a flood needs."""
    for sock in listening_sockets(site):
        with sock.dup() as same:
            same.listen(backlog)
