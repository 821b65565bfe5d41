"""One holder of a system's lock at a time, across every process that shares the storage.

Whatever changes which backups a system keeps holds it: an upload's last check and commit,
a pruning run, a protection change, a delete. Layers, each taken in turn:

- this process: an asyncio lock per system key;
- every process: the Redis lock `backup:retention:<system_key>` (the platform's name)
  when Redis is set, with a lease the holder renews before each change it makes, so a
  holder paused past its lease learns it lost the lock and changes nothing more; without
  Redis, a store that keeps a folder lock (local disk: an flock in the system's folder)
  gives one to the workers of its host. S3 without Redis has no shared lock: one process
  only (more is a config error).

When Redis cannot answer, the folder lock stands in where there is one; otherwise the
holder goes on with this process's lock alone, and says so (`across_processes` False).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from aiohttp import web
from redis.asyncio.lock import Lock as RedisLock
from redis.exceptions import LockError, RedisError

from storage_backends import BackupStore, FolderLock, StorageError, SystemFolder

from ..http.errors import ApiError

log = logging.getLogger(__name__)

LEASE_SECONDS = 10.0  # a holder that dies frees the Redis lock this soon


# how long a user's change (a delete, a protection) waits for its system's lock
CHANGE_LOCK_WAIT_SECONDS = 5.0


class LockBusy(Exception):
    """The system's lock stayed held by another holder for as long as the caller waits."""


@dataclass
class Lease:
    """A held lock. `still_held()` before each change: False means stop changing things."""

    system_key: str
    across_processes: bool  # False: only this process's lock is held
    _redis_lock: RedisLock | None = field(default=None, repr=False)
    _held: contextlib.AsyncExitStack | None = field(default=None, repr=False)

    def hand_over(self) -> contextlib.AsyncExitStack:
        """The lock goes on past the end of `hold`: closing what this returns lets it go.
        An upload hands its lock to the pruning run after its commit, so the run decides
        from the listing the commit's check took (nothing else changes under the lock)."""
        assert self._held is not None, "handed over twice"
        held, self._held = self._held.pop_all(), None
        return held

    async def still_held(self) -> bool:
        if self._redis_lock is None:
            return True
        try:
            await self._redis_lock.reacquire()  # renews the lease, or fails when it is gone
            return True
        except (LockError, RedisError, OSError) as exc:
            log.warning(
                "system lock of %s lost: %s", self.system_key, type(exc).__name__,
                extra={"fields": {"system_key": self.system_key}},
            )  # fmt: skip
            return False


class _ReadWriteLock:
    """This process's part: any number of shared holders or one exclusive holder; a waiting
    exclusive holder goes before shared ones that come after it, so deletes never starve
    a pruner."""

    def __init__(self) -> None:
        self._changed = asyncio.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0
        self.users = 0  # holders and waiters: the lock is dropped when none is left

    async def acquire(self, shared: bool) -> None:
        async with self._changed:
            if shared:
                await self._changed.wait_for(lambda: not self._writer and not self._writers_waiting)
                self._readers += 1
                return
            self._writers_waiting += 1
            try:
                await self._changed.wait_for(lambda: not self._writer and not self._readers)
            finally:
                self._writers_waiting -= 1
            self._writer = True

    async def release(self, shared: bool) -> None:
        async with self._changed:
            if shared:
                self._readers -= 1
            else:
                self._writer = False
            self._changed.notify_all()


class SystemLocks:
    def __init__(
        self,
        store: BackupStore,
        client: aioredis.Redis | None,
        lease_seconds: float = LEASE_SECONDS,
        purpose: str = "retention",
    ) -> None:
        self._store = store
        self._redis = client
        self._lease = lease_seconds
        # one lock per purpose and system: backup:retention:<key>, backup:verify:<key>
        self._purpose = purpose
        self._here: dict[str, _ReadWriteLock] = {}

    @contextlib.asynccontextmanager
    async def hold(
        self,
        folder: SystemFolder,
        wait_seconds: float,
        shared: bool = False,
        folder_lock: bool = True,
    ) -> AsyncIterator[Lease]:
        """Hold the system's lock; LockBusy when it is not had within `wait_seconds`.

        Exclusive (the default) for what decides from the whole system: a pruning run, an
        upload's last check and commit, a protection change. Shared for a delete of one
        backup: deletes go on side by side, and none overlaps an exclusive holder — on
        this host. Across hosts only exclusive holders exclude each other (through Redis);
        on S3 a bucket's Object Lock legal hold guards a protected backup itself.

        Without `folder_lock` the store's folder lock is left to the caller's store
        operation (`delete_unprotected_now` takes it itself)."""
        async with contextlib.AsyncExitStack() as held:
            lease = await self._take(held, folder, wait_seconds, shared, folder_lock)
            lease._held = held
            yield lease

    async def _take(
        self,
        held: contextlib.AsyncExitStack,
        folder: SystemFolder,
        wait_seconds: float,
        shared: bool,
        folder_lock: bool,
    ) -> Lease:
        """Each layer taken in turn, its release pushed on `held` (the last taken goes
        first)."""
        key = folder.system_key
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_seconds
        lock = self._here.setdefault(key, _ReadWriteLock())
        lock.users += 1
        held.callback(self._left, key, lock)
        try:
            async with asyncio.timeout(wait_seconds):
                await lock.acquire(shared)
        except TimeoutError:
            raise LockBusy(key) from None
        held.push_async_callback(_release, lock, shared)
        left = max(0.0, deadline - loop.time())
        return await held.enter_async_context(
            self._across_processes(folder, left, shared, folder_lock)
        )

    def _left(self, key: str, lock: _ReadWriteLock) -> None:
        lock.users -= 1
        if not lock.users:
            del self._here[key]

    @contextlib.asynccontextmanager
    async def _across_processes(
        self, folder: SystemFolder, wait_seconds: float, shared: bool, folder_lock: bool
    ) -> AsyncIterator[Lease]:
        async with contextlib.AsyncExitStack() as held:
            redis_lock = None
            if self._redis is not None and not shared:
                redis_lock = await held.enter_async_context(
                    self._redis_lock(folder.system_key, wait_seconds)
                )
            on_host = False
            if folder_lock and self._store.capabilities.locks_folders:
                on_host = await held.enter_async_context(
                    self._folder_lock(folder, wait_seconds, shared)
                )
            yield Lease(
                folder.system_key,
                across_processes=redis_lock is not None or on_host,
                _redis_lock=redis_lock,
            )

    @contextlib.asynccontextmanager
    async def _redis_lock(self, key: str, wait_seconds: float) -> AsyncIterator[RedisLock | None]:
        """The lock in Redis; None when Redis cannot answer (the holder goes on without)."""
        assert self._redis is not None
        redis_lock = self._redis.lock(
            f"backup:{self._purpose}:{key}", timeout=self._lease, blocking_timeout=wait_seconds
        )
        try:
            taken = await redis_lock.acquire()
        except (RedisError, OSError) as exc:
            log.warning("system lock not taken in Redis: %s", type(exc).__name__)
            yield None
            return
        if not taken:
            raise LockBusy(key)
        try:
            yield redis_lock
        finally:
            with contextlib.suppress(LockError, RedisError, OSError):
                await redis_lock.release()

    @contextlib.asynccontextmanager
    async def _folder_lock(
        self, folder: SystemFolder, wait_seconds: float, shared: bool
    ) -> AsyncIterator[bool]:
        """The store's lock on the folder; False when it cannot be made (logged)."""
        folder_lock: FolderLock = self._store.lock_folder(folder, self._purpose)
        try:
            taken = await folder_lock.acquire(wait_seconds, shared)
        except StorageError as exc:
            log.warning("system folder lock not taken: %s", exc)
            yield False
            return
        if not taken:
            raise LockBusy(folder.system_key)
        try:
            yield True
        finally:
            await folder_lock.release()


async def _release(lock: _ReadWriteLock, shared: bool) -> None:
    await asyncio.shield(lock.release(shared))


SYSTEM_LOCKS = web.AppKey("system_locks", SystemLocks)


@contextlib.asynccontextmanager
async def system_changes(
    request: web.Request, folder: SystemFolder, shared: bool = False, folder_lock: bool = True
) -> AsyncIterator[Lease]:
    """Hold the system's lock for a user's change (shared for a delete, exclusive for a
    protection): 503 with `Retry-After` when another holder keeps it longer than a request
    should wait. `folder_lock` as in `SystemLocks.hold`."""
    locks = request.app[SYSTEM_LOCKS]
    wait = CHANGE_LOCK_WAIT_SECONDS
    try:
        async with locks.hold(folder, wait, shared=shared, folder_lock=folder_lock) as lease:
            yield lease
    except LockBusy:
        raise ApiError(503, "backup busy, retry later", headers={"Retry-After": "1"}) from None
