"""Liveness, readiness and the metrics scrape endpoint: outside auth, cheap to poll."""

from __future__ import annotations

import hmac

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from storage_backends import StorageError

from ..backups.storage import STORE
from ..config import CONFIG
from ..directory import DIRECTORY
from ..http.authentication import bearer_token
from ..http.envelope import envelope
from ..http.errors import ApiError
from ..telemetry.metrics import METRICS


async def healthz(request: web.Request) -> web.Response:
    return envelope(200, "alive")


async def readyz(request: web.Request) -> web.Response:
    checks = {"directory": "ok", "storage": "ok"}
    try:
        await request.app[DIRECTORY].check_ready()
    except Exception:
        checks["directory"] = "unavailable"
    try:
        await request.app[STORE].check_ready()
    except StorageError:
        checks["storage"] = "unavailable"
    if all(v == "ok" for v in checks.values()):
        return envelope(200, "ready", {"checks": checks})
    return envelope(503, "not ready", {"checks": checks})


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
