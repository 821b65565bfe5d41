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
holder goes on with this process's lock alone, and says so (`shared` False).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from redis.asyncio.lock import Lock as RedisLock
from redis.exceptions import LockError, RedisError

from storage_backends import BackupStore, FolderLock, StorageError, SystemFolder

log = logging.getLogger(__name__)

LEASE_SECONDS = 10.0  # a holder that dies frees the Redis lock this soon


class LockBusy(Exception):
    """The system's lock stayed held by another holder for as long as the caller waits."""


@dataclass
class Lease:
    """A held lock. `still_held()` before each change: False means stop changing things."""

    system_key: str
    shared: bool  # False: only this process's lock is held
    _redis_lock: RedisLock | None = field(default=None, repr=False)

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


class SystemLocks:
    def __init__(
        self,
        store: BackupStore,
        client: aioredis.Redis | None,
        lease_seconds: float = LEASE_SECONDS,
    ) -> None:
        self._store = store
        self._redis = client
        self._lease = lease_seconds
        self._here: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, folder: SystemFolder, wait_seconds: float) -> AsyncIterator[Lease]:
        """Hold the system's lock; LockBusy when it is not had within `wait_seconds`."""
        key = folder.system_key
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_seconds
        lock, users = self._here.get(key, (asyncio.Lock(), 0))
        self._here[key] = (lock, users + 1)
        try:
            try:
                async with asyncio.timeout(wait_seconds):
                    await lock.acquire()
            except TimeoutError:
                raise LockBusy(key) from None
            try:
                left = max(0.0, deadline - loop.time())
                async with self._shared(folder, left) as lease:
                    yield lease
            finally:
                lock.release()
        finally:
            lock, users = self._here[key]
            if users == 1:
                del self._here[key]
            else:
                self._here[key] = (lock, users - 1)

    @contextlib.asynccontextmanager
    async def _shared(self, folder: SystemFolder, wait_seconds: float) -> AsyncIterator[Lease]:
        key = folder.system_key
        if self._redis is not None:
            redis_lock = self._redis.lock(
                f"backup:retention:{key}", timeout=self._lease, blocking_timeout=wait_seconds
            )
            try:
                taken = await redis_lock.acquire()
            except (RedisError, OSError) as exc:
                log.warning("system lock not taken in Redis: %s", type(exc).__name__)
            else:
                if not taken:
                    raise LockBusy(key)
                try:
                    yield Lease(key, shared=True, _redis_lock=redis_lock)
                finally:
                    with contextlib.suppress(LockError, RedisError, OSError):
                        await redis_lock.release()
                return
        if not self._store.capabilities.locks_folders:
            yield Lease(key, shared=False)
            return
        folder_lock: FolderLock = self._store.lock_folder(folder)
        try:
            taken = await folder_lock.acquire(wait_seconds)
        except StorageError as exc:
            log.warning("system folder lock not taken: %s", exc)
            yield Lease(key, shared=False)
            return
        if not taken:
            raise LockBusy(key)
        try:
            yield Lease(key, shared=True)
        finally:
            await folder_lock.release()
