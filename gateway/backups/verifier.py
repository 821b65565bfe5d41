"""The verifier (DESIGN.md §12): every backup re-read and its sha256 compared with the one
stored when it was uploaded, so a disk or a bucket that rots them is found.

A pass looks at every system folder, picks the backups due (never verified, or verified
longer ago than `interval_days`), never-verified first and then the oldest verification,
and reads them within `max_bytes_per_second`. One verifier per system at a time across
processes (the lock `backup:verify:<system_key>` in Redis, or the folder's `.verify.lock`
on local disk). A backup stored without a sha256 stays `unverified`: a hash computed later
is never taken as the reference. A corrupt backup is logged at error, audited (`backup
corrupt`) and counted; it stays listed and restorable, and the keep rules pass it over.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from aiohttp import web

from storage_backends import (
    BackupInfo,
    BackupLocation,
    BackupNotFound,
    BackupStore,
    StorageError,
    SystemFolder,
)

from ..config import VerifyConfig
from ..telemetry.logs import audit_log, log_info
from ..telemetry.metrics import Metrics
from .system_lock import LockBusy, SystemLocks

log = logging.getLogger(__name__)

OUTCOMES = ("ok", "corrupt", "unverifiable", "error")
# a pass waits at least this long for a busy system before leaving it to the next pass
LOCK_WAIT_SECONDS = 1.0
# between passes: never longer than this, so a backup due soon is not left long
MAX_IDLE_SECONDS = 3600.0


@dataclass(frozen=True, slots=True)
class Due:
    folder: SystemFolder
    info: BackupInfo

    @property
    def order(self) -> tuple[int, datetime, str]:
        """Never-verified first (oldest upload first), then the oldest verification."""
        if self.info.verified_at is None:
            return (0, self.info.uploaded_at, self.info.id)
        return (1, self.info.verified_at, self.info.id)


class Throttle:
    """At most `rate` bytes a second, measured over the whole pass."""

    def __init__(self, rate: float, clock: Callable[[], float]) -> None:
        self._rate = rate
        self._clock = clock
        self._started = clock()
        self._bytes = 0

    async def took(self, count: int) -> None:
        self._bytes += count
        ahead = self._bytes / self._rate - (self._clock() - self._started)
        if ahead > 0:
            await asyncio.sleep(ahead)


class Verifier:
    """Re-reads backups (see the module's docstring); `start` runs passes in the background."""

    def __init__(
        self,
        config: VerifyConfig,
        store: BackupStore,
        locks: SystemLocks,
        rate: float | None = None,
    ) -> None:
        self._interval = timedelta(days=config.interval_days)
        self._rate = rate if rate is not None else float(config.max_bytes_per_second)
        self._store = store
        self._locks = locks  # purpose "verify"
        self.outcomes: Counter[str] = Counter()
        self.corrupt: set[str] = set()  # relative keys found corrupt and still held
        self._task: asyncio.Future[None] | None = None

    def export_metrics(self, metrics: Metrics) -> None:
        metrics.add_labeled_reading(
            "counter",
            "gateway_backup_verifications",
            "Backups re-read by the verifier, by outcome: ok, corrupt, unverifiable (no sha256 "
            "stored), error",
            "outcome",
            lambda: {outcome: self.outcomes[outcome] for outcome in OUTCOMES},
        )
        metrics.add_reading(
            "gauge",
            "gateway_backups_corrupt",
            "Backups the verifier found corrupt that storage still holds",
            lambda: len(self.corrupt),
        )

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run_forever())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run_forever(self) -> None:
        while True:
            try:
                next_due = await self.run_pass()
            except StorageError as exc:
                log.warning("verification pass stopped: %s", exc)
                next_due = None
            idle = MAX_IDLE_SECONDS
            if next_due is not None:
                idle = min(idle, max(1.0, (next_due - datetime.now(UTC)).total_seconds()))
            await asyncio.sleep(idle)

    async def due(self, only: SystemFolder | None = None) -> tuple[list[Due], datetime | None]:
        """The backups due now in the order they are read, and when the next one falls due."""
        folders = [only] if only is not None else await self._store.system_folders()
        now = datetime.now(UTC)
        due: list[Due] = []
        next_due: datetime | None = None
        for folder in folders:
            for info in await self._store.list_backups(folder):
                if info.verified_at is None or info.verified_at + self._interval <= now:
                    due.append(Due(folder, info))
                else:
                    when = info.verified_at + self._interval
                    next_due = when if next_due is None else min(next_due, when)
        due.sort(key=lambda d: d.order)
        return due, next_due

    async def run_pass(
        self,
        only: SystemFolder | None = None,
        progress: Callable[[Due, str], None] | None = None,
        force: bool = False,
    ) -> datetime | None:
        """Verify every backup due (every backup at all with `force`); when the next falls
        due. `progress(due, outcome)` is told of each one read."""
        backups, next_due = await self.due(only)
        if force:
            backups = await self.everything(only)
        throttle = Throttle(self._rate, asyncio.get_running_loop().time)
        for item in backups:
            outcome = await self.verify(item, throttle)
            if progress is not None:
                progress(item, outcome)
        return next_due

    async def everything(self, only: SystemFolder | None) -> list[Due]:
        folders = [only] if only is not None else await self._store.system_folders()
        found = [Due(f, info) for f in folders for info in await self._store.list_backups(f)]
        found.sort(key=lambda d: d.order)
        return found

    async def verify(self, item: Due, throttle: Throttle) -> str:
        """Read one backup and record what was found; its outcome, also counted."""
        location = item.folder.location(item.info.id)
        try:
            async with self._locks.hold(item.folder, LOCK_WAIT_SECONDS):
                outcome = await self._read_and_record(location, throttle)
        except LockBusy:
            return "busy"  # another process verifies this system now
        except BackupNotFound:
            self.corrupt.discard(location.relative_key)
            return "gone"
        except StorageError as exc:
            log.warning("verification of %s failed: %s", location.relative_key, exc)
            outcome = "error"
        self.outcomes[outcome] += 1
        return outcome

    async def _read_and_record(self, location: BackupLocation, throttle: Throttle) -> str:
        reader = await self._store.open_reader(location)
        try:
            stored = reader.info.sha256
            if not stored:
                return "unverifiable"  # never a hash computed now as the reference
            digest = hashlib.sha256()
            async for chunk in reader.chunks(0, reader.info.size):
                # hashlib lets go of the GIL on large buffers: the loop keeps serving
                await asyncio.to_thread(digest.update, chunk)
                await throttle.took(len(chunk))
        finally:
            await reader.close()
        outcome = "ok" if hmac.compare_digest(digest.hexdigest(), stored) else "corrupt"
        await self._store.set_verified(location, outcome, datetime.now(UTC))
        if outcome == "corrupt":
            self.corrupt.add(location.relative_key)
            log.error(
                "backup %s is corrupt: its bytes no longer have the sha256 stored with it",
                location.relative_key,
                extra={"fields": {"backup_id": location.backup_id}},
            )
            log_info(
                audit_log,
                "backup corrupt",
                {
                    "organization_id": location.organization_id,
                    "system_key": location.system_key,
                    "backup_id": location.backup_id,
                    "size": reader.info.size,
                },
            )
        else:
            self.corrupt.discard(location.relative_key)
        return outcome


BACKUP_VERIFIER = web.AppKey("backup_verifier", Verifier)
