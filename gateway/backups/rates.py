"""Upload rate limits (DESIGN.md §9) and the brake on guessing appliance secrets.

Uploads per system are counted per minute and per hour under the platform's own keys
(`backup:rate:min:<system_key>:<unix/60>`, `backup:rate:hour:<system_key>:<unix/3600>`)
in Redis when it is configured, so every gateway process and the platform's ingest
service share one count; without Redis, under the same names in the host's file
(`limits.host_file`), so the workers of a host share one count. A refused upload counts
too, as the platform's does: a caller that ignores `Retry-After` stays refused until the
window turns.

Failed appliance logins are counted per client address, key named and minute, in keys of
our own (`backup_gateway:failed_login:<unix/60>:<address> <key>`), shared the same way;
only failures are braked, never a correct credential.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from .limits.counts import Counts

_WINDOWS = (("min", 60), ("hour", 3600))
# attempt keys tracked per minute; beyond it a flood of new ones is not braked one by one
MAX_TRACKED_ATTEMPTS = 65536


class UploadRates:
    def __init__(
        self,
        per_minute: int,
        per_hour: int,
        counts: Counts,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._limits = {"min": per_minute, "hour": per_hour}
        self._counts = counts
        self._clock = clock

    async def admit(self, system_key: str) -> int | None:
        """Count one upload; None when within the limits, else the seconds to wait."""
        if not any(self._limits.values()):
            return None
        now = self._clock()
        keys = {
            name: f"backup:rate:{name}:{system_key}:{int(now // size)}" for name, size in _WINDOWS
        }
        counts = await self._counts.add({keys[name]: size * 2 for name, size in _WINDOWS})
        for name, size in _WINDOWS:
            limit = self._limits[name]
            if limit and counts[keys[name]] > limit:
                return max(1, math.ceil(size - now % size))
        return None


class FailedLogins:
    """Failed appliance logins per attempt key (address and system key) and minute; a
    failure beyond the limit is answered 429 instead of 401. Only failures are counted and
    braked: a correct credential is never refused, however many others failed."""

    def __init__(
        self, per_minute: int, counts: Counts, clock: Callable[[], float] = time.time
    ) -> None:
        self._limit = per_minute
        self._counts = counts
        self._clock = clock  # the wall clock: every process, every host, one minute

    async def failed(self, attempt: str) -> int | None:
        """Count one failure; None while within the limit, else the seconds until the
        minute turns and this attempt key's count starts again."""
        if not self._limit:
            return None
        now = self._clock()
        minute = int(now // 60)
        count = await self._counts.add_tracked(
            f"backup_gateway:failed_login:{minute}:{attempt}",
            120,
            f"backup_gateway:failed_login:{minute}",
            MAX_TRACKED_ATTEMPTS,
        )
        if count is None or count <= self._limit:
            return None
        return max(1, math.ceil(60 - now % 60))
