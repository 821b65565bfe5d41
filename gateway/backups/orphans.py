"""GET /api/backups/orphans (DESIGN.md §13): every system folder holding a backup that no
registered system maps to, for the Owner only — it names other tenants' folders."""

from __future__ import annotations

from aiohttp import web

from ..directory import DIRECTORY
from ..fleet import FLEET, find_orphans
from ..http.envelope import envelope
from ..http.errors import ApiError
from ..identity.principal import PRINCIPAL
from .directory_answer import directory_or_503
from .listing import rfc3339


async def orphan_folders(request: web.Request) -> web.Response:
    caller = request[PRINCIPAL]
    directory = request.app[DIRECTORY]
    with directory_or_503():
        acting = await directory.organization(caller.organization_id)
    # a live Owner organization, as the directory has it (the claim alone never suffices)
    if caller.org_role != "owner" or acting is None or acting.deleted or acting.role != "owner":
        raise ApiError(403, "insufficient permissions")
    index = request.app[FLEET]
    if not index.ready:
        raise ApiError(503, "fleet index not ready", headers={"Retry-After": "5"})
    with directory_or_503():
        orphans = await find_orphans(index, directory)
    scanned_at = index.scanned_at
    return envelope(
        200,
        "orphans retrieved successfully",
        {
            "orphans": [
                {
                    "organization_id": o.folder.organization_id,
                    "system_key": o.folder.system_key,
                    "backups": o.stats.backups,
                    "bytes": o.stats.bytes,
                    "newest_backup_at": rfc3339(o.stats.newest_at),
                }
                for o in orphans
            ],
            "scanned_at": rfc3339(scanned_at) if scanned_at else None,
        },
    )
