"""Cross-cutting request handling: request id, access log and metrics, deadline, error envelope."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import secrets
import time

from aiohttp import web
from aiohttp.typedefs import Handler

from ..config import CONFIG
from ..identity.principal import PRINCIPAL
from ..telemetry.logs import access_log, log_info
from ..telemetry.metrics import METRICS
from .deadlines import DEADLINES, DeadlineExceeded
from .envelope import envelope
from .errors import ApiError

log = logging.getLogger(__name__)

REQUEST_ID = web.RequestKey("request_id", str)
# what a 504 says when the deadline strikes now (a handler past the point of no return sets it)
TIMEOUT_MESSAGE = web.RequestKey("timeout_message", str)

CLIENT_GONE = 499  # the status a request counts as when its client went away


class AnswerCut(ConnectionResetError):
    """An answer cut off after its headers went out, its connection gone or aborted: nothing
    more can be sent. `status` is what the request counts as (CLIENT_GONE when the client
    went away or was too slow; 502 when the store broke off)."""

    def __init__(self, why: str, status: int = CLIENT_GONE) -> None:
        super().__init__(why)
        self.status = status


_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}", re.ASCII)
# Generated ids: a random per-process prefix and a counter. Unique across workers and hosts,
# and far cheaper than a uuid4 (a getrandom syscall) on every request.
_ID_PREFIX = secrets.token_hex(6)
_id_counter = itertools.count(1)


def _new_prefix() -> None:
    global _ID_PREFIX
    _ID_PREFIX = secrets.token_hex(6)


os.register_at_fork(after_in_child=_new_prefix)
_REASONS = {404: "not found", 405: "method not allowed", 413: "request entity too large"}
_KEPT_HEADERS = ("Allow", "Retry-After")


def route_template(request: web.Request) -> str:
    """The matched route's template (bounded cardinality), or a fixed word for no match."""
    info = request.match_info
    if info.http_exception is not None:
        return "unmatched"
    resource = info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost: request id in and out, one access-log line and the request metrics."""
    incoming = request.headers.get("X-Request-ID", "")
    request_id = (
        incoming if _REQUEST_ID.fullmatch(incoming) else f"{_ID_PREFIX}-{next(_id_counter):x}"
    )
    request[REQUEST_ID] = request_id
    app = request.app
    metrics = app[METRICS]
    route = route_template(request)
    started = time.perf_counter()
    metrics.in_flight += 1
    status = CLIENT_GONE  # before an answer
    try:
        if "Transfer-Encoding" in request.headers:
            response = refuse_transfer_encoding(request)
        else:
            response = await handler(request)
        status = response.status
        response.headers["X-Request-ID"] = request_id
        return response
    finally:
        elapsed = time.perf_counter() - started
        metrics.in_flight -= 1
        metrics.request_answered(route, request.method, status, elapsed)
        if app[CONFIG].logging.access_log:
            principal = request.get(PRINCIPAL)
            log_info(
                access_log,
                "request",
                {
                    "request_id": request_id,
                    "method": request.method,
                    "route": route,
                    "status": status,
                    "client": request.remote,
                    "latency_ms": round(elapsed * 1000, 3),
                    "user_id": principal.user_id if principal else None,
                    "organization_id": principal.organization_id if principal else None,
                },
            )


def refuse_transfer_encoding(request: web.Request) -> web.StreamResponse:
    """No route takes a chunked body: refuse it, and read nothing more on this connection.

    aiohttp's C parser (3.14.5) carries the last trailer field of a chunked message into
    the next request's headers on the same connection: behind a proxy that pools
    connections, a token sent as one request's trailer authorized the next request.
    Stopping the protocol here means no later request of this connection, pipelined or
    not, is ever parsed or handled; the answer says `Connection: close`.
    """
    request.protocol.close()
    if request.method == "POST":  # the upload route: it needs a Content-Length
        response = envelope(411, "Content-Length required")
    else:
        response = envelope(400, "Transfer-Encoding is not accepted")
    response.force_close()
    return response


@web.middleware
async def error_envelope(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure becomes an envelope; nothing answers a bare 500 page."""
    try:
        return await handler(request)
    except ApiError as exc:
        answer = envelope(exc.status, exc.message, exc.data, exc.headers)
        if exc.headers.get("Connection") == "close":
            answer.force_close()  # the header alone would not end a keep-alive connection
        return answer
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {h: exc.headers[h] for h in _KEPT_HEADERS if h in exc.headers}
        message = _REASONS.get(exc.status, (exc.reason or "error").lower())
        return envelope(exc.status, message, {}, headers)
    except asyncio.CancelledError:
        raise
    except ConnectionError as exc:
        transport = request.transport
        if not isinstance(exc, AnswerCut) and transport is not None and not transport.is_closing():
            return _unhandled(request)  # not the client's connection: the gateway's error
        # an abandoned download is the client's business: never a traceback, never a 5xx
        status = exc.status if isinstance(exc, AnswerCut) else CLIENT_GONE
        log.debug(
            "answer cut off (%d): %s",
            status,
            exc,
            extra={"fields": {"request_id": request.get(REQUEST_ID)}},
        )
        gone = web.Response(status=status)  # written nowhere: counted and logged as this
        gone.force_close()
        return gone
    except Exception:
        return _unhandled(request)


def _unhandled(request: web.Request) -> web.StreamResponse:
    log.exception("unhandled error", extra={"fields": {"request_id": request.get(REQUEST_ID)}})
    return envelope(500, "internal server error")


# names of routes that bound their own time (a download's depends on its size)
OWN_DEADLINE_ROUTES = web.AppKey("own_deadline_routes", frozenset[str])


@web.middleware
async def deadline(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer 504 when a request outlives `server.request_timeout_seconds`."""
    if request.match_info.route.name in request.app[OWN_DEADLINE_ROUTES]:
        return await handler(request)
    try:
        return await request.app[DEADLINES].run(handler(request))
    except DeadlineExceeded:
        raise ApiError(504, request.get(TIMEOUT_MESSAGE, "request timed out")) from None
