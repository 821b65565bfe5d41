"""Route handlers: thin compositions of id validation, directory, authorization and storage."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiohttp import web

from storage_backends import BackupLocation, StorageError

from .appkeys import DIRECTORY, METRICS, PRINCIPAL, STORAGE_GATE, STORE
from .audit import record_delete
from .authorization import may_act_on
from .backup_ids import normalize_backup_id
from .directory import System
from .envelope import envelope
from .errors import ApiError, storage_error, validation_failed

T = TypeVar("T")


async def authorized_system(request: web.Request, system_id: str) -> System:
    """The live system the caller may act on (404 system not found / 403 access denied)."""
    system = await request.app[DIRECTORY].system(system_id)
    if system is None or system.deleted:
        raise ApiError(404, "system not found")
    if not await may_act_on(request.app[DIRECTORY], request[PRINCIPAL], system):
        raise ApiError(403, "access denied to system")
    return system


async def delete_backup(request: web.Request) -> web.Response:
    system_id = request.match_info["id"]
    raw_backup_id = request.match_info["backup_id"]
    backup_id = normalize_backup_id(raw_backup_id)
    if backup_id is None:
        raise validation_failed("backup_id", raw_backup_id)
    decision, outcome = "deny", "internal server error"
    try:
        system = await authorized_system(request, system_id)
        decision = "allow"
        if system.system_key is None:
            # Not registered yet: it never uploaded anything, whatever the backend.
            raise ApiError(404, "backup not found")
        location = BackupLocation(system.organization_id, system.system_key, backup_id)
        await run_storage(request, "delete", request.app[STORE].delete, location)
        outcome = "backup deleted"
        return envelope(200, outcome, {"system_id": system.id, "backup_id": backup_id})
    except ApiError as exc:
        outcome = exc.message
        raise
    except asyncio.CancelledError:
        # The request deadline (504) or the client going away cut it short.
        outcome = "cancelled"
        raise
    finally:
        record_delete(request, system_id, backup_id, decision, outcome)


async def run_storage(
    request: web.Request,
    operation: str,
    call: Callable[[BackupLocation], Awaitable[T]],
    location: BackupLocation,
) -> T:
    """Run one storage call under the concurrency gate, with metrics and error mapping."""
    app = request.app
    backend = app[STORE].name
    metrics = app[METRICS]
    gate = app[STORAGE_GATE]
    await gate.enter()
    started = time.perf_counter()
    outcome = "ok"
    try:
        return await call(location)
    except StorageError as exc:
        outcome = type(exc).__name__
        raise storage_error(exc, f"{operation} backup") from None
    except asyncio.CancelledError:
        outcome = "cancelled"
        raise
    finally:
        gate.leave()
        metrics.storage_operation(backend, operation, outcome, time.perf_counter() - started)
