"""A small TCP proxy that sits between the gateway and the S3 server and misbehaves on demand."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections import Counter
from dataclasses import dataclass, field

_METHODS = {b"GET", b"HEAD", b"PUT", b"POST", b"DELETE"}


@dataclass(frozen=True)
class S3Answer:
    """An answer the proxy gives itself instead of relaying a request: S3's error document
    with this status and code (a HEAD's carries no body, as S3's does not)."""

    status: int
    code: str = ""

    def render(self, method: bytes) -> bytes:
        body = b""
        if self.code:
            body = (
                b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>%s</Code>'
                b"<Message>from the fault proxy</Message></Error>" % self.code.encode()
            )
        head = b"HTTP/1.1 %d Fault\r\nContent-Type: application/xml\r\n" % self.status
        head += b"Content-Length: %d\r\n\r\n" % len(body)
        return head if method == b"HEAD" else head + body


RESET = S3Answer(0)  # no answer: the connection is reset instead


@dataclass
class Faults:
    delay: float = 0.0  # before relaying each chunk of a response
    drop: bool = False  # accept, read, never answer (new and kept-alive connections)
    reset_after_bytes: int | None = None  # reset the client once this much of a response passed
    trickle: float = 0.0  # seconds between single bytes of the response
    # let this many requests through untouched, then reset the client instead of relaying
    # any later response (the upstream has still processed the request)
    reset_responses_after: int | None = None
    # let this many requests through, then swallow every later one: never relayed upstream
    swallow_requests_after: int | None = None
    # Bodiless requests answered by the proxy itself, never relayed upstream: the next ones
    # of a method, in turn, then every one while `answer_every` is set. RESET resets the
    # connection instead. (By method: a background listing must not take a delete's turn.)
    answers: dict[bytes, list[S3Answer]] = field(default_factory=dict)
    answer_every: S3Answer | None = None
    requests: int = 0
    by_method: Counter[bytes] = field(default_factory=Counter)  # requests seen, answered or not
    connections: int = 0
    # Hold the answer to each request whose head matches a pattern this many seconds: the
    # upstream has done the work, its answer is late (e.g. a CopyObject, by its header
    # x-amz-copy-source). `held` counts the answers held so far.
    hold_answers: list[tuple[re.Pattern[bytes], float]] = field(default_factory=list)
    held: int = 0
    # set: the answers held go on at once, however long they were to be held
    release_held: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class _Connection:
    cut: bool = False  # the next response on this connection is replaced by a reset
    hold: float = 0.0  # seconds to hold the next response on this connection
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


class FaultProxy:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.faults = Faults()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await self._server.wait_closed()

    def reset(self) -> None:
        self.faults = Faults()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.faults.connections += 1
        try:
            if self.faults.drop:
                await reader.read()  # hold the connection, answer nothing
                return
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            connection = _Connection()
            try:
                await asyncio.gather(
                    self._requests(reader, up_writer, writer, connection),
                    self._responses(up_reader, writer, connection),
                )
            finally:
                up_writer.close()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._tasks.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    async def _requests(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        client: asyncio.StreamWriter,
        connection: _Connection,
    ) -> None:
        while data := await src.read(65536):
            faults = self.faults
            if faults.drop:
                continue  # on a connection kept alive from before, too: read, never relay
            method = data.split(b" ", 1)[0]
            if method in _METHODS:
                faults.requests += 1
                faults.by_method[method] += 1
                turns = faults.answers.get(method)
                answer = turns.pop(0) if turns else faults.answer_every
                if answer == RESET:
                    client.transport.abort()
                    break  # and the upstream connection ends with it
                if answer is not None:
                    client.write(answer.render(method))
                    await client.drain()
                    continue
                swallow = faults.swallow_requests_after
                if swallow is not None and faults.requests > swallow:
                    continue
                limit = faults.reset_responses_after
                if limit is not None and faults.requests > limit:
                    connection.cut = True
            hold = next((s for pattern, s in faults.hold_answers if pattern.search(data)), 0.0)
            if hold:
                connection.hold = hold  # set before the request goes: its answer comes after
            dst.write(data)
            await dst.drain()
        with contextlib.suppress(Exception):
            dst.write_eof()

    async def _responses(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, connection: _Connection
    ) -> None:
        sent = 0
        while data := await src.read(65536):
            faults = self.faults
            if connection.cut:
                dst.transport.abort()  # the request was processed; its answer never arrives
                return
            if connection.hold:
                seconds, connection.hold = connection.hold, 0.0
                faults.held += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(faults.release_held.wait(), seconds)
            if faults.delay:
                await asyncio.sleep(faults.delay)
            if faults.reset_after_bytes is not None:
                room = faults.reset_after_bytes - sent
                if len(data) > room:
                    dst.write(data[: max(room, 0)])
                    await dst.drain()
                    dst.transport.abort()  # RST mid-response
                    return
            if faults.trickle:
                for i in range(len(data)):
                    dst.write(data[i : i + 1])
                    await dst.drain()
                    await asyncio.sleep(faults.trickle)
            else:
                dst.write(data)
                await dst.drain()
            sent += len(data)
        with contextlib.suppress(Exception):
            dst.write_eof()


class RequestByRequest(FaultProxy):
    """The fault proxy reading request by request: the head (`head_read` sees it first, and
    may hold it), then exactly Content-Length bytes of body; `passed` says what goes on."""

    async def head_read(self, head: bytes) -> None:
        return None

    def passed(self, head: bytes, body: bytes) -> bytes:
        return head + body

    async def _requests(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        client: asyncio.StreamWriter,
        connection: _Connection,
    ) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError):
            while True:
                head = await src.readuntil(b"\r\n\r\n")
                await self.head_read(head)
                length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                body = await src.readexactly(int(length.group(1)) if length else 0)
                dst.write(self.passed(head, body))
                await dst.drain()
