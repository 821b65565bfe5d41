"""A bound on storage operations in flight, so overload turns into quick 503s, not a queue."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from .errors import ApiError


class StorageGate:
    def __init__(self, limit: int, queue_timeout: float) -> None:
        self._semaphore = asyncio.Semaphore(limit)
        self._queue_timeout = queue_timeout

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        try:
            if self._semaphore.locked():
                await asyncio.wait_for(self._semaphore.acquire(), self._queue_timeout)
            else:
                await self._semaphore.acquire()  # free slot: no timer task on the hot path
        except TimeoutError:
            retry_after = str(max(1, round(self._queue_timeout)))
            raise ApiError(
                503, "storage busy, retry later", headers={"Retry-After": retry_after}
            ) from None
        try:
            yield
        finally:
            self._semaphore.release()
