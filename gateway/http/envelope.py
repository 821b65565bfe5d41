"""The response envelope: every body is `{"code", "message", "data"}` with code = status."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web

_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def envelope(
    status: int,
    message: str,
    data: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    body = _encode({"code": status, "message": message, "data": data if data is not None else {}})
    return web.Response(
        status=status,
        body=body.encode(),
        content_type="application/json",
        headers=headers,
    )
