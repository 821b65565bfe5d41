"""A per-process cache in front of a directory that asks a server: bounded age and size.

An answer (found or not found) is reused for at most `seconds`; past that it is asked
again. Concurrent misses for one key share one question, so a burst of requests for a cold
system costs one query, not one each; a caller that goes away mid-question does not take
the others' answer with it. A cold system and a cold organization asked together go out at
once. Failures are never cached and never hidden: the caller gets DirectoryUnavailable, not
the previous answer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Generic, TypeVar

from ..telemetry.metrics import Metrics
from .base import Directory, Organization, System, SystemInTree
from .waiters import answer_all, fail_all

V = TypeVar("V")
# asks for a key's answer and an organization's together: (answer, the organization's
# answer when the first is found, else None)
AskBoth = Callable[[str, str], Awaitable[tuple[V | None, Organization | None]]]
MAX_ENTRIES = 100_000  # a bound on memory, far above a platform's systems in use at once


class _TtlCache(Generic[V]):
    def __init__(self, seconds: float, clock: Callable[[], float]) -> None:
        self._seconds = seconds
        self._clock = clock
        self._entries: dict[str, tuple[float, V | None]] = {}  # key -> (expires, answer)
        # questions in flight: key -> the futures of those who wait for its answer
        self._asking: dict[str, list[asyncio.Future[V | None]]] = {}
        self._handed_over: set[asyncio.Task[V | None]] = set()

    def peek(self, key: str) -> tuple[bool, V | None]:
        """(True, the answer) when a fresh answer is held, else (False, None); asks nothing."""
        entry = self._entries.get(key)
        if entry is not None and entry[0] > self._clock():
            return True, entry[1]
        return False, None

    async def get(self, key: str, ask: Callable[[str], Awaitable[V | None]]) -> V | None:
        entry = self._entries.get(key)
        if entry is not None:
            if entry[0] > self._clock():
                return entry[1]
            del self._entries[key]
        waiting = self._asking.get(key)
        if waiting is not None:
            answer: asyncio.Future[V | None] = asyncio.get_running_loop().create_future()
            waiting.append(answer)
            return await answer
        # The first caller asks in its own task (no task of its own to start, no shield to
        # pass: each is a turn of the loop behind every ready request, under load).
        waiting = self._asking[key] = []
        try:
            return await self._ask(key, ask, waiting)
        except asyncio.CancelledError:
            # It went away: the question goes on, in a task, for those who wait for it.
            if any(not w.done() for w in waiting):
                task = asyncio.ensure_future(self._ask(key, ask, waiting))
                self._handed_over.add(task)
                task.add_done_callback(self._handed_over.discard)
                task.add_done_callback(_retrieve)
            elif self._asking.get(key) is waiting:
                del self._asking[key]
            raise

    def clear(self) -> None:
        self._entries.clear()

    def now(self) -> float:
        return self._clock()

    def put(self, key: str, answer: V | None, asked_at: float) -> None:
        """Hold an answer asked at `asked_at` (its age counts from then)."""
        if self._seconds > 0:
            if len(self._entries) >= MAX_ENTRIES:
                del self._entries[next(iter(self._entries))]  # the oldest insertion
            self._entries[key] = (asked_at + self._seconds, answer)

    async def _ask(
        self,
        key: str,
        ask: Callable[[str], Awaitable[V | None]],
        waiting: list[asyncio.Future[V | None]],
    ) -> V | None:
        asked_at = self._clock()  # the age counts from when the question was asked
        try:
            answer = await ask(key)
        except asyncio.CancelledError:
            raise  # still asked: get() hands the question over
        except BaseException as exc:
            self._done_asking(key, waiting)
            fail_all(waiting, exc)
            raise
        self._done_asking(key, waiting)
        self.put(key, answer, asked_at)
        answer_all(waiting, answer)
        return answer

    def _done_asking(self, key: str, waiting: list[asyncio.Future[V | None]]) -> None:
        if self._asking.get(key) is waiting:
            del self._asking[key]


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark a handed-over question's failure as seen: its askers get it themselves."""
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
        self._trees: _TtlCache[SystemInTree] = _TtlCache(seconds, clock)
        # lookups asked beside another whose answer made them moot: they finish, unawaited
        self._unawaited: set[asyncio.Task[Organization | None]] = set()

    async def system(self, system_id: str) -> System | None:
        return await self._systems.get(system_id, self.inner.system)

    async def organization(self, organization_id: str) -> Organization | None:
        return await self._organizations.get(organization_id, self.inner.organization)

    async def system_in_tree(self, system_id: str) -> SystemInTree | None:
        return await self._trees.get(system_id, self.inner.system_in_tree)

    async def system_and_organization(
        self, system_id: str, organization_id: str
    ) -> tuple[System | None, Organization | None]:
        return await self._beside_organization(
            self._systems, system_id, self.inner.system, _live_system, organization_id
        )

    async def system_in_tree_and_organization(
        self, system_id: str, organization_id: str
    ) -> tuple[SystemInTree | None, Organization | None]:
        return await self._beside_organization(
            self._trees,
            system_id,
            self.inner.system_in_tree,
            _live_tree,
            organization_id,
            self.inner.system_in_tree_and_organization,
        )

    async def _beside_organization(
        self,
        cache: _TtlCache[V],
        key: str,
        ask: Callable[[str], Awaitable[V | None]],
        found: Callable[[V | None], bool],
        organization_id: str,
        ask_both: AskBoth[V] | None = None,
    ) -> tuple[V | None, Organization | None]:
        """`cache`'s answer for `key` and the organization's, that one only when `found`.
        Two cold questions go out at once (one round trip, not two): as one question when
        the directory can (`ask_both`), else in a task of its own for the organization, and
        only then: a task is a turn of the loop, and most answers are held or known (the
        Owner)."""
        known, organization = self._organizations.peek(organization_id)
        if not known and (organization := self.inner.local_organization(organization_id)):
            known = True
        held, answer = cache.peek(key)
        if known or held:
            if not held:
                answer = await cache.get(key, ask)
            if not found(answer):
                return answer, None
            if not known:
                organization = await self.organization(organization_id)
            return answer, organization
        if ask_both is not None:
            return await self._both_at_once(cache, key, found, organization_id, ask_both)
        asking = asyncio.ensure_future(self.organization(organization_id))
        try:
            answer = await cache.get(key, ask)
        except BaseException:
            self._leave(asking)
            raise
        if not found(answer):
            self._leave(asking)  # not cancelled: that would cancel its query, a round trip
            return answer, None
        return answer, await asking

    async def _both_at_once(
        self,
        cache: _TtlCache[V],
        key: str,
        found: Callable[[V | None], bool],
        organization_id: str,
        ask_both: AskBoth[V],
    ) -> tuple[V | None, Organization | None]:
        """As `_beside_organization`, both cold, in one question; each answer is held as
        if asked alone. Concurrent misses for `key` still share one question: one that
        waited for another caller's asks for its own organization after it."""
        ours: list[Organization | None] = []

        async def ask(asked: str) -> V | None:
            asked_at = self._organizations.now()
            answer, organization = await ask_both(asked, organization_id)
            if found(answer):  # else the organization was not asked: nothing to hold
                self._organizations.put(organization_id, organization, asked_at)
                ours.append(organization)
            return answer

        answer = await cache.get(key, ask)
        if not found(answer):
            return answer, None
        if ours:
            return answer, ours[0]
        return answer, await self.organization(organization_id)

    def local_organization(self, organization_id: str) -> Organization | None:
        return self.inner.local_organization(organization_id)

    def _leave(self, task: asyncio.Task[Organization | None]) -> None:
        self._unawaited.add(task)
        task.add_done_callback(self._unawaited.discard)
        task.add_done_callback(_retrieve)

    async def system_by_key(self, system_key: str) -> System | None:
        return await self._keys.get(system_key, self.inner.system_by_key)

    # The fleet's questions go to the server every time: each is one query over many
    # systems, asked rarely, and a purge must never decide on a cached answer.
    def reachable_systems(self, acting: Organization) -> AsyncIterator[list[System]]:
        return self.inner.reachable_systems(acting)

    def registered_systems(self) -> AsyncIterator[list[System]]:
        return self.inner.registered_systems()

    async def maps_folder_now(self, organization_id: str, system_key: str) -> bool:
        return await self.inner.maps_folder_now(organization_id, system_key)

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        if self._unawaited:  # bounded by the lookups' own bound
            await asyncio.wait(self._unawaited, timeout=5)
        await self.inner.close()

    async def check_ready(self) -> None:
        await self.inner.check_ready()

    def reload_now(self) -> None:
        self._systems.clear()
        self._organizations.clear()
        self._keys.clear()
        self._trees.clear()
        self.inner.reload_now()

    def export_metrics(self, metrics: Metrics) -> None:
        self.inner.export_metrics(metrics)


def _live_system(system: System | None) -> bool:
    return system is not None and not system.deleted


def _live_tree(tree: SystemInTree | None) -> bool:
    return tree is not None and not tree.system.deleted
