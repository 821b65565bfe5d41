"""DELETE /api/systems/backups/{backup_id}: an appliance deletes one of its own backups —
refused unless the operator allows it (DESIGN.md §10).

A stolen appliance credential must not destroy the history it protects, so by default,
after the credentials (401) and the id grammar (400): 403 `appliances may not delete
backups`, nothing deleted. With `storage.retention.appliance_can_delete` (the platform's
own behaviour): storage configured (503) → exists (404) → protected (409), under the
system's lock as a user's delete → deleted, durable, the usage counter dropped. Audited
either way, the appliance as the actor."""

from __future__ import annotations

import asyncio

from aiohttp import web

from storage_backends import BackupLocation

from ..config import CONFIG
from ..http.envelope import envelope
from ..http.errors import ApiError
from .appliance_login import appliance
from .audit import record_appliance_delete
from .delete import cancelled_outcome, delete_counted
from .params import requested_backup_id

REFUSED = "appliances may not delete backups"


async def delete_own_backup(request: web.Request) -> web.Response:
    system = await appliance(request)
    assert system.system_key is not None  # found by its key
    backup_id = requested_backup_id(request)
    decision, outcome = "deny", "internal server error"
    try:
        if not request.app[CONFIG].storage.retention.appliance_can_delete:
            raise ApiError(403, REFUSED)
        decision = "allow"
        location = BackupLocation(system.organization_id, system.system_key, backup_id)
        await delete_counted(request, location)
        outcome = "backup deleted"
        return envelope(200, outcome, {"id": backup_id})
    except ApiError as exc:
        outcome = exc.message
        raise
    except asyncio.CancelledError:
        outcome = cancelled_outcome(request)
        raise
    finally:
        record_appliance_delete(request, system, backup_id, decision, outcome)
