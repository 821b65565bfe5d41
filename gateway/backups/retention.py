"""Retention after an upload (DESIGN.md §9): prune a system's oldest backups, by id.

While the system holds more than `max_backups_per_system` backups or more than
`max_bytes_per_system` bytes, its oldest backup (UUIDv7 ids sort by time) is deleted —
never the one just stored, which the upload's own checks already held to the byte cap.
One pruning at a time per system: an asyncio lock in this process, and the platform's
Redis lock `backup:retention:<system_key>` across processes when Redis is configured.
Every prune is audited and drops the organization's usage counter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import redis.asyncio as aioredis
from redis.exceptions import LockError, RedisError

from storage_backends import (
    BackupInfo,
    BackupNotFound,
    BackupStore,
    StorageError,
    SystemFolder,
)

from ..config import RetentionConfig

log = logging.getLogger(__name__)

LOCK_SECONDS = 60.0  # a pruner that dies frees the Redis lock this soon
LOCK_WAIT_SECONDS = 10.0


class Retention:
    def __init__(self, config: RetentionConfig, client: aioredis.Redis | None) -> None:
        self._max_count = config.max_backups_per_system
        self._max_bytes = config.max_bytes_per_system
        self._redis = client
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def _one_at_a_time(self, system_key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(system_key, (asyncio.Lock(), 0))
        self._locks[system_key] = (lock, users + 1)
        try:
            async with lock:
                shared = None
                if self._redis is not None:
                    shared = self._redis.lock(
                        f"backup:retention:{system_key}",
                        timeout=LOCK_SECONDS,
                        blocking_timeout=LOCK_WAIT_SECONDS,
                    )
                    try:
                        if not await shared.acquire():
                            raise LockError("retention lock busy")
                    except (RedisError, OSError) as exc:
                        # Pruning is idempotent (deleting what is gone is a no-op): go on
                        # under this process's lock rather than leave the system over its cap.
                        log.warning("retention lock not taken: %s", type(exc).__name__)
                        shared = None
                try:
                    yield
                finally:
                    if shared is not None:
                        with contextlib.suppress(RedisError, OSError):
                            await shared.release()
        finally:
            lock, users = self._locks[system_key]
            if users == 1:
                del self._locks[system_key]
            else:
                self._locks[system_key] = (lock, users - 1)

    async def prune(
        self,
        store: BackupStore,
        folder: SystemFolder,
        keep: str,
        pruned: Callable[[BackupInfo, str], None],
    ) -> None:
        """Delete the oldest backups past the caps, never `keep`; `pruned(info, outcome)`
        is told of each. A storage failure stops pruning (logged): the upload stands."""
        if not self._max_count and not self._max_bytes:
            return
        async with self._one_at_a_time(folder.system_key):
            try:
                backups = await store.list_backups(folder)
            except StorageError as exc:
                log.warning("retention skipped, listing failed: %s", exc)
                return
            count = len(backups)
            total = sum(b.size for b in backups)
            for oldest in sorted((b for b in backups if b.id != keep), key=lambda b: b.id):
                over_count = bool(self._max_count) and count > self._max_count
                over_bytes = bool(self._max_bytes) and total > self._max_bytes
                if not over_count and not over_bytes:
                    break
                try:
                    await store.delete(folder.location(oldest.id))
                    pruned(oldest, "backup pruned")
                except BackupNotFound:
                    pass  # deleted meanwhile: it no longer counts
                except StorageError as exc:
                    pruned(oldest, "prune failed")
                    log.warning("retention stopped, a delete failed: %s", exc)
                    return
                count -= 1
                total -= oldest.size
