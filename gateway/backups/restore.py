"""GET and HEAD /api/systems/backups/{backup_id}: an appliance restores one of its own
backups (DESIGN.md §10).

Order: the appliance's credentials (401) → id grammar (400) → storage configured (503) →
the backup exists in the appliance's own folder (404; the system is the one the
credentials name, never one from the path) → 200 or 206 with the bytes (`sending`, shared
with the local download link): sendfile from local disk, a GetObject streamed on S3 —
never a redirect, since appliances often reach only the gateway's host.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter

from aiohttp import web

from storage_backends import BackupLocation

from ..config import CONFIG
from ..directory import System
from ..http.errors import ApiError
from ..telemetry.metrics import Metrics
from .appliance_login import appliance
from .audit import record_restore
from .download import OPEN_BACKUPS
from .params import requested_backup_id
from .sending import READ_FAILURE, Delivery, send_backup
from .storage import STORE, run_storage


class Restores:
    """Restores by outcome, and the bytes they sent (the restore's own counters)."""

    def __init__(self) -> None:
        self.outcomes: Counter[str] = Counter()
        self.bytes_sent = 0

    def count(self, delivery: Delivery) -> None:
        self.outcomes[delivery.outcome.replace(" ", "_")] += 1
        self.bytes_sent += delivery.bytes_sent

    def export(self, metrics: Metrics) -> None:
        metrics.add_labeled_reading(
            "counter",
            "gateway_backup_restores",
            "Restores by appliances that passed the credential check, by outcome",
            "outcome",
            lambda: self.outcomes,
        )
        metrics.add_reading(
            "counter",
            "gateway_backup_restored_bytes",
            "Bytes of backups sent to appliances restoring them",
            lambda: self.bytes_sent,
        )


RESTORES = web.AppKey("restores", Restores)


async def restore_backup(request: web.Request) -> web.StreamResponse:
    config = request.app[CONFIG]
    system: System | None = None
    backup_id = ""
    delivery = Delivery(outcome="internal server error")
    try:
        async with contextlib.AsyncExitStack() as held:
            try:
                # the checks and the open: the request's time; the bytes: their own budget
                async with asyncio.timeout(config.server.request_timeout_seconds):
                    system = await appliance(request)
                    backup_id = requested_backup_id(request)
                    assert system.system_key is not None  # found by its key
                    organization = system.organization_id
                    location = BackupLocation(organization, system.system_key, backup_id)
                    if OPEN_BACKUPS in request.app:  # a descriptor: within downloads' bound
                        held.enter_context(request.app[OPEN_BACKUPS].slot(organization))
                    reader = await run_storage(
                        request, "open", request.app[STORE].open_reader, location, READ_FAILURE
                    )
            except TimeoutError:
                raise ApiError(504, "request timed out") from None
            held.push_async_callback(reader.close)
            return await send_backup(request, reader, delivery)
    except ApiError as exc:
        delivery.status = exc.status
        if delivery.outcome == "internal server error":
            delivery.outcome = exc.message
        raise
    except asyncio.CancelledError:
        delivery.outcome = "cancelled"
        raise
    finally:
        if system is not None:  # an appliance that proved who it is: audited and counted
            request.app[RESTORES].count(delivery)
            record_restore(request, system, backup_id, delivery)
