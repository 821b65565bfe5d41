"""Names that differ from another only in case, found by a scan in the background.

On a case-insensitive disk `acme` and `ACME` are one folder: a system whose system key or
organization id has such a twin is never served (hostile input #6). The platform has no
index on lower(...), so asking that of every lookup would scan its tables every time (at
200,000 systems, 200 ms a lookup). Instead a scan runs every `every` seconds, outside the
lookups' pool, and each lookup checks its answer against the latest scan in memory.

Bounds: a twin that appears is refused within `every` seconds (at once on `rescan_now`,
SIGHUP). A scan older than twice `every` is not trusted: lookups then wait for the next
one, and fail (DirectoryUnavailable, a 503) rather than serve unchecked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .base import DirectoryUnavailable
from .waiters import answer_all, fail_all

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CaseTwins:
    """Lower-cased names shared, but for case, by more than one row."""

    system_keys: frozenset[str]
    organization_ids: frozenset[str]

    def refuses(self, organization_id: str, system_key: str | None) -> str | None:
        """Which of a system's folder names has a twin ("organization_id", "system_key")."""
        if organization_id.lower() in self.organization_ids:
            return "organization_id"
        if system_key is not None and system_key.lower() in self.system_keys:
            return "system_key"
        return None


Scan = Callable[[], Awaitable[CaseTwins]]
# After a failed scan the next comes after 1 s, then 2, 4, ... up to `every`: a database
# that returns is checked again soon, one that stays away is not asked every second (a
# lookup that needs a scan asks for one at once either way).
FIRST_RETRY_SECONDS = 1.0


class CaseTwinScanner:
    def __init__(
        self,
        scan: Scan,
        every: float,
        on_scan: Callable[[str, float], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._scan = scan
        self._every = every
        self._on_scan = on_scan  # (outcome, seconds): metrics
        self._clock = clock
        self._latest: CaseTwins | None = None
        self._scanned_at = -float("inf")
        self._waiting: list[asyncio.Future[CaseTwins]] = []  # for the next scan's outcome
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._scan_forever())

    async def close(self) -> None:
        if self._task is not None:
            task, self._task = self._task, None
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        fail_all(self._waiting, DirectoryUnavailable("case scan stopped"))

    def rescan_now(self) -> None:
        self._wake.set()

    def age(self) -> float:
        """Seconds since the latest scan that answered (inf: none yet)."""
        return self._clock() - self._scanned_at

    def twins_found(self) -> int:
        latest = self._latest
        return 0 if latest is None else len(latest.system_keys) + len(latest.organization_ids)

    def trusted(self) -> CaseTwins | None:
        """The latest scan, if it is recent enough to trust."""
        latest = self._latest
        return latest if latest is not None and self.age() <= 2 * self._every else None

    async def current(self) -> CaseTwins:
        """The latest scan, if it is recent enough to trust; else the next one's."""
        latest = self.trusted()
        if latest is not None:
            return latest
        if self._task is None:
            raise DirectoryUnavailable("case scan not running")
        waiter: asyncio.Future[CaseTwins] = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        self._wake.set()
        return await waiter

    async def _scan_forever(self) -> None:
        retry, failing = FIRST_RETRY_SECONDS, False
        while True:
            self._wake.clear()
            waiting, self._waiting = self._waiting, []
            started = self._clock()
            try:
                twins = await self._scan()
            except Exception as exc:
                self._report("unavailable", started)
                if not failing:  # once per outage, not once per retry
                    if isinstance(exc, DirectoryUnavailable):
                        log.warning("case scan failed (systems served while it is recent): %s", exc)
                    else:
                        log.exception("case scan failed")
                failure = (
                    exc
                    if isinstance(exc, DirectoryUnavailable)
                    else DirectoryUnavailable(f"case scan: {type(exc).__name__}")
                )
                fail_all(waiting, failure)
                pause = min(self._every, retry)
                retry, failing = min(2 * retry, max(self._every, FIRST_RETRY_SECONDS)), True
            else:
                if failing:
                    log.info("case scan answers again")
                retry, failing = FIRST_RETRY_SECONDS, False
                found = twins.system_keys or twins.organization_ids
                self._report("found" if found else "not_found", started)
                self._announce(twins)
                self._latest, self._scanned_at = twins, started
                answer_all(waiting, twins)
                pause = self._every
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await self._wake.wait()

    def _report(self, outcome: str, started: float) -> None:
        if self._on_scan is not None:
            self._on_scan(outcome, self._clock() - started)

    def _announce(self, twins: CaseTwins) -> None:
        before = self._latest or CaseTwins(frozenset(), frozenset())
        new_keys = len(twins.system_keys - before.system_keys)
        new_organizations = sorted(twins.organization_ids - before.organization_ids)
        if new_keys or new_organizations:
            # organization ids are in tokens and paths already; system keys name an
            # appliance's credentials: counted, not printed (each refusal names its system)
            log.error(
                "case scan: %d system keys and organization ids %s differ from another only "
                "in case; their systems are refused",
                new_keys,
                new_organizations,
            )
