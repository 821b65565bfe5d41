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
import heapq
import hmac
import logging
import operator
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
# backups held at once by a pass (a round reads these, then lists again): memory bounded
# (about 600 bytes each, ~10 MB) however many backups storage holds. Each round lists all
# of storage again, so a round's reading must outweigh a listing: at the default budget
# 16,384 backups take at least 800 s to read, a listing of a million backups about a minute
BATCH = 16384
# what a backup costs of the byte budget at least: its open, its lock and its state's
# durable write cost about as much as reading this, so a folder of tiny backups is not
# verified (and written) hundreds of times a second beside the requests
MIN_CHARGE_BYTES = 1 << 20


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


_ORDER = operator.attrgetter("order")


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

    async def census(self, only: SystemFolder | None = None) -> tuple[int, int]:
        """How many backups there are and their bytes, for a progress bar: one listing,
        nothing of it held."""
        count = size = 0
        for folder in await self._folders(only):
            for info in await self._store.list_backups(folder):
                count += 1
                size += info.size
        return count, size

    async def run_pass(
        self,
        only: SystemFolder | None = None,
        progress: Callable[[Due, str], None] | None = None,
        force: bool = False,
    ) -> datetime | None:
        """Verify every backup due (every backup at all with `force`); when the next falls
        due. `progress(due, outcome)` is told of each one looked at.

        A pass goes in rounds, each a listing that keeps the BATCH most due and reads them:
        memory stays bounded by BATCH whatever storage holds, and what a round read is not
        due in the next (its verification time is now). A round that verified nothing
        (every system busy, or every read failed) ends the pass; the next pass retries."""
        started = datetime.now(UTC)
        throttle = Throttle(self._rate, asyncio.get_running_loop().time)
        first = True
        while True:
            due_before = started if force else datetime.now(UTC) - self._interval
            batch, more, next_due = await self._most_due(only, due_before, first, progress)
            first = False
            progressed = False
            for item in batch:
                outcome = await self.verify(item, throttle)
                progressed = progressed or outcome in ("ok", "corrupt")
                if progress is not None:
                    progress(item, outcome)
            if not more or not progressed:
                return next_due

    async def _most_due(
        self,
        only: SystemFolder | None,
        due_before: datetime,
        first_round: bool,
        progress: Callable[[Due, str], None] | None,
    ) -> tuple[list[Due], bool, datetime | None]:
        """Up to BATCH backups verified before `due_before` (or never), most due first;
        whether more are due; when the first not due falls due. A backup stored without a
        sha256 can never be verified: it is counted (and told to `progress`) in a pass's
        first round, and never taken into a batch."""
        due: list[Due] = []
        more = False
        next_due: datetime | None = None
        for folder in await self._folders(only):
            for info in await self._store.list_backups(folder):
                if not info.sha256:
                    if first_round:
                        self.outcomes["unverifiable"] += 1
                        if progress is not None:
                            progress(Due(folder, info), "unverifiable")
                elif info.verified_at is None or info.verified_at < due_before:
                    due.append(Due(folder, info))
                    if len(due) >= 2 * BATCH:
                        due = heapq.nsmallest(BATCH, due, key=_ORDER)
                        more = True
                else:
                    when = info.verified_at + self._interval
                    next_due = when if next_due is None else min(next_due, when)
        if len(due) > BATCH:
            more = True
        return heapq.nsmallest(BATCH, due, key=_ORDER), more, next_due

    async def _folders(self, only: SystemFolder | None) -> list[SystemFolder]:
        return [only] if only is not None else await self._store.system_folders()

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
        await throttle.took(max(0, MIN_CHARGE_BYTES - reader.info.size))
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
