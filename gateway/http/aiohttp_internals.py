"""Every use of aiohttp's internals, in one place. Each has a test that fails when aiohttp
changes underneath it (tests/test_library_internals.py): the public API offers none of
them, and each is pinned by what the gateway needs, not by taste."""

from __future__ import annotations

from aiohttp import web


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
