"""A bound on storage operations in flight, so overload turns into quick 503s, not a queue."""

from __future__ import annotations

import asyncio

from aiohttp import web

from .errors import ApiError


class StorageGate:
    """`await enter()` ... `leave()` around each storage call (plain methods: an
    @asynccontextmanager here cost ~3 % of the gateway's CPU under load)."""

    def __init__(self, limit: int, queue_timeout: float) -> None:
        self._semaphore = asyncio.Semaphore(limit)
        self._queue_timeout = queue_timeout

    async def enter(self) -> None:
        """Take a slot, waiting at most the queue timeout; else 503 with Retry-After."""
        if not self._semaphore.locked():
            await self._semaphore.acquire()  # free slot: no timer on the hot path
            return
        try:
            await asyncio.wait_for(self._semaphore.acquire(), self._queue_timeout)
        except TimeoutError:
            retry_after = str(max(1, round(self._queue_timeout)))
            raise ApiError(
                503, "storage busy, retry later", headers={"Retry-After": retry_after}
            ) from None

    def leave(self) -> None:
        self._semaphore.release()


STORAGE_GATE = web.AppKey("storage_gate", StorageGate)
