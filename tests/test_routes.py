"""The routing table: every route says who may call it; none is public by omission."""

from __future__ import annotations

import pytest
from aiohttp import web

from gateway.identity.principal import MANAGE_SYSTEMS, READ_SYSTEMS
from gateway.routes import Public, Route, routes


async def _handler(request: web.Request) -> web.Response:
    return web.Response()


def test_a_route_without_a_permission_is_refused() -> None:
    with pytest.raises(TypeError, match="permission"):
        Route("GET", "/api/new", _handler, "new")  # type: ignore[call-arg]


def test_the_public_routes_are_exactly_those_marked_so() -> None:
    table = routes("/api")
    public = {r.name for r in table if isinstance(r.permission, Public)}
    assert public == {
        "upload_backup",
        "list_own_backups",
        "restore_backup",
        "restore_backup_head",
        "delete_own_backup",
        "backup_content",
        "backup_content_head",
        "openapi",
        "healthz",
        "readyz",
        "metrics",
    }
    assert all(r.permission.instead for r in table if isinstance(r.permission, Public))
    protected = {r.permission for r in table if not isinstance(r.permission, Public)}
    assert protected == {READ_SYSTEMS, MANAGE_SYSTEMS}
