"""The routing table, in one place: path, handler, and the permission each route needs."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Handler

from .backups import (
    appliance_delete,
    appliance_listing,
    delete,
    download,
    fleet,
    listing,
    orphans,
    protection,
    restore,
    upload,
)
from .http.middlewares import OWN_DEADLINE_ROUTES
from .identity.principal import MANAGE_SYSTEMS, READ_SYSTEMS
from .operations import api_document, health


@dataclass(frozen=True)
class Public:
    """A route without a bearer token, on purpose: `instead` says what stands in for one."""

    instead: str


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    name: str
    # every route says who may call it: the token permission it needs, or Public(why not)
    permission: str | Public
    own_deadline: bool = False  # bounds its own time instead of server.request_timeout_seconds
    # answers `Expect: 100-continue` itself, once its checks passed (else: aiohttp, at once)
    own_continue: bool = False


LINK = Public("the signed link is the capability")
DOCUMENT = Public("the API's own description")
PROBE = Public("a load balancer's probe; says nothing about any backup")
APPLIANCE = Public("the appliance's own Basic credentials, checked by the handler")
SCRAPE = Public("metrics.bearer_token, checked by the handler when set")


def routes(base_path: str) -> list[Route]:
    base = "" if base_path == "/" else base_path
    backups = base + "/systems/{id}/backups"
    backup = backups + "/{backup_id}"
    content = base + download.CONTENT_PATH + "{link}"
    own = base + "/systems/backups"
    own_backup = own + "/{backup_id}"
    return [
        # Reads need read:systems, changes manage:systems (the platform's rule); GET and
        # DELETE of one path are different routes with different permissions.
        Route("GET", backups, listing.list_backups, "list_backups", READ_SYSTEMS),
        Route(
            "POST",
            own,
            upload.upload_backup,
            "upload_backup",
            APPLIANCE,
            own_deadline=True,
            own_continue=True,
        ),
        # An appliance's own backups (DESIGN.md §10): the system is the one its credentials
        # name, never one from the path.
        Route("GET", own, appliance_listing.list_own_backups, "list_own_backups", APPLIANCE),
        Route(
            "GET",
            own_backup,
            restore.restore_backup,
            "restore_backup",
            APPLIANCE,
            own_deadline=True,
        ),
        Route(
            "HEAD",
            own_backup,
            restore.restore_backup,
            "restore_backup_head",
            APPLIANCE,
            own_deadline=True,
        ),
        Route(
            "DELETE", own_backup, appliance_delete.delete_own_backup, "delete_own_backup", APPLIANCE
        ),
        Route("GET", backup + "/download", download.download_url, "download_url", READ_SYSTEMS),
        Route("GET", content, download.serve_content, "backup_content", LINK, own_deadline=True),
        Route(
            "HEAD", content, download.serve_content, "backup_content_head", LINK, own_deadline=True
        ),
        Route("DELETE", backup, delete.delete_backup, "delete_backup", MANAGE_SYSTEMS),
        Route(
            "PUT",
            backup + "/protection",
            protection.put_protection,
            "put_protection",
            MANAGE_SYSTEMS,
        ),
        # The seed page documents the delete under .../download: same handler.
        Route(
            "DELETE",
            backup + "/download",
            delete.delete_backup,
            "delete_backup_download",
            MANAGE_SYSTEMS,
        ),
        # The fleet (DESIGN.md §13): the systems in the caller's reach, and (the Owner's
        # only: checked by the handler) the folders no system maps to.
        Route("GET", base + "/backups/fleet", fleet.fleet_systems, "fleet", READ_SYSTEMS),
        Route("GET", base + "/backups/orphans", orphans.orphan_folders, "orphans", READ_SYSTEMS),
        Route("GET", base + "/openapi.yaml", api_document.openapi, "openapi", DOCUMENT),
        Route("GET", "/healthz", health.healthz, "healthz", PROBE),
        Route("GET", "/readyz", health.readyz, "readyz", PROBE),
        Route("GET", "/metrics", health.metrics, "metrics", SCRAPE),
    ]


def install(app: web.Application, table: list[Route]) -> dict[str, str]:
    """Add the routes; return route name -> required permission for the auth middleware."""
    for route in table:
        app.router.add_route(
            route.method,
            route.path,
            route.handler,
            name=route.name,
            expect_handler=_continue_later if route.own_continue else None,
        )
    app[OWN_DEADLINE_ROUTES] = frozenset(r.name for r in table if r.own_deadline)
    return {r.name: r.permission for r in table if not isinstance(r.permission, Public)}


async def _continue_later(request: web.Request) -> None:
    """Send nothing yet: the handler answers `100 Continue` after its checks."""
