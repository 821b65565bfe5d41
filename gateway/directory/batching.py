"""Lookups asked together ride in one query: a directory that asks a server under load.

A pool of a few connections limits how many queries are in flight; one query per lookup
makes every request beyond that wait for a connection, one lookup at a time, so under load
the pool, not the database, sets the pace (DESIGN.md §7, docs/benchmarks.md). Here the keys
asked while the queries in flight run wait together, and the next free query asks for all
of them at once (`= ANY($1)`): at low load a lookup goes out at the next turn of the loop,
alone; at high load each query carries many.

Failures reach every lookup of the failed query and are never kept; a caller that goes
away does not cancel the others' query.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Generic, TypeVar

V = TypeVar("V")
MAX_KEYS_PER_QUERY = 256  # a bound on one query's parameter and on its answer's size

AskMany = Callable[[list[str]], Awaitable[Mapping[str, V]]]


class BatchedLookup(Generic[V]):
    """`get(key)` answers `ask_many(keys)[key]` (None when absent), asked with other keys."""

    def __init__(self, ask_many: AskMany[V], queries_in_flight: int) -> None:
        self._ask_many = ask_many
        self._limit = max(1, queries_in_flight)
        self._waiting: dict[str, asyncio.Future[V | None]] = {}
        self._in_flight = 0
        self._flush_scheduled = False
        self._queries: set[asyncio.Task[None]] = set()  # held: the loop keeps weak references

    async def get(self, key: str) -> V | None:
        answer = self._waiting.get(key)
        if answer is None:
            answer = asyncio.get_running_loop().create_future()
            answer.add_done_callback(_retrieve)
            self._waiting[key] = answer
            self._schedule()
        return await asyncio.shield(answer)

    def _schedule(self) -> None:
        if self._flush_scheduled or not self._waiting or self._in_flight >= self._limit:
            return
        # the next turn of the loop: the lookups of every request ready in this one join
        self._flush_scheduled = True
        asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        while self._waiting and self._in_flight < self._limit:
            keys = list(self._waiting)[:MAX_KEYS_PER_QUERY]
            batch = {key: self._waiting.pop(key) for key in keys}
            self._in_flight += 1
            query = asyncio.ensure_future(self._ask(batch))
            self._queries.add(query)
            query.add_done_callback(self._queries.discard)

    async def _ask(self, batch: dict[str, asyncio.Future[V | None]]) -> None:
        try:
            answers = await self._ask_many(list(batch))
        except BaseException as exc:  # every waiter gets the failure, even a cancellation
            failure = exc if isinstance(exc, Exception) else RuntimeError("lookup stopped")
            for answer in batch.values():
                if not answer.done():
                    answer.set_exception(failure)
            if not isinstance(exc, Exception):
                raise
        else:
            for key, answer in batch.items():
                if not answer.done():
                    answer.set_result(answers.get(key))
        finally:
            self._in_flight -= 1
            self._schedule()


def _retrieve(answer: asyncio.Future[Any]) -> None:
    """Mark a failure as seen: every caller of that key may have gone."""
    if not answer.cancelled():
        answer.exception()
