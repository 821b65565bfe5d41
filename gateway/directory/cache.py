"""A per-process cache in front of a directory that asks a server: bounded age and size.

An answer (found or not found) is reused for at most `seconds`; past that it is asked
again. Concurrent misses for one key share one question, so a burst of requests for a cold
system costs one query, not one each. Failures are never cached and never hidden: the
caller gets DirectoryUnavailable, not the previous answer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

from ..telemetry.metrics import Metrics
from .base import Directory, Organization, System

V = TypeVar("V")
MAX_ENTRIES = 100_000  # a bound on memory, far above a platform's systems in use at once


class _TtlCache(Generic[V]):
    def __init__(self, seconds: float, clock: Callable[[], float]) -> None:
        self._seconds = seconds
        self._clock = clock
        self._entries: dict[str, tuple[float, V | None]] = {}  # key -> (expires, answer)
        self._asking: dict[str, asyncio.Future[V | None]] = {}  # questions in flight

    async def get(self, key: str, ask: Callable[[str], Awaitable[V | None]]) -> V | None:
        entry = self._entries.get(key)
        if entry is not None:
            if entry[0] > self._clock():
                return entry[1]
            del self._entries[key]
        question = self._asking.get(key)
        if question is None:
            # Its own task: a caller that goes away does not cancel the others' question.
            question = asyncio.ensure_future(self._ask(key, ask))
            question.add_done_callback(_retrieve)
            self._asking[key] = question
        return await asyncio.shield(question)

    def clear(self) -> None:
        self._entries.clear()

    async def _ask(self, key: str, ask: Callable[[str], Awaitable[V | None]]) -> V | None:
        asked_at = self._clock()  # the age counts from when the question was asked
        try:
            answer = await ask(key)
        finally:
            del self._asking[key]
        if self._seconds > 0:
            if len(self._entries) >= MAX_ENTRIES:
                del self._entries[next(iter(self._entries))]  # the oldest insertion
            self._entries[key] = (asked_at + self._seconds, answer)
        return answer


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark a failed question's exception as seen: its askers may all have gone."""
    if not task.cancelled():
        task.exception()


class CachedDirectory(Directory):
    def __init__(
        self, inner: Directory, seconds: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.inner = inner
        self._systems: _TtlCache[System] = _TtlCache(seconds, clock)
        self._organizations: _TtlCache[Organization] = _TtlCache(seconds, clock)
        self._keys: _TtlCache[System] = _TtlCache(seconds, clock)

    async def system(self, system_id: str) -> System | None:
        return await self._systems.get(system_id, self.inner.system)

    async def organization(self, organization_id: str) -> Organization | None:
        return await self._organizations.get(organization_id, self.inner.organization)

    async def system_by_key(self, system_key: str) -> System | None:
        return await self._keys.get(system_key, self.inner.system_by_key)

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    async def check_ready(self) -> None:
        await self.inner.check_ready()

    def reload_now(self) -> None:
        self._systems.clear()
        self._organizations.clear()
        self._keys.clear()
        self.inner.reload_now()

    def export_metrics(self, metrics: Metrics) -> None:
        self.inner.export_metrics(metrics)
