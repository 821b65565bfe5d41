"""GET /api/systems/backups: an appliance lists its own backups (DESIGN.md §10).

Order: the appliance's credentials (401) → storage configured (503) → the list (502
`failed to list backups`). Items exactly as a user's listing has them (`listing`), newest
first, at most `limits.max_list_items` with `truncated`; only the folder the credentials
name, ever."""

from __future__ import annotations

from aiohttp import web

from storage_backends import BackupListing, SystemFolder

from ..config import CONFIG
from ..http.envelope import envelope
from .appliance_login import appliance
from .listing import listed_items
from .retention import RETENTION
from .storage import STORE, run_storage


async def list_own_backups(request: web.Request) -> web.Response:
    system = await appliance(request)
    assert system.system_key is not None  # found by its key
    store = request.app[STORE]
    limit = request.app[CONFIG].limits.max_list_items

    async def newest(folder: SystemFolder) -> BackupListing:
        return await store.list_newest(folder, limit)

    folder = SystemFolder(system.organization_id, system.system_key)
    listing = await run_storage(request, "list", newest, folder, "list backups")
    backups = sorted(listing.backups, key=lambda b: (b.uploaded_at, b.id), reverse=True)
    items = listed_items(backups[:limit], request.app[RETENTION].policy)
    return envelope(200, "backups listed", {"backups": items, "truncated": listing.truncated})
