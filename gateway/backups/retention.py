"""Retention (DESIGN.md §11): prune every backup the keep rules do not keep.

A pruning run holds the system's lock (`system_lock`), lists the system's backups after
the upload that started it was committed, and deletes what `keep_rules` leaves out, oldest
first, confirming the lock's lease before each delete. With a byte cap an upload's commit
checks the rules under that lock, and hands the lock on to the run with that decision: the
commit is the only change since, so it is the listing the run would take, not taken
twice. The run goes on after the 201, in the background with a deadline of its own
(`retention.prune_seconds`); a sweep at start-up and every `retention.sweep_seconds`
prunes every system, catching up on runs that failed, were skipped or ran out of time. A
long backlog is pruned in slices, the lock let go between them, so an upload's commit
never waits long behind it.
Every prune is audited and drops the organization's usage counter, as a delete does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from storage_backends import (
    BackupInfo,
    BackupNotFound,
    BackupStore,
    StorageError,
    SystemFolder,
)
from storage_backends.ids import backup_unix_ms

from ..config import RetentionConfig
from ..fleet import FleetIndex
from ..telemetry.logs import audit_log, log_info
from ..telemetry.metrics import Metrics
from .keep_rules import KeepPolicy
from .kept import Decision, decide
from .system_lock import Lease, LockBusy, SystemLocks

log = logging.getLogger(__name__)

SLICE_SECONDS = 2.0  # the longest the lock is held by one slice of a backlog's prunes

# Told of each backup pruned: its organization, so the usage counter can be dropped.
Pruned = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class Cause:
    """What started a run, for its audit lines: an upload's request, or the sweep."""

    request_id: str | None = None
    system_id: str | None = None


SWEEP = Cause()


def policy_of(config: RetentionConfig) -> KeepPolicy:
    return KeepPolicy(
        last=config.keep_last,
        daily=config.keep_daily,
        weekly=config.keep_weekly,
        monthly=config.keep_monthly,
    )


class Retention:
    def __init__(
        self,
        config: RetentionConfig,
        store: BackupStore,
        locks: SystemLocks,
        pruned: Pruned | None = None,
        fleet: FleetIndex | None = None,
    ) -> None:
        self._policy = policy_of(config)
        self._prune_seconds = config.prune_seconds
        self._sweep_seconds = config.sweep_seconds
        self._store = store
        self._locks = locks
        self._pruned = pruned
        self._fleet = fleet  # told of every prune (DESIGN.md §13)
        self._queued: dict[str, SystemFolder] = {}  # systems whose run is due, not started
        self._tasks: set[asyncio.Task[Any]] = set()  # runs after uploads
        self._sweeper: asyncio.Future[None] | None = None
        self.runs: Counter[str] = Counter()
        self.prunes = 0

    @property
    def policy(self) -> KeepPolicy:
        return self._policy

    def export_metrics(self, metrics: Metrics) -> None:
        metrics.add_labeled_reading(
            "counter",
            "gateway_retention_runs",
            "Pruning runs by outcome: done, busy (another holder kept the lock), timeout, "
            "lost_lock, failed",
            "outcome",
            lambda: dict(self.runs),
        )
        metrics.add_reading(
            "counter",
            "gateway_retention_prunes",
            "Backups pruned because no keep rule keeps them",
            lambda: self.prunes,
        )

    # ------------------------------------------------------------------ after an upload

    def prune_soon(self, folder: SystemFolder, cause: Cause) -> None:
        """Run the system's pruning in the background; one queued run per system covers
        every upload that asked before it started listing."""
        if not self._policy.prunes or folder.system_key in self._queued:
            return
        self._queued[folder.system_key] = folder
        self._spawn(self._run_queued(folder, cause))

    async def _run_queued(self, folder: SystemFolder, cause: Cause) -> None:
        outcome = await self.prune_system(folder, cause, started=self._queued)
        if outcome == "busy":  # another holder: try once more after it, the sweep after that
            self._queued.setdefault(folder.system_key, folder)
            await self.prune_system(folder, cause, started=self._queued)

    def _spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        tasks = [*self._tasks, *([self._sweeper] if self._sweeper else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def settled(self) -> None:
        """Wait for the runs after uploads in flight (the sweep goes on)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # ------------------------------------------------------------------ one system

    async def prune_system(
        self,
        folder: SystemFolder,
        cause: Cause = SWEEP,
        started: dict[str, SystemFolder] | None = None,
    ) -> str:
        """One run over one system, within `prune_seconds`; its outcome, also counted."""
        try:
            async with self._run(folder) as outcome:
                if cause is SWEEP and await self._nothing_to_prune(folder):
                    return "done"
                while True:
                    left = await self._one_slice(folder, cause, started)
                    if not left:
                        break
        finally:
            if started is not None:
                started.pop(folder.system_key, None)
        return outcome.value

    def prune_decided(
        self,
        folder: SystemFolder,
        decision: Decision,
        lease: Lease,
        cause: Cause,
    ) -> None:
        """An upload's run, on the lock it hands over right after its commit (`lease`, held
        until the run ends) and on the decision its last check took under that lock (with
        the new backup in it): the same listing a run of its own would take, without taking
        it again. A backlog longer than one slice goes on as any run."""
        held = lease.hand_over()

        async def run() -> None:
            left = False
            async with self._run(folder) as outcome, held:
                left = await self._prune_slice(lease, folder, decision, cause)
            if left and outcome.value == "done":
                self.prune_soon(folder, cause)

        self._spawn(run())

    @contextlib.asynccontextmanager
    async def _run(self, folder: SystemFolder) -> AsyncIterator[_Outcome]:
        """A run within `prune_seconds`: its outcome told, counted and, unless done or
        busy, logged."""
        outcome = _Outcome()
        try:
            async with asyncio.timeout(self._prune_seconds):
                yield outcome
        except LockBusy:
            outcome.value = "busy"
        except TimeoutError:
            outcome.value = "timeout"
        except _LostLock:
            outcome.value = "lost_lock"
        except StorageError as exc:
            outcome.value = "failed"
            log.warning("retention of %s stopped: %s", folder.system_key, exc)
        self.runs[outcome.value] += 1
        if outcome.value not in ("done", "busy"):
            log.warning(
                "retention of %s: %s, the sweep catches up",
                folder.system_key,
                outcome.value,
                extra={"fields": {"system_key": folder.system_key, "outcome": outcome.value}},
            )

    async def _one_slice(
        self, folder: SystemFolder, cause: Cause, started: dict[str, SystemFolder] | None
    ) -> bool:
        """Prune under the lock for at most SLICE_SECONDS; True when more is left."""
        async with self._locks.hold(folder, wait_seconds=self._prune_seconds) as lease:
            if started is not None:
                # from here on the listing sees every upload committed so far: a later one
                # queues a run of its own
                started.pop(folder.system_key, None)
            # Names and sizes decide, and the state of the backups a rule would keep (a
            # corrupt one gives its slot away)
            decision = await decide(self._store, folder, self._policy)
            return await self._prune_slice(lease, folder, decision, cause)

    async def _prune_slice(
        self, lease: Lease, folder: SystemFolder, decision: Decision, cause: Cause
    ) -> bool:
        """What `decision` leaves out, oldest first, for at most SLICE_SECONDS; True when
        more is left. A backup the rules leave out is described right before it goes, for
        its protection, unless the decision's listing described it already: protection
        changes only under the lock, held since."""
        loop = asyncio.get_running_loop()
        doomed = sorted(decision.unkept(), key=lambda b: (backup_unix_ms(b), b))
        until = loop.time() + SLICE_SECONDS
        for backup_id in doomed:
            if loop.time() >= until:
                return True
            info = decision.known.get(backup_id)
            try:
                if info is None:
                    info = await self._store.describe(folder.location(backup_id))
            except BackupNotFound:
                continue  # deleted meanwhile
            if not info.protected:
                await self._prune_one(lease, folder, info, cause)
        return False

    async def _nothing_to_prune(self, folder: SystemFolder) -> bool:
        """Whether the rules keep every backup, by a look without the lock: a sweep then
        leaves the system alone (no lock taken, no lock file made)."""
        return not (await decide(self._store, folder, self._policy)).unkept()

    async def _prune_one(
        self, lease: Lease, folder: SystemFolder, info: BackupInfo, cause: Cause
    ) -> None:
        if not await lease.still_held():
            raise _LostLock(folder.system_key)
        ticket = None if self._fleet is None else self._fleet.ticket()
        try:
            await self._store.delete(folder.location(info.id))
        except BackupNotFound:
            return  # deleted meanwhile: nothing left to prune
        except StorageError:
            _audit_prune(cause, folder, info, "prune failed")
            raise
        self.prunes += 1
        _audit_prune(cause, folder, info, "backup pruned")
        if self._fleet is not None and ticket is not None:
            self._fleet.removed(folder, info.id, info.size, ticket)
        if self._pruned is not None:
            self._pruned(folder.organization_id)

    # ------------------------------------------------------------------ every system

    async def sweep_forever(self) -> None:
        """A sweep at start-up, then every `sweep_seconds`."""
        while True:
            await self.sweep()
            await asyncio.sleep(self._sweep_seconds)

    def start_sweeping(self) -> None:
        if self._policy.prunes and self._store.capabilities.lists_folders:
            self._sweeper = asyncio.ensure_future(self.sweep_forever())

    async def sweep(self) -> Counter[str]:
        """Prune every system folder in storage once; the runs' outcomes."""
        outcomes: Counter[str] = Counter()
        try:
            folders = await self._store.system_folders()
        except StorageError as exc:
            log.warning("retention sweep skipped, storage cannot be listed: %s", exc)
            outcomes["failed"] += 1
            return outcomes
        for folder in folders:
            outcomes[await self.prune_system(folder)] += 1
        log.info("retention sweep done", extra={"fields": dict(outcomes)})
        return outcomes


RETENTION = web.AppKey("retention", Retention)


@dataclass(slots=True)
class _Outcome:
    value: str = "done"


class _LostLock(Exception):
    """The lock's lease ran out under this holder: it must change nothing more."""


def _audit_prune(cause: Cause, folder: SystemFolder, info: BackupInfo, outcome: str) -> None:
    log_info(
        audit_log,
        "backup prune",
        {
            "request_id": cause.request_id,
            "system_id": cause.system_id,
            "organization_id": folder.organization_id,
            "system_key": folder.system_key,
            "backup_id": info.id,
            "size": info.size,
            "reason": "corrupt" if info.integrity == "corrupt" else "kept by no rule",
            "outcome": outcome,
        },
    )
