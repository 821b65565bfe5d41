"""Each use of a library's internals, against the real library: these fail when aiohttp,
asyncio, logging or botocore change underneath the gateway (the modules named
`*_internals`)."""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import weakref
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import BaseTestServer, TestServer
from botocore.credentials import Credentials, RefreshableCredentials
from botocore.exceptions import ConnectionClosedError
from botocore.session import get_session

from gateway.http.aiohttp_internals import requests_queued_behind, send_continue
from gateway.http.asyncio_internals import drop_read_callback, make_socket_transport
from gateway.telemetry.logging_internals import skip_caller_lookup
from storage_backends.s3.botocore_internals import StandardRetries, credentials_expiry


async def _exchange(server: BaseTestServer, raw: bytes) -> bytes:
    """Send `raw` in one write; everything the server answers until it closes."""
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(raw)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


def _post(body: bytes, extra: bytes = b"") -> bytes:
    head = b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n" % len(body)
    return head + extra + b"\r\n" + body


async def test_an_error_still_answers_after_a_100_continue() -> None:
    """aiohttp refuses to answer an error once `writer.output_size` says the answer began."""

    async def handler(request: web.Request) -> web.Response:
        await send_continue(request)
        await request.read()
        raise RuntimeError("a failure after the interim answer")

    app = web.Application()
    app.router.add_post("/", handler)
    async with TestServer(app) as server:
        answer = await _exchange(server, _post(b"abc", b"Connection: close\r\n"))
    assert answer.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 500 ")


@pytest.mark.parametrize(
    ("follows", "queued"), [(b"", False), (b"GET / HTTP/1.1\r\nHost: t\r\n\r\n", True)]
)
async def test_a_request_sent_behind_a_body_is_seen(follows: bytes, queued: bool) -> None:
    async def handler(request: web.Request) -> web.Response:
        await request.read()
        response = web.Response(text=f"queued={requests_queued_behind(request)}")
        response.force_close()  # one answer, then the connection ends
        return response

    app = web.Application()
    app.router.add_post("/", handler)
    app.router.add_get("/", handler)
    async with TestServer(app) as server:
        answer = await _exchange(server, _post(b"abc") + follows)
    assert f"queued={queued}".encode() in answer


async def test_a_transport_made_around_an_accepted_socket_serves_aiohttp() -> None:
    """make_socket_transport: connection_made comes at the next turn with the transport,
    before any read, and the transport carries the peer and the socket (sendfile's)."""

    async def handler(request: web.Request) -> web.Response:
        return web.Response(text=f"ok {request.remote}")

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    try:
        theirs.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        assert runner.server is not None
        protocol = runner.server()  # aiohttp's protocol, as the acceptor makes it
        loop = asyncio.get_running_loop()
        transport = make_socket_transport(loop, ours, protocol, ("10.0.0.9", 4711))
        assert transport.get_extra_info("peername") == ("10.0.0.9", 4711)
        assert transport.get_extra_info("socket") is not None
        theirs.setblocking(False)
        answer = await asyncio.wait_for(_read_all(loop, theirs), 10)
    finally:
        theirs.close()
        await runner.cleanup()
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"ok 10.0.0.9")


async def _read_all(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    answer = b""
    while chunk := await loop.sock_recv(sock, 4096):
        answer += chunk
    return answer


@pytest.fixture
def caller_lookup_restored() -> Iterator[None]:
    saved = logging._srcfile
    yield
    logging._srcfile = saved


def test_records_skip_the_caller_lookup(caller_lookup_restored: None) -> None:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    logger = logging.getLogger("tests.library_internals")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("with the lookup")
        skip_caller_lookup()
        logger.warning("without it")
    finally:
        logger.removeHandler(handler)
    assert records[0].pathname == __file__
    assert (records[1].pathname, records[1].lineno) == ("(unknown file)", 0)


def test_temporary_credentials_say_when_they_expire() -> None:
    expiry = datetime.now(UTC).replace(microsecond=0) + timedelta(minutes=20)
    temporary = RefreshableCredentials.create_from_metadata(
        {
            "access_key": "AKIDEXAMPLE",
            "secret_key": "secret",
            "token": "token",
            "expiry_time": expiry.isoformat(),
        },
        refresh_using=lambda: {},
        method="assume-role",
    )
    assert credentials_expiry(temporary) == expiry
    assert credentials_expiry(Credentials("AKIDEXAMPLE", "secret")) is None


def _error(code: str) -> bytes:
    return f"<Error><Code>{code}</Code><Message>m</Message></Error>".encode()


def test_standard_retries_decide_as_botocore_does() -> None:
    """botocore's standard-mode parts, driven outside a client (the classes, their
    arguments and the quota's bookkeeping are what change with botocore)."""
    retries = StandardRetries(3, get_session().get_service_model("s3"))

    def delay(status: int | None, body: bytes = b"", attempt: int = 1, **kw: Any) -> Any:
        return retries.delay("DeleteObject", attempt, {}, status, {}, body, **kw)

    assert delay(503, _error("SlowDown")) is not None
    assert delay(400, _error("RequestTimeout")) is not None
    assert delay(500) is not None  # a bodiless 5xx, as a HEAD's
    assert delay(None, error=ConnectionClosedError(endpoint_url="u")) is not None
    assert delay(403, _error("AccessDenied")) is None
    assert delay(204) is None
    assert delay(503, _error("SlowDown"), attempt=3) is None  # the attempts are used up
    # a failing store drains the quota (bounded: botocore's is 500, a retry costs 5 to 14)
    taken = 0
    while delay(500) is not None:
        taken += 1
        assert taken < 500
    assert taken > 10
    # successes refill it (each without a retry gives back a little): retries come back
    for _ in range(14):
        retries.answered({}, 200)
    assert delay(500) is not None


async def test_a_closed_transport_is_freed_without_the_cycle_collector() -> None:
    """Python 3.11's socket transport holds its read callback as a bound method of itself:
    without drop_read_callback each closed connection's transport waits for a collection
    (the slowloris flood's 22 ms pauses). With it, reference counting frees it at once."""
    gone: list[weakref.ref[asyncio.BaseTransport]] = []
    closed = asyncio.Event()

    class Dropping(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            gone.append(weakref.ref(transport))
            transport.abort()
            drop_read_callback(transport)

        def connection_lost(self, exc: Exception | None) -> None:
            asyncio.get_running_loop().call_soon(closed.set)  # after the transport's own

    server = await asyncio.get_running_loop().create_server(Dropping, "127.0.0.1", 0)
    gc.disable()
    try:
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.wait_for(closed.wait(), 10)
        writer.close()
        await asyncio.sleep(0)  # one more turn of the loop: its last callback has run
        assert gone and gone[0]() is None, "the transport is kept alive by a cycle"
    finally:
        gc.enable()
        server.close()
        await server.wait_closed()
