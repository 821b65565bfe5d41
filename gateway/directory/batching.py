"""Lookups asked together ride in one query: a directory that asks a server under load.

A pool of a few connections limits how many queries are in flight; one query per lookup
makes every request beyond that wait for a connection, one lookup at a time, so under load
the pool, not the database, sets the pace (DESIGN.md §7, docs/benchmarks.md). Here the keys
asked while the queries in flight run wait together, and the next free query asks for all
of them at once (`= ANY($1)`): with nothing in flight a lookup goes out at once, alone, from
the caller's own task; at high load each query carries many.

Failures reach every lookup of the failed query and are never kept; a caller that goes
away does not cancel the others' query. A lookup that waits for a query to take it waits
at most `wait_seconds` (then TimeoutError); one that goes out at once is bounded by
`ask_many`'s own bound: one timer, not two, on the path an unloaded lookup takes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Mapping
from typing import Generic, TypeVar

from .waiters import answer_all, fail_all

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
MAX_KEYS_PER_QUERY = 256  # a bound on one query's parameter and on its answer's size

AskMany = Callable[[list[K]], Awaitable[Mapping[K, V]]]


class BatchedLookup(Generic[K, V]):
    """`get(key)` answers `ask_many(keys)[key]` (None when absent), asked with other keys.

    Every turn of the event loop a lookup waits is a turn behind every other ready request:
    under load that, not the query, is most of a lookup's time. So each caller waits on a
    future of its own (set directly, no shield in between), and a batch's task collects
    its keys and asks in the same step."""

    def __init__(
        self, ask_many: AskMany[K, V], queries_in_flight: int, wait_seconds: float
    ) -> None:
        self._ask_many = ask_many
        self._limit = max(1, queries_in_flight)
        self._wait_seconds = wait_seconds
        self._waiting: dict[K, list[asyncio.Future[V | None]]] = {}
        self._in_flight = 0  # batch tasks started, collecting or asking
        self._collecting = False  # a started batch task has not taken its keys yet
        self._queries: set[asyncio.Task[None]] = set()  # held: the loop keeps weak references

    async def get(self, key: K) -> V | None:
        if not self._waiting and self._in_flight == 0:
            # Nothing in flight and no one waiting: ask at once, in the caller's own
            # task (no batch task to start, no future to wake: two turns of the loop fewer).
            # Only its own key rides in it: its cancellation fails no one else.
            self._in_flight += 1
            try:
                answers = await self._ask_many([key])
            finally:
                self._in_flight -= 1
                self._start()
            return answers.get(key)
        answer: asyncio.Future[V | None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, []).append(answer)
        self._start()
        # A caller that goes away (or waits past the bound) cancels its own future only;
        # the batch goes on for the others.
        async with asyncio.timeout(self._wait_seconds):
            return await answer

    def _start(self) -> None:
        # A new batch task only when there is room: the keys that arrive meanwhile wait for
        # it (its first step runs at the next turn of the loop) or for the next free one.
        if self._waiting and self._in_flight < self._limit and not self._collecting:
            self._in_flight += 1
            self._collecting = True
            query = asyncio.ensure_future(self._ask())
            self._queries.add(query)
            query.add_done_callback(self._queries.discard)

    async def _ask(self) -> None:
        self._collecting = False
        keys = list(self._waiting)[:MAX_KEYS_PER_QUERY]
        batch = {key: self._waiting.pop(key) for key in keys}
        try:
            answers = await self._ask_many(keys)
        except BaseException as exc:  # every waiter gets the failure, even a cancellation
            fail_all((w for waiters in batch.values() for w in waiters), exc)
            if not isinstance(exc, Exception):
                raise
        else:
            for key, waiters in batch.items():
                answer_all(waiters, answers.get(key))
        finally:
            self._in_flight -= 1
            self._start()
