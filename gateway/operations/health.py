"""Liveness, readiness and the metrics scrape endpoint: outside auth, cheap to poll."""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from ..config import CONFIG
from ..http.authentication import bearer_token
from ..http.envelope import envelope
from ..http.errors import ApiError
from ..telemetry.metrics import METRICS

log = logging.getLogger(__name__)


async def healthz(request: web.Request) -> web.Response:
    return envelope(200, "alive")


# name -> a cheap probe that raises when that part cannot serve (registered by the wiring)
READINESS = web.AppKey("readiness", dict[str, Callable[[], Awaitable[None]]])
PROBE_TIMEOUT = 3.0


async def readyz(request: web.Request) -> web.Response:
    probes = request.app[READINESS]
    outcomes = await asyncio.gather(*(_probe(name, p) for name, p in probes.items()))
    checks = {name: state for name, (state, _) in zip(probes, outcomes, strict=True)}
    if all(v == "ok" for v in checks.values()):
        return envelope(200, "ready", {"checks": checks})
    # the few causes that name no secret and are fixed by a command (an unmarked root)
    hints = {name: hint for name, (_, hint) in zip(probes, outcomes, strict=True) if hint}
    return envelope(503, "not ready", {"checks": checks, **({"hints": hints} if hints else {})})


async def _probe(name: str, probe: Callable[[], Awaitable[None]]) -> tuple[str, str | None]:
    """("ok" | "unavailable", the failure's `readiness_hint` when it has one)."""
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            await probe()
    except Exception as exc:  # any failure means not ready; the cause goes to the log
        log.warning("readiness probe %s failed: %s", name, cause_of(exc))
        hint = getattr(exc, "readiness_hint", None)
        return "unavailable", hint if isinstance(hint, str) else None
    return "ok", None


def cause_of(exc: BaseException) -> str:
    """`Type: message`, and what it was raised from, for the log (never for an answer: the
    body says only "unavailable")."""
    parts: list[str] = []
    seen: BaseException | None = exc
    while seen is not None and len(parts) < 3:
        text = str(seen)
        parts.append(f"{type(seen).__name__}: {text}" if text else type(seen).__name__)
        seen = seen.__cause__ or (None if seen.__suppress_context__ else seen.__context__)
    return "; from ".join(parts)


async def metrics(request: web.Request) -> web.Response:
    expected = request.app[CONFIG].metrics.bearer_token
    if expected:
        token = bearer_token(request) or ""
        if not hmac.compare_digest(token.encode(), expected.encode()):
            raise ApiError(401, "invalid token", headers={"WWW-Authenticate": "Bearer"})
    body = request.app[METRICS].render()
    response = web.Response(body=body)
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response
