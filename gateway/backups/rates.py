"""Upload rate limits (DESIGN.md §9) and the brake on guessing appliance secrets.

Uploads per system are counted per minute and per hour under the platform's own keys
(`backup:rate:min:<system_key>:<unix/60>`, `backup:rate:hour:<system_key>:<unix/3600>`)
in Redis when it is configured, so every gateway process and the platform's ingest
service share one count; without Redis (or while it cannot answer) each process counts
for itself. A refused upload counts too, as the platform's does: a caller that ignores
`Retry-After` stays refused until the window turns.

Failed appliance logins are counted per client address, key named and minute, in this
process; only failures are braked, never a correct credential.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

REDIS_SECONDS = 1.0
_WINDOWS = (("min", 60), ("hour", 3600))
MAX_TRACKED_ADDRESSES = 65536


class UploadRates:
    def __init__(
        self,
        per_minute: int,
        per_hour: int,
        client: aioredis.Redis | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._limits = {"min": per_minute, "hour": per_hour}
        self._redis = client
        self._clock = clock
        self._local: dict[str, int] = {}
        self._local_window = ""
        self.redis_failures = 0

    async def admit(self, system_key: str) -> int | None:
        """Count one upload; None when within the limits, else the seconds to wait."""
        if not any(self._limits.values()):
            return None
        now = self._clock()
        keys = {
            name: f"backup:rate:{name}:{system_key}:{int(now // size)}" for name, size in _WINDOWS
        }
        counts = await self._count(keys)
        for name, size in _WINDOWS:
            limit = self._limits[name]
            if limit and counts[name] > limit:
                return max(1, math.ceil(size - now % size))
        return None

    async def _count(self, keys: dict[str, str]) -> dict[str, int]:
        if self._redis is not None:
            try:
                async with asyncio.timeout(REDIS_SECONDS):
                    pipe = self._redis.pipeline(transaction=True)
                    for name, size in _WINDOWS:
                        pipe.incr(keys[name])
                        pipe.expire(keys[name], size * 2)
                    replies = await pipe.execute()
                return {"min": int(replies[0]), "hour": int(replies[2])}
            except (RedisError, OSError, TimeoutError) as exc:
                self.redis_failures += 1
                log.warning("upload rate counted in this process only: %s", type(exc).__name__)
        return self._count_here(keys)

    def _count_here(self, keys: dict[str, str]) -> dict[str, int]:
        window = keys["min"].rsplit(":", 1)[1]
        if window != self._local_window:
            # a new minute: drop the counts of windows that ended (every system's)
            minute, hour = (f":{w}" for w in (window, keys["hour"].rsplit(":", 1)[1]))
            self._local = {
                k: v
                for k, v in self._local.items()
                if k.endswith(minute if k.startswith("backup:rate:min:") else hour)
            }
            self._local_window = window
        counts = {}
        for name, key in keys.items():
            self._local[key] = counts[name] = self._local.get(key, 0) + 1
        return counts


class FailedLogins:
    """Failed appliance logins per attempt key (address and system key) and minute; a
    failure beyond the limit is answered 429 instead of 401. Only failures are counted and
    braked: a correct credential is never refused, however many others failed."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._limit = per_minute
        self._clock = clock
        self._window = -1
        self._failures: dict[str, int] = {}

    def _turn(self) -> None:
        window = int(self._clock() // 60)
        if window != self._window:
            self._window = window
            self._failures = {}

    def failed(self, address: str) -> int | None:
        """Count one failure; None while within the limit, else the seconds until the
        minute turns and this attempt key's count starts again."""
        if not self._limit:
            return None
        self._turn()
        if len(self._failures) >= MAX_TRACKED_ADDRESSES and address not in self._failures:
            return None  # bounded memory: a flood of addresses is not tracked one by one
        count = self._failures[address] = self._failures.get(address, 0) + 1
        if count <= self._limit:
            return None
        return max(1, math.ceil(60 - self._clock() % 60))
