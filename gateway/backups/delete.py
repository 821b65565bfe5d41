"""DELETE a backup: id grammar, then the system and who may act on it, then storage, audited."""

from __future__ import annotations

import asyncio

from aiohttp import web

from storage_backends import BackupLocation, SystemFolder

from ..http.envelope import envelope
from ..http.errors import DELETE_OUTCOME_UNKNOWN, ApiError
from ..http.middlewares import TIMEOUT_MESSAGE
from .audit import record_delete
from .authorization import authorized_system
from .params import requested_backup_id
from .storage import STORE, run_storage
from .storage_changes import backup_deleted, delete_begins
from .system_lock import system_changes
from .usage import USAGE_COUNTER


async def delete_unless_protected(request: web.Request, location: BackupLocation) -> None:
    """Delete the backup unless it is protected (409 `backup is protected`, DESIGN.md
    §11). Under the system's lock where the store keeps protection, so a protection set
    meanwhile is never deleted through."""
    store = request.app[STORE]
    if not store.capabilities.keeps_state:
        ticket = delete_begins(request.app)
        await _delete(request, location)
        return backup_deleted(request.app, location, None, ticket)
    folder = SystemFolder(location.organization_id, location.system_key)
    if store.capabilities.deletes_unprotected_at_once and await _deleted_at_once(request, location):
        return
    async with system_changes(request, folder, shared=True):  # deletes go side by side
        info = await run_storage(request, "describe", store.describe, location, "delete backup")
        if info.protected:
            raise ApiError(409, "backup is protected")
        ticket = delete_begins(request.app)
        await _delete(request, location)
    backup_deleted(request.app, location, info.size, ticket)


async def _deleted_at_once(request: web.Request, location: BackupLocation) -> bool:
    """The look and the delete as one store step, which takes the folder's lock itself
    without waiting (this process's lock is held here as for any delete): False when an
    exclusive holder has it, nothing done. One hand-off a delete instead of three."""
    store = request.app[STORE]
    folder = SystemFolder(location.organization_id, location.system_key)
    async with system_changes(request, folder, shared=True, folder_lock=False):
        ticket = delete_begins(request.app)
        request[TIMEOUT_MESSAGE] = DELETE_OUTCOME_UNKNOWN  # as in _delete
        size = await run_storage(request, "delete", store.delete_unprotected_now, location)
        if size is None:
            request.pop(TIMEOUT_MESSAGE, None)  # nothing was done
            return False
    backup_deleted(request.app, location, size, ticket)
    return True


async def delete_counted(request: web.Request, location: BackupLocation) -> None:
    """`delete_unless_protected`, then the organization's usage counter dropped."""
    await delete_unless_protected(request, location)
    usage = request.app.get(USAGE_COUNTER)
    if usage is not None:
        usage.changed(location.organization_id)


def cancelled_outcome(request: web.Request) -> str:
    """What a delete cut short (the request deadline's 504, the client going away) did:
    before the store was asked, nothing; after, the outcome is unknown."""
    asked = request.get(TIMEOUT_MESSAGE) == DELETE_OUTCOME_UNKNOWN
    return DELETE_OUTCOME_UNKNOWN if asked else "cancelled"


async def _delete(request: web.Request, location: BackupLocation) -> None:
    # From here the store may remove the backup whatever happens to this request: a
    # deadline that strikes now does not know the outcome, and must not say "failed".
    request[TIMEOUT_MESSAGE] = DELETE_OUTCOME_UNKNOWN
    await run_storage(request, "delete", request.app[STORE].delete, location)


async def delete_backup(request: web.Request) -> web.Response:
    system_id = request.match_info["id"]
    backup_id = requested_backup_id(request)
    decision, outcome = "deny", "internal server error"
    try:
        system = await authorized_system(request, system_id)
        decision = "allow"
        if system.system_key is None:
            # Not registered yet: it never uploaded anything, whatever the backend.
            raise ApiError(404, "backup not found")
        location = BackupLocation(system.organization_id, system.system_key, backup_id)
        await delete_counted(request, location)
        outcome = "backup deleted"
        return envelope(200, outcome, {"system_id": system.id, "backup_id": backup_id})
    except ApiError as exc:
        outcome = exc.message
        raise
    except asyncio.CancelledError:
        outcome = cancelled_outcome(request)
        raise
    finally:
        record_delete(request, system_id, backup_id, decision, outcome)
