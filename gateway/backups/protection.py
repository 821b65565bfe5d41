"""PUT a backup's protection (DESIGN.md §11): a protected backup is never pruned, never
deleted, until it is unprotected.

Order: token → permission (the middleware) → backup id and body (400) → the system and who
may act on it → storage configured → under the system's lock: the backup exists (404) →
at most `max_protected_per_system` protected (409) → 200. Setting what is already set
changes nothing and answers 200 (idempotent).
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from storage_backends import BackupLocation, StorageNotConfigured, SystemFolder

from ..config import CONFIG
from ..http.envelope import envelope
from ..http.errors import ApiError, storage_error, validation_failed
from .audit import record_protection
from .authorization import authorized_system
from .params import requested_backup_id
from .storage import STORE, run_storage
from .system_lock import system_changes

MAX_BODY_BYTES = 1024


async def put_protection(request: web.Request) -> web.Response:
    system_id = request.match_info["id"]
    backup_id = requested_backup_id(request)
    protected = await _requested_protection(request)
    outcome = "denied"
    try:
        system = await authorized_system(request, system_id)
        if system.system_key is None:
            raise ApiError(404, "backup not found")  # not registered: nothing uploaded
        store = request.app[STORE]
        if not store.capabilities.keeps_state:  # `none`: every operation is a 503
            raise storage_error(StorageNotConfigured(store.name), "protect backup")
        folder = SystemFolder(system.organization_id, system.system_key)
        location = folder.location(backup_id)
        async with system_changes(request, folder):
            info = await run_storage(
                request, "describe", store.describe, location, "protect backup"
            )
            if info.protected != protected:
                if protected:
                    await _room_for_one_more(request, folder)
                await run_storage(
                    request, "protect", _setter(store, protected), location, "protect backup"
                )
        outcome = "protection updated" if info.protected != protected else "unchanged"
        data = {"system_id": system.id, "backup_id": backup_id, "protected": protected}
        return envelope(200, "backup protection updated", data)
    except ApiError as exc:
        outcome = exc.message
        raise
    finally:
        record_protection(request, system_id, backup_id, protected, outcome)


async def _requested_protection(request: web.Request) -> bool:
    """`{"protected": true}` or `false`, and nothing else: 400 validation failed."""
    raw = await request.content.read(MAX_BODY_BYTES + 1)
    text = raw.decode("utf-8", "replace")
    try:
        body: Any = json.loads(raw) if len(raw) <= MAX_BODY_BYTES else None
    except ValueError:
        body = None
    if (
        not isinstance(body, dict)
        or set(body) != {"protected"}
        or not isinstance(body["protected"], bool)
    ):
        raise validation_failed("protected", text)
    return bool(body["protected"])


async def _room_for_one_more(request: web.Request, folder: SystemFolder) -> None:
    limit = request.app[CONFIG].storage.retention.max_protected_per_system
    if not limit:
        return
    store = request.app[STORE]
    backups = await run_storage(request, "list", store.list_backups, folder, "protect backup")
    if sum(b.protected for b in backups) >= limit:
        raise ApiError(409, "too many protected backups")


def _setter(store: Any, protected: bool) -> Any:
    async def set_it(location: BackupLocation) -> None:
        await store.set_protected(location, protected)

    return set_it
