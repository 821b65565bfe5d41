"""The routing table, in one place: path, handler, and the permission each route needs."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Handler

from .backups import delete
from .identity.principal import MANAGE_SYSTEMS
from .operations import api_document, health


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    name: str
    permission: str | None = None  # None: public, no token needed


def routes(base_path: str) -> list[Route]:
    base = "" if base_path == "/" else base_path
    backup = base + "/systems/{id}/backups/{backup_id}"
    return [
        Route("DELETE", backup, delete.delete_backup, "delete_backup", MANAGE_SYSTEMS),
        # The seed page documents the delete under .../download: same handler.
        Route(
            "DELETE",
            backup + "/download",
            delete.delete_backup,
            "delete_backup_download",
            MANAGE_SYSTEMS,
        ),
        Route("GET", base + "/openapi.yaml", api_document.openapi, "openapi"),
        Route("GET", "/healthz", health.healthz, "healthz"),
        Route("GET", "/readyz", health.readyz, "readyz"),
        Route("GET", "/metrics", health.metrics, "metrics"),
    ]


def install(app: web.Application, table: list[Route]) -> dict[str, str]:
    """Add the routes; return route name -> required permission for the auth middleware."""
    for route in table:
        app.router.add_route(route.method, route.path, route.handler, name=route.name)
    return {r.name: r.permission for r in table if r.permission is not None}
