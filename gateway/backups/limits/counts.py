"""Counts per key and time window, shared across processes: the upload rate and the brake.

A key names its window (`…:<unix // 60>`), so a count never needs resetting: the next
window is another key, and an ended one expires. Each count is one atomic step wherever
it lives: the platform's Redis (one MULTI, or a script), the host's file (one
transaction), or, while the shared place cannot answer, this process's memory.

`add_tracked` bounds how many keys a window tracks (a tally of the keys it created): a
flood of attempt keys (every address, every key name guessed) is not tracked one by one
beyond the bound, rather than growing Redis or the file without end.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Mapping
from typing import Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .host_file import HostFile

log = logging.getLogger(__name__)

REDIS_SECONDS = 1.0
SHARED_FAILURES = (RedisError, OSError, TimeoutError, sqlite3.Error)


class Counts(Protocol):
    async def add(self, keys: Mapping[str, int]) -> dict[str, int]:
        """Count one under each key (kept at least its value in seconds); the counts."""
        ...

    async def add_tracked(self, key: str, seconds: int, tally: str, most: int) -> int | None:
        """Count one under `key`; None, counting nothing, when `key` is new and `tally`
        already counts `most` keys created."""
        ...


# KEYS: the key, the tally; ARGV: seconds, most
_ADD_TRACKED = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  local created = redis.call('INCR', KEYS[2])
  redis.call('EXPIRE', KEYS[2], ARGV[1])
  if created > tonumber(ARGV[2]) then return false end
end
local count = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[1])
return count
"""


class RedisCounts:
    def __init__(self, client: aioredis.Redis) -> None:
        self._redis = client
        self._add_tracked = client.register_script(_ADD_TRACKED)

    async def add(self, keys: Mapping[str, int]) -> dict[str, int]:
        async with asyncio.timeout(REDIS_SECONDS):
            pipe = self._redis.pipeline(transaction=True)
            for key, seconds in keys.items():
                pipe.incr(key)
                pipe.expire(key, seconds)
            replies = await pipe.execute()
        return {key: int(count) for key, count in zip(keys, replies[::2], strict=True)}

    async def add_tracked(self, key: str, seconds: int, tally: str, most: int) -> int | None:
        async with asyncio.timeout(REDIS_SECONDS):
            count = await self._add_tracked(keys=[key, tally], args=[seconds, most])
        return None if count is None else int(count)


class HostCounts:
    def __init__(self, host: HostFile) -> None:
        self._host = host

    async def add(self, keys: Mapping[str, int]) -> dict[str, int]:
        now = time.time()  # one host, one clock: every worker agrees on the windows

        def count(db: sqlite3.Connection) -> dict[str, int]:
            _forget_ended(db, now)
            return {key: _increment(db, key, now + seconds) for key, seconds in keys.items()}

        return await self._host.transaction(count)

    async def add_tracked(self, key: str, seconds: int, tally: str, most: int) -> int | None:
        now = time.time()

        def count(db: sqlite3.Connection) -> int | None:
            _forget_ended(db, now)
            known = db.execute("SELECT 1 FROM counts WHERE key = ?", (key,)).fetchone()
            if known is None and _increment(db, tally, now + seconds) > most:
                return None
            return _increment(db, key, now + seconds)

        return await self._host.transaction(count)


def _forget_ended(db: sqlite3.Connection, now: float) -> None:
    db.execute("DELETE FROM counts WHERE expires_at < ?", (now,))


def _increment(db: sqlite3.Connection, key: str, expires_at: float) -> int:
    (count,) = db.execute(
        "INSERT INTO counts (key, count, expires_at) VALUES (?, 1, ?)"
        " ON CONFLICT (key) DO UPDATE SET count = count + 1 RETURNING count",
        (key, expires_at),
    ).fetchone()
    return int(count)


class SharedCounts:
    """Counts in the shared place, or in this process's memory while it cannot answer (a
    limit then holds per process only: logged, and counted in `failures`)."""

    def __init__(self, shared: Counts, here: HostFile, what: str) -> None:
        self._shared = shared
        self._here = HostCounts(here)
        self._what = what
        self.failures = 0

    async def add(self, keys: Mapping[str, int]) -> dict[str, int]:
        try:
            return await self._shared.add(keys)
        except SHARED_FAILURES as exc:
            self._failed(exc)
        return await self._here.add(keys)

    async def add_tracked(self, key: str, seconds: int, tally: str, most: int) -> int | None:
        try:
            return await self._shared.add_tracked(key, seconds, tally, most)
        except SHARED_FAILURES as exc:
            self._failed(exc)
        return await self._here.add_tracked(key, seconds, tally, most)

    def _failed(self, exc: BaseException) -> None:
        self.failures += 1
        log.warning("%s counted in this process only: %s", self._what, type(exc).__name__)
