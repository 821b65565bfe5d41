"""Sending a backup's bytes: the one implementation behind a local download link (DESIGN.md
§8) and an appliance's restore (§10).

The headers of §8 (with §12's Repr-Digest), one `Range` (206, 416 when unsatisfiable,
`If-Range` honoured: a validator other than the ETag gets the whole 200), HEAD answered
with the headers alone, then the body: by sendfile from the reader's descriptor (local
disk), else in the reader's bounded pieces, each written once the client took the one
before (backpressure: memory stays flat whatever the size). The whole send gets
`server.request_timeout_seconds` plus its size at `storage.download.min_rate_bytes_per_second`.

After the headers went out nothing can be said in the envelope any more: a store that
breaks off, or a client too slow, gets its connection aborted, so the client sees fewer
bytes than `Content-Length` — never a short file that looks whole. A client that goes
away is its own business: `AnswerCut`, which the middleware counts as 499 in one debug
line, never as the gateway's error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from dataclasses import dataclass

from aiohttp import web

from storage_backends import BackupInfo, BackupReader, StorageError

from ..config import CONFIG
from ..http.errors import ApiError, storage_error
from ..http.middlewares import REQUEST_ID, AnswerCut
from .digests import repr_digest
from .names import download_name

log = logging.getLogger(__name__)

READ_FAILURE = "read backup"  # 502 `failed to read backup`
LARGE_SEND = 16 << 20
SEND_BUFFER_BYTES = 8 << 20


@dataclass
class Delivery:
    """What a send got to, for the caller's audit line and counters (read in `finally`)."""

    status: int = 0
    bytes_sent: int = 0
    # complete | headers only | range not satisfiable | store failed | too slow | client gone
    outcome: str = "not started"


@dataclass(frozen=True, slots=True)
class Span:
    """The bytes to send: `count` from `offset`; `partial` when answering a Range (206)."""

    offset: int
    count: int
    partial: bool


def backup_headers(request: web.Request, info: BackupInfo) -> dict[str, str]:
    """The headers of every answer with a backup's bytes (DESIGN.md §8, §12)."""
    name = download_name(info.filename, info.id, info.uploaded_at)
    headers = {
        "Content-Type": "application/octet-stream",
        "Content-Disposition": f'attachment; filename="{name}"',
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-store",
        "Accept-Ranges": "bytes",
        "X-Request-ID": request[REQUEST_ID],  # the response is prepared here, not later
    }
    if info.sha256:
        # the whole backup's, also on a 206 and for a corrupt backup (a client sees the mismatch)
        headers["ETag"] = f'"{info.sha256}"'
        digest = repr_digest(info.sha256)
        if digest is not None:
            headers["Repr-Digest"] = digest
    return headers


def requested_span(request: web.Request, size: int, etag: str | None) -> Span:
    """The bytes a request asks for: one satisfiable range (206), else all of them.

    Several ranges, a malformed header or another unit are ignored (RFC 9110 §14.2: the
    whole 200); so is a Range under an `If-Range` that is not this backup's ETag (a strong
    comparison; a date never matches, since no Last-Modified is sent). A range that starts
    past the end, or the empty suffix `bytes=-0`, is 416."""
    whole = Span(0, size, partial=False)
    header = request.headers.get("Range")
    if header is None:
        return whole
    if_range = request.headers.get("If-Range")
    if if_range is not None and (etag is None or if_range.strip() != etag):
        return whole
    try:
        wanted = request.http_range  # aiohttp's parser: one range, else ValueError
    except ValueError:
        return whole
    start, stop = wanted.start or 0, wanted.stop
    # aiohttp reads `bytes=-N` as start -N: `bytes=-0` would look like `bytes=0-`
    if header.partition("=")[2].strip().startswith("-"):
        if start == 0:
            raise _unsatisfiable(size)  # a suffix of no bytes
        start, stop = max(0, size + start), size
    stop = size if stop is None else min(stop, size)
    if start >= size or start >= stop:
        raise _unsatisfiable(size)
    return Span(start, stop - start, partial=True)


def _unsatisfiable(size: int) -> ApiError:
    return ApiError(416, "range not satisfiable", headers={"Content-Range": f"bytes */{size}"})


async def send_backup(
    request: web.Request, reader: BackupReader, delivery: Delivery
) -> web.StreamResponse:
    """Answer with the backup's bytes (or headers alone, for HEAD), `delivery` kept up to
    date. ApiError before anything was sent (416; 502 when the store fails before the first
    byte); AnswerCut when the client went away or the send was cut off after the headers."""
    info = reader.info
    headers = backup_headers(request, info)
    try:
        span = requested_span(request, info.size, headers.get("ETag"))
    except ApiError as exc:
        delivery.status, delivery.outcome = exc.status, exc.message
        raise
    status = 206 if span.partial else 200
    if span.partial:
        end = span.offset + span.count - 1
        headers["Content-Range"] = f"bytes {span.offset}-{end}/{info.size}"
    response = web.StreamResponse(status=status, headers=headers)
    response.content_length = span.count
    delivery.status = status
    if request.method == "HEAD" or not span.count:
        await response.prepare(request)
        await response.write_eof()
        delivery.outcome = "headers only" if request.method == "HEAD" else "complete"
        return response
    config = request.app[CONFIG]
    rate = config.storage.download.min_rate_bytes_per_second
    budget = config.server.request_timeout_seconds + span.count / rate
    try:
        async with asyncio.timeout(budget):
            if reader.fd is not None:
                await _sendfile(request, response, reader.fd, span, delivery)
            else:
                await _stream(request, response, reader, span, delivery)
    except TimeoutError:
        log.warning("backup send cut off: slower than %d B/s", rate)
        delivery.outcome = "too slow"
        _reset(request)
        raise AnswerCut("too slow") from None
    await response.write_eof()
    delivery.outcome = "complete"
    return response


async def _sendfile(
    request: web.Request,
    response: web.StreamResponse,
    fd: int,
    span: Span,
    delivery: Delivery,
) -> None:
    await _prepare(request, response, delivery)
    transport = request.transport
    if transport is None:
        delivery.outcome = "client gone"
        raise AnswerCut("before the body")
    sock = transport.get_extra_info("socket")
    if sock is not None and span.count > LARGE_SEND:
        # a deep send queue: each wakeup of the loop's sendfile moves more (fewer wakeups)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
    with os.fdopen(fd, "rb", closefd=False) as file:
        try:
            await asyncio.get_running_loop().sendfile(transport, file, span.offset, span.count)
        except (ConnectionError, RuntimeError) as exc:
            if isinstance(exc, RuntimeError) and not transport.is_closing():
                raise  # RuntimeError says "transport is closing"; anything else is ours
            delivery.bytes_sent = max(0, file.tell() - span.offset)  # sendfile moves it
            delivery.outcome = "client gone"
            raise AnswerCut(type(exc).__name__) from None
    delivery.bytes_sent = span.count


async def _stream(
    request: web.Request,
    response: web.StreamResponse,
    reader: BackupReader,
    span: Span,
    delivery: Delivery,
) -> None:
    async with contextlib.aclosing(reader.chunks(span.offset, span.count)) as pieces:
        try:
            first = await anext(pieces)  # the store answered: only now are headers sent
        except StorageError as exc:
            delivery.outcome = "store failed"
            raise storage_error(exc, READ_FAILURE) from None
        await _prepare(request, response, delivery)
        piece = first
        try:
            while True:
                await _write(response, piece, delivery)
                piece = await anext(pieces)
        except StopAsyncIteration:
            return
        except StorageError as exc:
            # the client already holds a 200 and part of the bytes: only a broken
            # connection can say the rest will not come
            log.warning("backup send broke off after %d bytes: %s", delivery.bytes_sent, exc)
            delivery.outcome = "store failed"
            _reset(request)
            raise AnswerCut("the store broke off", status=502) from None


async def _prepare(request: web.Request, response: web.StreamResponse, delivery: Delivery) -> None:
    try:
        await response.prepare(request)
    except ConnectionError as exc:
        delivery.outcome = "client gone"
        raise AnswerCut(type(exc).__name__) from None


async def _write(response: web.StreamResponse, piece: bytes, delivery: Delivery) -> None:
    try:
        await response.write(piece)  # waits while the client has not taken what was sent
    except ConnectionError as exc:
        delivery.outcome = "client gone"
        raise AnswerCut(type(exc).__name__) from None
    delivery.bytes_sent += len(piece)


def _reset(request: web.Request) -> None:
    """Close with a reset: what the kernel still holds to send is dropped, not drained to
    a client that reads it at a byte a second (a plain close would wait for it), and the
    client sees the answer end short of its Content-Length."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
